"""Load a model folder into a server and run it with uvicorn (in the foreground or a background thread)."""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from llmkit.errors import CheckpointError, ConfigError
from llmkit.serve.app import create_app
from llmkit.serve.connections import GuardedH11Protocol, Server
from llmkit.serve.embeddings import Embedder
from llmkit.serve.state import ServerLimits, ServerState

API_KEY_ENV = "LLMKIT_API_KEY"


def _is_encoder(model: Any) -> bool:
    from llmkit.model.bert import BertModel

    return isinstance(model, BertModel)


def load_state(
    model: str | os.PathLike,
    *,
    embedding_model: str | os.PathLike | None = None,
    served_model_name: str | None = None,
    embedding_model_name: str | None = None,
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    max_seq_len: int | None = None,
    max_tokens: int | None = None,
    request_timeout: float | None = None,
    dtype: Any = None,
    device: str | None = None,
    quantize: str | None = None,
    lora: dict[str, str] | None = None,
    limits: ServerLimits | None = None,
    speculative: Any = None,
    engine_options: dict[str, Any] | None = None,
) -> ServerState:
    """Load `model` (a Hugging Face or llmkit folder) and its tokenizer into a `ServerState`.

    A decoder gets a continuous-batching `Engine`; an encoder (BERT) serves embeddings only.
    `api_key` defaults to $LLMKIT_API_KEY; `limits` (body size, timeouts, connections) to
    `ServerLimits()`. `lora` maps request model names to adapter folders (LoRA or prompt tuning): requests
    for them and for the base share one continuous batch (multi-LoRA; soft prompts as virtual tokens).
    `engine_options` go to `Engine` (kv_block_size, num_blocks, prefill_chunk, max_num_batched_tokens,
    scoring_chunk, prefix_caching, mixed_prefill); `speculative` is the engine's speculative decoding (a
    `SpeculativeConfig`, a dict of its fields or "ngram").
    """
    from llmkit.infer.engine import Engine
    from llmkit.model.adapters import load_named_adapter
    from llmkit.model.hf import load_model
    from llmkit.tokenizer import load_tokenizer

    path = Path(model)
    if not path.is_dir():
        raise CheckpointError(
            f"model folder {path} does not exist; expected a folder with config.json, model weights and tokenizer.json"
        )
    if max_batch_size < 1 or max_queue < 1:
        raise ConfigError(f"--max-batch-size and --max-queue must be >= 1, got {max_batch_size}, {max_queue}")
    limits = limits or ServerLimits()
    if limits.max_body_bytes < 1 or (limits.max_connections is not None and limits.max_connections < 1):
        raise ConfigError("--max-body-bytes and --max-connections must be >= 1")
    net = load_model(path, dtype=dtype, device=device, quantize=quantize)
    tokenizer = load_tokenizer(path)
    name = served_model_name or path.resolve().name
    for adapter_name, folder in (lora or {}).items():
        if adapter_name == name or not adapter_name:
            raise ConfigError(f"--lora {adapter_name}={folder}: the name must be non-empty and differ from the "
                              f"base model's '{name}'")
        load_named_adapter(net, folder, adapter_name)  # LoRA, or a soft prompt (prompt tuning)
    engine = embedder = None
    emb_name = None
    if _is_encoder(net):
        embedder, emb_name = Embedder(net, tokenizer), name
        ctx = int(net.config.block_size)
    else:
        engine = Engine(net, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_queue=max_queue,
                        speculative=speculative, **(engine_options or {}))
        ctx = engine.max_seq_len
    if embedding_model is not None:
        if embedder is not None:
            raise ConfigError("--embedding-model was given but the main model is already an embedding model")
        epath = Path(embedding_model)
        enet = load_model(epath, dtype=dtype, device=device)
        if not _is_encoder(enet):
            raise ConfigError(f"--embedding-model {epath} is not an encoder (BERT-style) model")
        embedder = Embedder(enet, load_tokenizer(epath))
        emb_name = embedding_model_name or epath.resolve().name
    return ServerState(
        engine=engine,
        tokenizer=tokenizer if engine is not None else None,
        model_name=name,
        max_seq_len=ctx,
        embedder=embedder,
        embedding_model_name=emb_name,
        api_key=api_key or os.environ.get(API_KEY_ENV) or None,
        max_tokens=max_tokens,
        request_timeout=request_timeout,
        adapters=list(lora or {}),
        limits=limits,
    )


def uvicorn_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> Server:
    """A uvicorn server for an llmkit app, with the connection limits of its `ServerLimits`."""
    state: ServerState = app.state.llmkit
    lim = state.limits
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        http=functools.partial(GuardedH11Protocol, header_timeout=lim.header_timeout),
        timeout_keep_alive=lim.keep_alive_timeout,
        limit_concurrency=lim.max_connections,
        timeout_graceful_shutdown=lim.graceful_timeout,
    )
    return Server(config, on_shutdown=state.begin_shutdown)


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server in the foreground until Ctrl-C / SIGTERM, then drain in-flight requests.

    Requests still running when `state.limits.graceful_timeout` is about to run out are answered
    with a 503 error (an SSE `error` event when streaming); the function then returns normally.
    """
    uvicorn_server(create_app(state), host, port, log_level).run()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """A uvicorn server in a daemon thread (tests, benchmarks, notebooks).

    with BackgroundServer(create_app(state)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        self.app = app
        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn_server(app, host, self.port, log_level)
        self.thread = threading.Thread(target=self.server.run, name="llmkit-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful: stop accepting, let in-flight requests finish, drain the engine."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
