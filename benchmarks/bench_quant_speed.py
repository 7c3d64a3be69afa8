"""Batch-1 decode speed and peak RSS of quantized llmkit models vs llama.cpp and ONNX Runtime, same weights.

Model: the Llama-shaped 58M of `bench_decode.py` (hidden 512, 8 layers, MHA, intermediate 1376, vocab
32000, random init std 0.05), greedy, 32-token prompt, `--new-tokens` new tokens. Engines, interleaved
in one process (the CPU is shared, so ratios within a run are what counts), median of `--reps`:
- llmkit fp32, int8 (per channel, `_weight_int8pack_mm`) and int4 (group 64, `_weight_int4pack_mm_for_cpu`),
  all projections, the LM head and the embeddings quantized;
- llama.cpp (llama-cpp-python) on `llmkit export gguf` files: q8_0 and q4_0 (skipped if not installed);
- ONNX Runtime on `llmkit export onnx`, driven by the same generation loop (fp32).
Peak RSS: each engine alone in a child process that loads its folder/file and decodes.

    python benchmarks/bench_quant_speed.py --threads 2 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HIDDEN, LAYERS, HEADS, INTER, VOCAB, PROMPT = 512, 8, 8, 1376, 32000, 32


def build(root: Path) -> dict[str, Path]:
    """Random-init weights + a word-level tokenizer, then every engine's artefact."""
    import transformers
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers

    import llmkit
    from llmkit.compress.gguf import export_gguf
    from llmkit.compress.onnx import export_onnx
    from llmkit.tokenizer import Tokenizer

    fp = root / "fp32"
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                   max_position_embeddings=1024, initializer_range=0.05, bos_token_id=None,
                                   eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(fp)
    raw = RawTokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    Tokenizer(raw, {}).save(fp)
    out = {"llmkit fp32": fp}
    for name, kind, g in (("llmkit int8", "int8", 0), ("llmkit int4", "int4", 64)):
        m = llmkit.load_model(fp)
        m.quantize(kind, group_size=g)
        m.save_pretrained(root / kind)
        out[name] = root / kind
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["onnxruntime fp32"] = export_onnx(fp, root / "onnx")
    try:
        import llama_cpp  # noqa: F401

        for q in ("q8_0", "q4_0"):
            out[f"llama.cpp {q}"] = export_gguf(fp, root / f"m-{q}.gguf", q)
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp rows skipped", file=sys.stderr)
    return out


def load(name: str, path: Path, threads: int):
    if name.startswith("llama.cpp"):
        import llama_cpp

        return llama_cpp.Llama(str(path), n_ctx=256, n_threads=threads, n_batch=64, verbose=False)
    if name.startswith("onnxruntime"):
        from llmkit.compress.onnx import OrtModel

        return OrtModel(path, threads=threads)
    import llmkit

    return llmkit.load_model(path)


def decode(name: str, model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Seconds for n - 1 decode steps after the first token (prefill excluded), and the tokens."""
    if name.startswith("llama.cpp"):
        import numpy as np

        model.reset()
        model.eval(prompt)
        toks = [int(np.argmax(model.scores[model.n_tokens - 1]))]
        t = time.perf_counter()
        for _ in range(n - 1):
            model.eval([toks[-1]])
            toks.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        return time.perf_counter() - t, toks
    from llmkit.infer.generate import Generator
    from llmkit.infer.sampling import SamplingParams

    gen = iter(Generator(model, [prompt], [SamplingParams(max_new_tokens=n, temperature=0.0)], set()))
    toks = [next(gen)[0].token_id]  # each step: one TokenEvent per row
    t = time.perf_counter()
    for events in gen:
        toks.append(events[0].token_id)
    return time.perf_counter() - t, toks


def child(name: str, path: str, n: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model = load(name, Path(path), threads)
    decode(name, model, list(range(1, PROMPT + 1)), n)
    with open("/proc/self/status") as f:
        hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mib": hwm_kib / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.path, args.new_tokens, args.threads)
    torch.set_num_threads(args.threads)
    prompt = list(range(1, PROMPT + 1))
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp))
        engines = {name: load(name, p, args.threads) for name, p in paths.items()}
        for name, m in engines.items():  # warm-up (kernel packing, first-use copies)
            decode(name, m, prompt, 4)
        times: dict[str, list[float]] = {n: [] for n in engines}
        toks = {}
        for _ in range(args.reps):
            for name, m in engines.items():
                dt, toks[name] = decode(name, m, prompt, args.new_tokens)
                times[name].append(dt)
        res = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            res[name] = {"tok_s": (args.new_tokens - 1) / med, "ms_per_token": med / (args.new_tokens - 1) * 1e3}
        if not args.no_memory:
            for name, p in paths.items():
                cmd = [sys.executable, __file__, "--child", name, "--path", str(p), "--new-tokens",
                       str(args.new_tokens), "--threads", str(args.threads)]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
                res[name]["peak_rss_mib"] = json.loads(line[-1])["peak_rss_mib"]
    fp = res["llmkit fp32"]["tok_s"]
    print(f"batch 1, {args.new_tokens} new tokens, threads={args.threads}, median of {args.reps}")
    for name, r in res.items():
        mem = f", peak RSS {r['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in r else ""
        print(f"  {name:<18} {r['tok_s']:7.1f} tok/s ({r['ms_per_token']:.2f} ms/token, {r['tok_s'] / fp:.2f}x fp32)"
              f"{mem}")
    for ours, theirs in (("llmkit int8", "llama.cpp q8_0"), ("llmkit int4", "llama.cpp q4_0")):
        if theirs in res:
            print(f"  {ours} / {theirs}: {res[ours]['tok_s'] / res[theirs]['tok_s']:.2f}x")
    same = toks["onnxruntime fp32"] == toks["llmkit fp32"]
    print(f"  ONNX Runtime greedy tokens {'equal' if same else 'DIFFER from'} llmkit fp32's")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
