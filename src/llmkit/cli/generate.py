"""`llmkit generate --model DIR --prompt TEXT`: stream a completion to stdout."""

from __future__ import annotations

import argparse
import sys

from llmkit.cli._args import (
    add_model_args,
    add_sampling_args,
    add_speculative_args,
    load_model_and_tokenizer,
    sampling_kwargs,
    speculative_kwargs,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt with a model, streaming the text to stdout")
    add_model_args(p)
    p.add_argument("--prompt", help="the prompt text (default: read stdin)")
    p.add_argument("--no-special-tokens", action="store_true", help="do not add BOS etc. to the prompt")
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="onnxruntime: decode an `llmkit export onnx` folder with ONNX Runtime")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: torch's)")
    add_sampling_args(p)
    add_speculative_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.infer.generate import stream_text

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    spec = speculative_kwargs(args)
    if args.backend == "onnxruntime":
        import llmkit
        from llmkit.compress.onnx import OrtModel

        model = OrtModel(args.model, threads=args.threads)
        tokenizer = llmkit.load_tokenizer(args.tokenizer or args.model)
    else:
        model, tokenizer = load_model_and_tokenizer(args)
    if spec is not None and args.backend != "torch":
        from llmkit.errors import ConfigError

        raise ConfigError("speculative decoding runs on the torch backend only; drop --backend onnxruntime")
    if args.echo:
        sys.stdout.write(prompt)
    for delta in stream_text(
        model, tokenizer, prompt, add_special_tokens=not args.no_special_tokens, speculative=spec,
        **sampling_kwargs(args),
    ):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
