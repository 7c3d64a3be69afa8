"""`llmkit rm train | score`: reward models (a scalar head, Bradley-Terry loss) as HF sequence classifiers."""

from __future__ import annotations

import argparse
import json
import sys

from llmkit.cli._align_args import add_common, common_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rm", help="reward models: train on preference pairs, score texts")
    sub = p.add_subparsers(dest="rm_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a reward model (writes a *ForSequenceClassification folder)",
                       description="Bradley-Terry reward model on preference JSONL (prompt, chosen, rejected; an "
                                   "optional 'margin'); held-out pairwise accuracy is reported.")
    t.add_argument("--model", required=True, help="causal LM folder to start from (usually the SFT model)")
    t.add_argument("--data", required=True, nargs="+", help="preference JSONL")
    t.add_argument("--val-data", nargs="+", help="held-out preference JSONL")
    t.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of --data")
    t.add_argument("--max-seq-len", type=int)
    add_common(t, "peak learning rate (default: full 1e-4, lora 1e-3)")
    t.set_defaults(func=run_train)
    s = sub.add_parser("score", help="score a text, or every pair of a preference file")
    s.add_argument("--model", required=True, help="reward model folder")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="print the score of TEXT, tokenized as the tokenizer does")
    g.add_argument("--data", help='preference JSONL; writes {"chosen": s, "rejected": s} per pair')
    s.add_argument("--out", help="write the scores here (default: stdout)")
    s.set_defaults(func=run_score)


def run_train(args: argparse.Namespace) -> int:
    from llmkit.train.preference import train_reward_model

    r = train_reward_model(args.model, args.data, args.out, val_data=args.val_data, val_fraction=args.val_fraction,
                           max_seq_len=args.max_seq_len, **common_kwargs(args))
    acc = f"held-out pairwise accuracy {r.val_accuracy:.3f}, " if r.val_accuracy is not None else ""
    print(f"done: rm train step {r.step}, val loss {r.val_loss:.4f}, {acc}{r.wall_time:.1f} s wall; "
          f"saved to {r.out_dir}")
    return 0


def run_score(args: argparse.Namespace) -> int:
    from llmkit.train.preference import rm_score_file, rm_score_texts

    if args.text is not None:
        print(repr(rm_score_texts(args.model, [args.text])[0]))
        return 0
    rows = rm_score_file(args.model, args.data, args.out)
    if not args.out:
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in rows))
    else:
        print(f"wrote {len(rows)} scored pairs to {args.out}", file=sys.stderr)
    return 0
