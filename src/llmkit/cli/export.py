"""`llmkit export gguf|onnx`: a model folder as a GGUF file (llama.cpp) or an ONNX folder (ONNX Runtime)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to GGUF (llama.cpp) or ONNX (ONNX Runtime)")
    fmts = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = fmts.add_parser("gguf", help="one .gguf file with weights, tokenizer and chat template",
                        description="Example: llmkit export gguf --model out/m --out m-q8_0.gguf --type q8_0")
    g.add_argument("--model", required=True, help="float model folder (Llama family, with tokenizer.json)")
    g.add_argument("--out", required=True, help="output .gguf file")
    g.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0", "q4_0"], help="weight format")
    g.set_defaults(func=run_gguf)
    o = fmts.add_parser("onnx", help="a decoder with KV-cache inputs/outputs for ONNX Runtime",
                        description="Example: llmkit export onnx --model out/m --out out/m-onnx; then "
                        "llmkit generate --model out/m-onnx --backend onnxruntime --prompt Hi")
    o.add_argument("--model", required=True, help="float model folder")
    o.add_argument("--out", required=True, help="output folder (model.onnx + config.json + tokenizer)")
    o.add_argument("--quantize", choices=["int8"], help="ONNX Runtime dynamic int8 quantization of the graph")
    o.add_argument("--opset", type=int, default=17)
    o.set_defaults(func=run_onnx)


def run_gguf(args: argparse.Namespace) -> int:
    from llmkit.compress.gguf import export_gguf

    path = export_gguf(args.model, args.out, args.type)
    print(f"wrote {path} ({args.type}, {path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def run_onnx(args: argparse.Namespace) -> int:
    import warnings

    from llmkit.compress.onnx import export_onnx

    with warnings.catch_warnings():  # the TorchScript exporter's tracer warnings are about branches we avoid
        warnings.simplefilter("ignore")
        path = export_onnx(args.model, args.out, quantize=args.quantize, opset=args.opset)
    print(f"wrote {path} (model.onnx{', int8' if args.quantize else ''})")
    return 0
