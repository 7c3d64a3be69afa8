"""`llmkit dpo`: direct preference optimisation (sigmoid | ipo | hinge) against a frozen reference."""

from __future__ import annotations

import argparse

from llmkit.cli._align_args import add_common, common_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dpo", help="DPO / IPO / hinge on preference pairs (prompt, chosen, rejected)",
        description="Direct preference optimisation from an SFT model. The reference is the starting model: under "
                    "--method lora the same weights with the adapters off, else a frozen copy (or, with "
                    "--precompute-ref, its log-probs computed once).")
    p.add_argument("--model", required=True, help="the SFT model to start from (model folder)")
    p.add_argument("--data", required=True, nargs="+", help="preference JSONL: {'prompt', 'chosen', 'rejected'}")
    p.add_argument("--val-data", nargs="+", help="held-out preference JSONL")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of --data")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss", choices=["sigmoid", "ipo", "hinge"], default="sigmoid")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO (sigmoid)")
    p.add_argument("--rpo-alpha", type=float, default=0.0,
                   help="add this weight x the chosen answers' NLL to the loss (RPO; keeps their likelihood up)")
    p.add_argument("--precompute-ref", action="store_true", help="compute the reference log-probs once, up front")
    p.add_argument("--max-seq-len", type=int)
    add_common(p, "peak learning rate (default: full 1e-5, lora 1e-4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.train.preference import dpo

    r = dpo(args.model, args.data, args.out, beta=args.beta, loss_type=args.loss, val_data=args.val_data,
            val_fraction=args.val_fraction, label_smoothing=args.label_smoothing, rpo_alpha=args.rpo_alpha,
            precompute_ref=args.precompute_ref,
            max_seq_len=args.max_seq_len, **common_kwargs(args))
    last = next((m for m in reversed(r.metrics) if "eval_rewards/accuracies" in m), {})
    acc = f"held-out reward accuracy {last['eval_rewards/accuracies']:.3f}, " if last else ""
    print(f"done: dpo step {r.step}, val loss {r.val_loss:.4f}, {acc}{r.wall_time:.1f} s wall; saved to {r.out_dir}")
    return 0
