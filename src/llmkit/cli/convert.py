"""`llmkit convert llama2c IN.bin OUT_DIR`: import foreign checkpoints as Hugging Face folders;
`llmkit convert dcp CHECKPOINT OUT_DIR`: one HF folder from a distributed (train.parallel) checkpoint."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a foreign checkpoint (llama2.c .bin) or a distributed training checkpoint to a HF folder",
    )
    p.add_argument("format", choices=["llama2c", "dcp"], help="source format")
    p.add_argument(
        "src",
        help="checkpoint file (stories260K.bin), or for dcp a checkpoint folder (out/run/checkpoints/step_000500) "
        "or a run's out_dir (its latest checkpoint)",
    )
    p.add_argument("out", help="output folder (config.json + model.safetensors)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format == "dcp":
        from llmkit.train.parallel import dcp_to_hf

        model = dcp_to_hf(args.src, args.out)
    else:
        from llmkit.model.llama2c import load_llama2c

        model = load_llama2c(args.src)
        model.save_pretrained(args.out)
    print(f"wrote {args.out}: {model.config.model_type}, {model.num_params():,} parameters")
    return 0
