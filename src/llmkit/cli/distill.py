"""`llmkit distill --teacher DIR (--student DIR | --student-preset NAME | --student-config YAML) --data PATH
--out DIR [--max-steps N]`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="knowledge distillation: train a student on a teacher's next-token distributions",
        description="loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, optionally plus "
                    "hidden-state matching. Example: llmkit distill --teacher out/shk --student-preset tiny "
                    "--data ../shared/data/tinyshakespeare/input.txt --out out/shk-student --max-steps 500",
    )
    p.add_argument("--teacher", required=True, help="teacher model folder (decoder, with tokenizer)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--student", help="student model folder (same vocabulary as the teacher)")
    g.add_argument("--student-preset", help="a model preset (takes the teacher's vocabulary)")
    g.add_argument("--student-config", help="YAML of model fields, or a pretrain config with a model: section")
    p.add_argument("--data", required=True, help="text file / folder (tokenized with the teacher's tokenizer) "
                   "or a prepared data folder")
    p.add_argument("--out", required=True, help="output folder (the student model, checkpoints, metrics)")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term (1 - alpha: cross-entropy)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kl", choices=["forward", "reverse"], default="forward",
                   help="forward KL(teacher || student) or reverse KL(student || teacher)")
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="> 0: also match hidden states through learned projections (MSE, this weight)")
    p.add_argument("--cache-teacher-topk", type=int, metavar="K",
                   help="run the teacher once: store its top-K log-probs per window on disk")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=64, help="tokens per training window")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--eval-interval", type=int, help="steps between evaluations and checkpoints (default: 10/run)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out tail of raw text")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue exactly from --out's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out holds a checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import math

    from llmkit.train.distill import distill

    r = distill(args.teacher, args.data, args.out, student=args.student, student_preset=args.student_preset,
                student_config=args.student_config, max_steps=args.max_steps, alpha=args.alpha,
                temperature=args.temperature, kl=args.kl, hidden_weight=args.hidden_weight,
                cache_topk=args.cache_teacher_topk, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                grad_accum=args.grad_accum, eval_interval=args.eval_interval, val_fraction=args.val_fraction,
                seed=args.seed, device=args.device, resume=args.resume, overwrite=args.overwrite)
    if r.val_loss is not None:
        print(f"done: step {r.step}, student val loss {r.val_loss:.4f} (perplexity "
              f"{math.exp(min(r.val_loss, 50)):.2f}), {r.wall_time:.1f} s; saved to {r.out_dir}")
    return 0
