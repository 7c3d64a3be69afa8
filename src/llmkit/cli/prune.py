"""`llmkit prune --model DIR --method magnitude|wanda|sparsegpt|2:4|heads|channels|layers [--sparsity S]
[--calib FILE] [--recover-steps N] --out DIR`."""

from __future__ import annotations

import argparse

STRUCTURED = ("heads", "channels", "layers")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a model (magnitude, Wanda, SparseGPT, 2:4; heads, channels, layers) into a model folder",
        description="Example: llmkit prune --model out/m --method wanda --sparsity 0.5 --calib data.txt "
                    "--out out/m-w50",
    )
    p.add_argument("--model", required=True, help="float model folder (config.json + safetensors + tokenizer)")
    p.add_argument("--method", required=True,
                   choices=["magnitude", "wanda", "sparsegpt", "2:4", "heads", "channels", "layers"],
                   help="heads / channels / layers: structured, a smaller dense model (fewer attention heads, "
                        "a smaller intermediate_size, fewer blocks)")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="fraction of weights zeroed per layer (2:4: 0.5), or of heads / channels / blocks removed")
    p.add_argument("--calib", help="calibration text file or prepared data folder (wanda, sparsegpt, layers; "
                   "2:4, heads and channels optional)")
    p.add_argument("--calib-samples", type=int, default=32, help="number of calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window")
    g = p.add_argument_group("recovery")
    g.add_argument("--recover-steps", type=int, default=0,
                   help="then N steps of `llmkit finetune --method full` on text (causal LM loss on every token; "
                        "unstructured/2:4 zeros stay zero)")
    g.add_argument("--recover-data", help="text file or prepared data folder to recover on (default: --calib)")
    g.add_argument("--recover-alpha", type=float, default=0.0,
                   help="> 0: recover with `llmkit distill` from the unpruned model instead, this weight on the "
                        "KL (0: the finetune)")
    g.add_argument("--recover-lr", type=float, default=3e-4)
    g.add_argument("--recover-seq-len", type=int, default=64)
    g.add_argument("--recover-batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uuid
    from pathlib import Path

    import llmkit
    from llmkit.compress.calibration import load_calibration
    from llmkit.errors import InputError
    from llmkit.model.prune import prune_model

    if args.recover_steps < 0:
        raise InputError(f"--recover-steps must be >= 0, got {args.recover_steps}")
    if args.recover_steps and not (args.recover_data or args.calib):
        raise InputError("--recover-steps needs text to train on: --recover-data FILE (or --calib FILE)")
    model = llmkit.load_model(args.model)
    if not hasattr(model, "blocks"):
        raise InputError(f"{args.model} is not a decoder model; llmkit prune works on decoders")
    tokenizer = None
    if (Path(args.model) / "tokenizer.json").is_file():
        tokenizer = llmkit.load_tokenizer(args.model)
    calib = None
    if args.method in ("wanda", "sparsegpt", "layers") and not args.calib:
        raise InputError(f"--method {args.method} needs --calib FILE (text file or prepared data folder)")
    if args.calib:
        seq = min(args.calib_seq_len, model.config.block_size)
        calib = load_calibration(args.calib, tokenizer, args.calib_samples, seq)
    before = model.num_params()
    layers = prune_model(model, args.method, args.sparsity, calib, progress=True)
    out = Path(args.out)
    target = out.parent / f".{out.name}.pruned-{uuid.uuid4().hex[:8]}" if args.recover_steps else out
    model.save_pretrained(target)
    if tokenizer is not None:
        tokenizer.save(target)
    if args.method in STRUCTURED:
        what = {"heads": "attention heads", "channels": "MLP channels", "layers": "blocks"}[args.method]
        print(f"pruned {what}: {before:,} -> {model.num_params():,} parameters ({model.config.model_type} folder)")
    else:
        mean = sum(layers.values()) / max(len(layers), 1)
        print(f"pruned: {args.method}, {len(layers)} layers, {mean:.1%} of their weights zero")
    if args.recover_steps:
        r = recover(args, target, out, min(args.recover_seq_len, model.config.block_size),
                    keep=args.method not in STRUCTURED)
        print(f"recovered {r.step} steps: val loss {r.val_loss:.4f}")
    print(f"wrote {out}")
    return 0


def recover(args: argparse.Namespace, pruned, out, seq_len: int, keep: bool):
    """The recovery run on the pruned folder `pruned` (removed afterwards) into `out`: `llmkit finetune
    --method full --data-format text` (or `llmkit distill` from the unpruned model with --recover-alpha)."""
    import shutil

    data, steps, warm = args.recover_data or args.calib, args.recover_steps, max(1, args.recover_steps // 10)
    try:
        if args.recover_alpha > 0:
            from llmkit.train.distill import distill

            return distill(args.model, data, str(out), student=str(pruned), max_steps=steps,
                           alpha=args.recover_alpha, temperature=1.0, lr=args.recover_lr, seq_len=seq_len,
                           batch_size=args.recover_batch_size, keep_zeros=keep, warmup_steps=warm,
                           eval_interval=steps, overwrite=True)
        from llmkit.train.finetune import finetune

        return finetune(str(pruned), data, str(out), method="full", data_format="text", max_steps=steps,
                        lr=args.recover_lr, batch_size=args.recover_batch_size, max_seq_len=seq_len,
                        keep_zeros=keep, warmup_steps=warm, eval_interval=steps, weight_decay=0.0,
                        overwrite=True)
    finally:
        shutil.rmtree(pruned, ignore_errors=True)
