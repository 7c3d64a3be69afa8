"""Training options shared by `llmkit finetune` and the alignment commands (rm, dpo, ppo, grpo)."""

from __future__ import annotations

import argparse


def add_run_args(g: argparse._ArgumentGroup) -> None:
    """Weight decay, evaluation interval, seed, resume/overwrite, device, dtype, threads."""
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--eval-interval", type=int, help="steps between evaluations and checkpoints (default: 10 per run)")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue exactly from --out's latest checkpoint (or checkpoint folder CKPT)")
    g.add_argument("--overwrite", action="store_true", help="start over even if --out holds a checkpoint")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", help="autocast dtype: auto | float32 | bfloat16 | float16")
    g.add_argument("--num-threads", type=int, help="CPU threads (0 = time 1 vs all and keep the faster)")


def add_lora_args(p: argparse.ArgumentParser, dropout: float) -> argparse._ArgumentGroup:
    lo = p.add_argument_group("lora")
    lo.add_argument("--lora-r", type=int, default=16)
    lo.add_argument("--lora-alpha", type=float, default=32.0)
    lo.add_argument("--lora-dropout", type=float, default=dropout)
    lo.add_argument("--lora-targets", default="all-linear", help="all-linear or a comma list of q,k,v,o,gate,up,down")
    return lo
