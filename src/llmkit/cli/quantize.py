"""`llmkit quantize --model DIR --dtype int8|int4 --method rtn|gptq|awq --out DIR`: a quantized model folder."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model to int8/int4 (RTN, GPTQ, AWQ, W8A8) into a folder load_model reads",
        description="Example: llmkit quantize --model out/m --dtype int4 --method gptq --calib data.txt --out out/m-q4",
    )
    p.add_argument("--model", required=True, help="float model folder (config.json + safetensors + tokenizer)")
    p.add_argument("--dtype", choices=["int8", "int4"], default="int8")
    p.add_argument("--method", choices=["rtn", "gptq", "awq", "w8a8"], default="rtn",
                   help="w8a8: int8 weights and activations with SmoothQuant (dtype ignored)")
    p.add_argument("--group-size", type=int, default=64, help="inputs per scale (0 = per output channel, int8 only)")
    p.add_argument("--calib", help="calibration text file or prepared data folder (gptq, awq, w8a8)")
    p.add_argument("--calib-samples", type=int, default=32, help="number of calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--skip", action="append", default=[],
                   help="keep float (repeatable): lm_head, embeddings, or a module name or prefix (blocks.0, "
                        "blocks.1.attn.qkv)")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ: quantize columns in their natural order")
    p.add_argument("--act-calib", choices=["dynamic", "kl"], default="dynamic",
                   help="w8a8 activation scales: per token at run time, or static from a KL-divergence search")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import llmkit
    from llmkit.compress.calibration import load_calibration
    from llmkit.errors import InputError
    from llmkit.model.quant import quantized_bytes

    model = llmkit.load_model(args.model)
    before = quantized_bytes(model)
    tokenizer = None
    if (Path(args.model) / "tokenizer.json").is_file():
        tokenizer = llmkit.load_tokenizer(args.model)
    calib = None
    if args.method != "rtn":
        if not args.calib:
            raise InputError(f"--method {args.method} needs --calib FILE (text file or prepared data folder)")
        seq = min(args.calib_seq_len, model.config.block_size)
        calib = load_calibration(args.calib, tokenizer, args.calib_samples, seq)
    model.quantize(args.dtype, group_size=args.group_size, method=args.method, calibration=calib,
                   skip=tuple(args.skip), act_order=not args.no_act_order, act_calib=args.act_calib,
                   progress=True)
    model.save_pretrained(args.out)
    if tokenizer is not None:  # the tokenizer and chat template travel with the weights
        tokenizer.save(args.out)
    after = quantized_bytes(model)
    print(f"wrote {args.out}: {args.method} {args.dtype if args.method != 'w8a8' else 'w8a8'}, "
          f"{before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB in memory")
    return 0
