"""`llmkit lora merge`: fold a LoRA adapter into its base model and write a plain model folder."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("lora", help="LoRA adapter tools (merge)")
    sub = p.add_subparsers(dest="lora_command", metavar="ACTION", required=True)
    m = sub.add_parser("merge", help="merge a PEFT LoRA adapter into the base weights (a plain HF folder)")
    m.add_argument("--model", required=True, help="base model folder")
    m.add_argument("--adapter", required=True,
                   help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--out", required=True, help="output model folder")
    m.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from llmkit.model.adapters import merge_adapter

    merge_adapter(args.model, args.adapter, args.out)
    print(f"merged {args.adapter} into {args.model}: {args.out}")
    return 0
