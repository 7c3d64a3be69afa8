"""`llmkit pretrain`: train a causal language model from raw text or prepared token shards."""

from __future__ import annotations

import argparse
import math


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a causal LM (YAML config, any --section.key value override)",
        description=(
            "Pretrain a causal language model. Any config key can be overridden on the command line, "
            "e.g. --train.lr 3e-4 --model.n_layer 4. Under torchrun the same command uses DDP "
            "(--strategy fsdp for FSDP2). The out_dir becomes a Hugging Face model folder."
        ),
    )
    p.add_argument("--config", help="YAML config file (sections: model, data, train, out_dir)")
    p.add_argument("--data", help="prepared token folder (manifest.json), or a text file / folder of text")
    p.add_argument("--out_dir", "--out-dir", dest="out_dir", help="output folder (model, checkpoints, logs)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CKPT",
        help="continue from out_dir's latest checkpoint (or from the checkpoint folder CKPT)",
    )
    p.add_argument("--overwrite", action="store_true", help="start over even if out_dir holds a checkpoint")
    p.add_argument("--strategy", choices=["auto", "single", "ddp", "fsdp", "parallel"], help="distributed strategy")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max_iters", "--max-iters", dest="max_iters", type=int, help="optimizer steps")
    p.add_argument("--qat", choices=["int8", "int4"],
                   help="quantization-aware training; out_dir gets the quantized model")
    p.add_argument("--objective", choices=["clm", "mlm", "span"],
                   help="clm: causal LM (default); mlm: BERT masked LM; span: T5 span corruption")
    p.set_defaults(func=run, accepts_extra=True)


def run(args: argparse.Namespace) -> int:
    from llmkit.train.config import TrainConfig
    from llmkit.train.trainer import pretrain

    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    cfg.apply_overrides(list(args.extra or []))
    if args.data:
        cfg.data.path = args.data
    if args.out_dir:
        cfg.out_dir = args.out_dir
    for key in ("strategy", "device", "max_iters", "qat", "objective"):
        if getattr(args, key) is not None:
            setattr(cfg.train, key, getattr(args, key))
    result = pretrain(cfg, resume=args.resume, overwrite=args.overwrite)
    if result.val_loss is not None:
        print(
            f"done: step {result.step}, val loss {result.val_loss:.4f} "
            f"(perplexity {math.exp(min(result.val_loss, 50)):.2f}), {result.wall_time:.1f} s wall; "
            f"model saved to {result.out_dir}"
        )
    return 0
