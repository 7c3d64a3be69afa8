"""`llmkit prune --model DIR --method magnitude|wanda|sparsegpt|2:4 [--sparsity S] [--calib FILE] --out DIR`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a model's projections (magnitude, Wanda, SparseGPT, 2:4) into a normal model folder",
        description="Example: llmkit prune --model out/m --method wanda --sparsity 0.5 --calib data.txt "
                    "--out out/m-w50",
    )
    p.add_argument("--model", required=True, help="float model folder (config.json + safetensors + tokenizer)")
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt", "2:4", "channels"],
                   help="channels: structured, removes MLP channels (a smaller dense model)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights zeroed per layer (2:4: 0.5)")
    p.add_argument("--calib", help="calibration text file or prepared data folder (wanda, sparsegpt; 2:4 optional)")
    p.add_argument("--calib-samples", type=int, default=32, help="number of calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import llmkit
    from llmkit.compress.calibration import load_calibration
    from llmkit.errors import InputError
    from llmkit.model.prune import prune_model

    model = llmkit.load_model(args.model)
    if not hasattr(model, "blocks"):
        raise InputError(f"{args.model} is not a decoder model; llmkit prune works on decoders")
    tokenizer = None
    if (Path(args.model) / "tokenizer.json").is_file():
        tokenizer = llmkit.load_tokenizer(args.model)
    calib = None
    if args.method in ("wanda", "sparsegpt") and not args.calib:
        raise InputError(f"--method {args.method} needs --calib FILE (text file or prepared data folder)")
    if args.calib:
        seq = min(args.calib_seq_len, model.config.block_size)
        calib = load_calibration(args.calib, tokenizer, args.calib_samples, seq)
    layers = prune_model(model, args.method, args.sparsity, calib, progress=True)
    model.save_pretrained(args.out)
    if tokenizer is not None:
        tokenizer.save(args.out)
    mean = sum(layers.values()) / max(len(layers), 1)
    print(f"wrote {args.out}: {args.method}, {len(layers)} layers, {mean:.1%} of their weights zero")
    return 0
