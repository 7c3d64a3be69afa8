"""`llmkit compress report --model DIR --variants DIR ... [--data FILE] --out DIR`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="compare a model with its compressed variants (size, perplexity, decode tok/s, peak memory)",
        description="Example: llmkit compress report --model out/shk --variants out/shk-w50 out/shk-int8 "
                    "--data ../shared/data/tinyshakespeare/input.txt --out out/report",
    )
    p.add_argument("action", choices=["report"], help="report: one table + one plot over the folders")
    p.add_argument("--model", required=True, help="the base model folder")
    p.add_argument("--variants", required=True, nargs="+", help="compressed model folders (pruned, low-rank, "
                   "distilled, quantized ...)")
    p.add_argument("--data", help="held-out text file or prepared data folder (val split) for perplexity")
    p.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens scored")
    p.add_argument("--seq-len", type=int, help="perplexity window (default: the model's context)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per speed measurement")
    p.add_argument("--repeats", type=int, default=3, help="speed measurements per model (the median is kept)")
    p.add_argument("--out", required=True, help="folder for report.md, report.json, report.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.eval.compress_report import compress_report, table

    rows = compress_report(args.model, args.variants, args.out, args.data, args.max_tokens, args.seq_len,
                           args.new_tokens, args.repeats)
    print(table(rows), end="")
    print(f"wrote {args.out}/report.md, report.json, report.png")
    return 0
