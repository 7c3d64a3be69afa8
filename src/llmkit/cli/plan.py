"""`llmkit plan --params 70e9 --gpus 512 [--tp 8 --pp 4 --dp 16 ...]`: memory and communication on paper."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="memory per GPU, communication per step and expected MFU of a parallel layout",
        description=(
            "Print memory per GPU (weights, gradients, AdamW state, activations), bytes sent per step and an "
            "expected MFU range, for the layouts of docs/distributed.md or the one given by --tp/--pp/--dp."
        ),
    )
    p.add_argument("--params", type=float, help="model size, e.g. 7e9, 70e9, 1e12 (nearest reference shape)")
    p.add_argument("--config", help="a training YAML config or a preset name: its model is planned")
    p.add_argument("--vocab_size", "--vocab-size", type=int, default=32000,
                   help="with --config: the tokenizer's vocabulary when the config does not fix model.vocab_size")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs")
    p.add_argument("--tp", type=int, help="tensor parallel degree")
    p.add_argument("--pp", type=int, help="pipeline stages")
    p.add_argument("--dp", type=int, help="FSDP sharding degree (dp_shard); default: what is left")
    p.add_argument("--dp_replicate", "--dp-replicate", type=int, default=1, help="replicas (HSDP)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel degree (MoE; on paper only)")
    p.add_argument("--zero", type=int, choices=[1, 2, 3], default=3)
    p.add_argument("--offload", action="store_true", help="FSDP2 CPU offload")
    p.add_argument("--ac", choices=["none", "full", "selective"], default="none", help="activation checkpointing")
    p.add_argument("--pp_schedule", "--pp-schedule", default="1f1b", choices=["gpipe", "1f1b", "interleaved_1f1b"])
    p.add_argument("--seq_len", "--seq-len", type=int, default=4096)
    p.add_argument("--micro_batch", "--micro-batch", type=int, default=None, help="sequences per dp rank per step")
    p.add_argument("--act_bytes", "--act-bytes", type=int, default=2, help="2 (bf16 autocast) or 4 (fp32)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.errors import ConfigError
    from llmkit.train.plan import Layout, ModelShape, check_layout, default_layouts, table

    if (args.params is None) == (args.config is None):
        raise ConfigError("llmkit plan needs exactly one of --params (e.g. 70e9) or --config (YAML or preset)")
    if args.params is not None:
        shape = ModelShape.from_params(args.params)
    else:
        from pathlib import Path

        from llmkit.train.config import TrainConfig

        cfg = TrainConfig.from_yaml(args.config) if Path(args.config).is_file() else TrainConfig.from_dict(
            {"model": args.config})
        shape = ModelShape.from_config(cfg.model_config(vocab_size=args.vocab_size))
    p = shape.params()
    n = lambda x: f"{x / 1e9:.3g}B" if x >= 1e8 else f"{x / 1e6:.3g}M"  # noqa: E731
    print(f"model: {n(p['total'])} parameters ({n(p['active'])} active), {shape.n_layer} layers, "
          f"width {shape.n_embd}, {shape.n_head} heads / {shape.n_kv_head} kv, vocab {shape.vocab_size}"
          + (f", {shape.n_expert} experts top-{shape.n_expert_per_tok}" if shape.n_expert else ""))
    if args.tp or args.pp or args.dp or args.dp_replicate > 1:
        tp, pp, rep = args.tp or 1, args.pp or 1, args.dp_replicate
        dp = args.dp or max(1, args.gpus // (tp * pp * rep))
        mb = args.micro_batch or (2 * pp if pp > 1 else 1)
        layouts = [Layout(rep, dp, tp, pp, args.pp_schedule, None, args.zero, args.offload, args.ac, mb, args.seq_len,
                          args.ep)]
        check_layout(layouts[0], args.gpus)
    else:
        layouts = default_layouts(args.gpus, shape, args.seq_len)
    print(f"{args.gpus} GPUs, sequence {args.seq_len}; memory per GPU, communication = bytes sent per GPU per step "
          "(fp32 weights/grads, AdamW fp32 moments)")
    print(table(shape, layouts, args.act_bytes, markdown=args.markdown))
    return 0
