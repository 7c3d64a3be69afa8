"""`llmkit serve`: an OpenAI-compatible server (completions, chat, embeddings, metrics, web chat)."""

from __future__ import annotations

import argparse

from llmkit.cli._args import add_speculative_args, speculative_kwargs

LIMIT_FLAGS = (
    "max_body_bytes",
    "header_timeout",
    "body_timeout",
    "keep_alive_timeout",
    "max_connections",
    "graceful_timeout",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model folder over an OpenAI-compatible API with continuous batching. "
        "Example: llmkit serve --model out/my-model --port 8000",
    )
    p.add_argument("--model", required=True, help="model folder (Hugging Face or llmkit format, with tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $LLMKIT_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the folder name)")
    p.add_argument("--embedding-model", default=None, help="encoder folder for /v1/embeddings")
    p.add_argument("--embedding-model-name", default=None, help="id of the embedding model (default: folder name)")
    p.add_argument("--rag-store", default=None, help="RAG store (folder or postgresql://) for POST /v1/rag/query")
    p.add_argument("--max-batch-size", type=int, default=8, help="max concurrent sequences in the running batch")
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="max waiting sequences (prompts x n): 429 beyond, 400 if one request needs more",
    )
    p.add_argument("--max-seq-len", type=int, default=None, help="context limit (default: the model's)")
    eng = p.add_argument_group("engine", "KV memory and scheduling (docs/serving.md, 'Memory and scheduling')")
    eng.add_argument("--kv-block-size", type=int, default=16, help="tokens per KV-cache block (page)")
    eng.add_argument("--num-kv-blocks", type=int, default=None,
                     help="KV blocks in the pool (default: --max-batch-size sequences of the full context)")
    eng.add_argument("--prefill-chunk", type=int, default=512, help="most prompt tokens of one sequence per step")
    eng.add_argument("--max-num-batched-tokens", type=int, default=None,
                     help="most tokens one step computes, decode + prefill (default: --prefill-chunk)")
    eng.add_argument("--scoring-chunk", type=int, default=8,
                     help="most prompt-scoring (echo + logprobs) tokens per step while streams decode")
    eng.add_argument("--no-prefix-caching", action="store_true",
                     help="do not share KV blocks between prompts with a common prefix")
    eng.add_argument("--no-mixed-prefill", action="store_true",
                     help="run prefill chunks in steps of their own (running streams wait), as before chunked prefill")
    p.add_argument("--max-tokens", type=int, default=None, help="max tokens one request may generate")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds before a request is cut off")
    lim = p.add_argument_group("limits", "defaults in docs/serving.md, 'Limits and security'")
    lim.add_argument("--max-body-bytes", type=int, help="largest request body; a bigger one gets 413 (default 4 MiB)")
    lim.add_argument("--header-timeout", type=float, help="seconds a client has to send its request headers")
    lim.add_argument("--body-timeout", type=float, help="seconds a client has to send the request body, else 408")
    lim.add_argument("--keep-alive-timeout", type=float, help="seconds an idle keep-alive connection stays open")
    lim.add_argument("--max-connections", type=int, help="open connections + running requests before 503")
    lim.add_argument(
        "--graceful-timeout", type=float, help="seconds SIGTERM waits for in-flight requests; then they get a 503"
    )
    lim.add_argument(
        "--enable-docs", action="store_true", help="serve /openapi.json, /docs and /redoc (off by default)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the loader's)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter folder under model name NAME (repeatable; one shared batch)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights on load (RTN, CPU kernels)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_speculative_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.errors import ConfigError
    from llmkit.serve import load_state, serve
    from llmkit.serve.state import ServerLimits

    given = {k: getattr(args, k) for k in LIMIT_FLAGS if getattr(args, k) is not None}

    lora = {}
    for spec in args.lora:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--lora {spec!r}: expected NAME=DIR (a model name and a LoRA adapter folder)")
        lora[name] = folder
    state = load_state(
        args.model,
        embedding_model=args.embedding_model,
        served_model_name=args.served_model_name,
        embedding_model_name=args.embedding_model_name,
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_seq_len=args.max_seq_len,
        max_tokens=args.max_tokens,
        request_timeout=args.request_timeout,
        device=args.device,
        lora=lora,
        quantize=args.quantize,
        limits=ServerLimits(enable_docs=args.enable_docs, **given),
        speculative=speculative_kwargs(args),
        engine_options=dict(
            kv_block_size=args.kv_block_size,
            num_blocks=args.num_kv_blocks,
            prefill_chunk=args.prefill_chunk,
            max_num_batched_tokens=args.max_num_batched_tokens,
            scoring_chunk=args.scoring_chunk,
            prefix_caching=not args.no_prefix_caching,
            mixed_prefill=not args.no_mixed_prefill,
        ),
    )
    print(f"llmkit serve: '{state.model_name}' on http://{args.host}:{args.port} (web chat at /, API at /v1)")
    if args.rag_store:
        from llmkit.rag.service import RagService

        state.rag = RagService(args.rag_store)
    serve(state, host=args.host, port=args.port, log_level=args.log_level)
    return 0
