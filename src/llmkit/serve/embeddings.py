"""`POST /v1/embeddings`: sentence embeddings from an encoder model (float lists or base64 float32)."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from llmkit.serve.errors import APIError
from llmkit.serve.protocol import EmbeddingRequest
from llmkit.serve.state import ServerState

router = APIRouter()
MAX_INPUTS = 2048


class Embedder:
    """An encoder model + tokenizer that turns texts into one unit-norm vector each."""

    def __init__(self, model: Any, tokenizer: Any, max_len: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_len = max_len or _max_length(model)
        self._lock = threading.Lock()  # one forward at a time

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=True))

    def __call__(self, texts: list[str]) -> np.ndarray:
        from llmkit.model.embed import embed

        with self._lock:
            vecs = embed(self.model, texts, tokenizer=self.tokenizer)
        if hasattr(vecs, "detach"):
            vecs = vecs.detach().float().cpu().numpy()
        return np.asarray(vecs, dtype=np.float32)  # [N, D]


def _max_length(model: Any) -> int | None:
    """The encoder's input limit: sentence-transformers' max_seq_length when the folder has one."""
    folder = getattr(model, "name_or_path", None)
    cfg = Path(folder) / "sentence_bert_config.json" if folder else None
    if cfg is not None and cfg.is_file():
        return int(json.loads(cfg.read_text()).get("max_seq_length", 512))
    return getattr(getattr(model, "config", None), "block_size", None)


def _inputs(state: ServerState, data: Any) -> list[str]:
    """Texts to embed: strings as they are, token-id inputs decoded with the embedding tokenizer."""
    if isinstance(data, str):
        data = [data]
    if not data:
        raise APIError("input is empty: expected a string or a list of strings", 400, param="input")
    if isinstance(data[0], int):
        data = [data]
    if len(data) > MAX_INPUTS:
        raise APIError(f"input has {len(data)} items; at most {MAX_INPUTS} per request", 400, param="input")
    tok = state.embedder.tokenizer
    texts = []
    for x in data:
        if isinstance(x, str):
            if not x:
                raise APIError("input contains an empty string; expected non-empty texts", 400, param="input")
            texts.append(x)
        else:
            bad = [t for t in x if not 0 <= t < tok.vocab_size]
            if bad or not x:
                raise APIError(
                    f"token ids in 'input' must be non-empty and in [0, {tok.vocab_size})", 400, param="input"
                )
            texts.append(tok.decode(x, skip_special_tokens=True))
    return texts


def encode_vector(v: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
    return v.astype(np.float32).tolist()


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request):
    state: ServerState = request.app.state.llmkit
    if state.embedder is None:
        raise APIError(
            f"the model '{body.model}' does not serve embeddings; start the server with "
            f"--embedding-model DIR (an encoder such as all-MiniLM-L6-v2)",
            404 if body.model not in state.model_names() else 400,
            param="model",
            code="model_not_found",
        )
    name = state.embedding_model_name or state.model_name
    if body.model != name:
        raise APIError(
            f"the model '{body.model}' does not exist; embeddings come from '{name}'",
            404,
            param="model",
            code="model_not_found",
        )
    texts = _inputs(state, body.input)
    n_tokens = await asyncio.to_thread(lambda: [state.embedder.count_tokens(t) for t in texts])  # off the loop
    limit = state.embedder.max_len
    if limit:
        for i, n in enumerate(n_tokens):
            if n > limit:
                raise APIError(
                    f"input {i} has {n} tokens but the embedding model's maximum is {limit}",
                    400,
                    param="input",
                    code="context_length_exceeded",
                )
    vecs = await asyncio.to_thread(state.embedder, texts)
    if body.dimensions is not None:
        if body.dimensions > vecs.shape[1]:
            raise APIError(f"dimensions={body.dimensions} exceeds the model's {vecs.shape[1]}", 400, param="dimensions")
        vecs = vecs[:, : body.dimensions]
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    state.metrics.prompt_tokens.inc(sum(n_tokens))
    data = [
        {"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
        for i, v in enumerate(vecs)
    ]
    total = sum(n_tokens)
    return {
        "object": "list",
        "data": data,
        "model": name,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }
