"""`llmkit convert llama2c IN.bin OUT_DIR`: import foreign checkpoints as Hugging Face folders."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a foreign checkpoint (llama2.c .bin) to a Hugging Face folder")
    p.add_argument("format", choices=["llama2c"], help="source format")
    p.add_argument("src", help="checkpoint file, e.g. stories260K.bin")
    p.add_argument("out", help="output folder (config.json + model.safetensors)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.model.llama2c import load_llama2c

    model = load_llama2c(args.src)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}: llama, {model.num_params():,} parameters")
    return 0
