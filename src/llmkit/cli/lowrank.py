"""`llmkit lowrank --model DIR (--rank R | --energy E) [--calib FILE] --out DIR`,
`llmkit lowrank merge --model DIR --out DIR`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lowrank",
        help="SVD-factorise a model's projections into two smaller Linears (or `merge` back to dense)",
        description="Examples: llmkit lowrank --model out/m --energy 0.9 --out out/m-lr ; "
                    "llmkit lowrank merge --model out/m-lr --out out/m-dense",
    )
    p.add_argument("action", nargs="?", choices=["merge"], help="merge: multiply the factors back into dense Linears")
    p.add_argument("--model", required=True, help="model folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int, help="the rank of every factorised layer (capped at min(in, out))")
    g.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this fraction of sum S^2")
    p.add_argument("--lm-head", action="store_true", help="factorise the LM head too")
    p.add_argument("--calib", help="calibration text file or prepared data folder: activation-aware SVD (ASVD)")
    p.add_argument("--calib-samples", type=int, default=32, help="number of calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--alpha", type=float, default=0.5, help="ASVD: scale s_j = mean|X_j|^alpha")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import llmkit
    from llmkit.errors import InputError
    from llmkit.model.lowrank import lowrank_model, merge_lowrank

    model = llmkit.load_model(args.model)
    if not hasattr(model, "blocks"):
        raise InputError(f"{args.model} is not a decoder model; llmkit lowrank works on decoders")
    before = model.num_params()
    if args.action == "merge":
        if args.rank is not None or args.energy is not None:
            raise InputError("lowrank merge takes no --rank/--energy")
        if not getattr(model, "lowrank", None):
            raise InputError(f"{args.model} has no low-rank layers (config.json has no 'lowrank' section)")
        merge_lowrank(model)
    else:
        if args.rank is None and args.energy is None:
            raise InputError("llmkit lowrank needs --rank R or --energy E")
        calib = None
        if args.calib:
            from llmkit.compress.calibration import load_calibration

            tok = llmkit.load_tokenizer(args.model) if (Path(args.model) / "tokenizer.json").is_file() else None
            calib = load_calibration(args.calib, tok, args.calib_samples,
                                     min(args.calib_seq_len, model.config.block_size))
        ranks = lowrank_model(model, args.rank, args.energy, skip=() if args.lm_head else ("lm_head",),
                              calibration=calib, alpha=args.alpha)
        lo, hi = min(ranks.values(), default=0), max(ranks.values(), default=0)
        print(f"factorised {len(ranks)} layers, ranks {lo}..{hi}")
    model.save_pretrained(args.out)
    if (Path(args.model) / "tokenizer.json").is_file():
        llmkit.load_tokenizer(args.model).save(args.out)
    print(f"wrote {args.out}: {before:,} -> {model.num_params():,} parameters")
    return 0
