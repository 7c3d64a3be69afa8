"""Batch-1 decode speed and peak RSS of quantized llmkit models vs llama.cpp and ONNX Runtime, same weights.

Model: the Llama-shaped 58M of `bench_decode.py` (its `save_weights`: hidden 512, 8 layers, MHA, intermediate
1376, vocab 32000, random init std 0.05), greedy, 32-token prompt, `--new-tokens` new tokens. Engines, interleaved
in one process (the CPU is shared, so ratios within a run are what counts), median of `--reps`:
- llmkit fp32, int8 (per channel) and int4 (group 64) on llmkit's kernels (`llmkit/model/kernels.py`),
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

import bench_decode
import torch

PROMPT = bench_decode.PROMPT


def build(root: Path) -> dict[str, Path]:
    """`bench_decode.py`'s random-init weights + word-level tokenizer, then every engine's artefact."""
    import llmkit
    from llmkit.compress.gguf import export_gguf
    from llmkit.compress.onnx import export_onnx

    fp = root / "fp32"
    bench_decode.save_weights(str(fp))
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
        print("llama-cpp-python is not installed (pip install -e .[llamacpp]): llama.cpp rows skipped",
              file=sys.stderr)
    return out


def load(name: str, path: Path, threads: int):
    if name.startswith("llama.cpp"):
        return bench_decode.load_llama_cpp(path, threads)
    if name.startswith("onnxruntime"):
        from llmkit.compress.onnx import OrtModel

        return OrtModel(path, threads=threads)
    import llmkit

    return llmkit.load_model(path)


def decode(name: str, model, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """Wall and process-CPU seconds for n - 1 decode steps after the first token (prefill excluded),
    and the tokens."""
    start = []

    def mark() -> None:
        start.extend([time.perf_counter(), time.process_time()])

    if name.startswith("llama.cpp"):
        toks = bench_decode.llama_cpp_greedy(model, prompt, n, on_first=mark)
    else:
        from llmkit.infer.generate import Generator
        from llmkit.infer.sampling import SamplingParams

        gen = iter(Generator(model, [prompt], [SamplingParams(max_new_tokens=n, temperature=0.0)], set()))
        toks = [next(gen)[0].token_id]  # each step: one TokenEvent per row
        mark()
        for events in gen:
            toks.append(events[0].token_id)
    return time.perf_counter() - start[0], time.process_time() - start[1], toks


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
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    prompt = list(range(1, PROMPT + 1))
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp))
        engines = {name: load(name, p, args.threads) for name, p in paths.items()}
        for name, m in engines.items():  # warm-up (kernel packing, first-use copies)
            decode(name, m, prompt, 4)
        times: dict[str, list[float]] = {n: [] for n in engines}
        cpus: dict[str, list[float]] = {n: [] for n in engines}
        toks = {}
        for _ in range(args.reps):
            for name, m in engines.items():
                dt, cpu, toks[name] = decode(name, m, prompt, args.new_tokens)
                times[name].append(dt)
                cpus[name].append(cpu)
        res = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            res[name] = {"tok_s": (args.new_tokens - 1) / med, "ms_per_token": med / (args.new_tokens - 1) * 1e3,
                         "cpu_ms_per_token": statistics.median(cpus[name]) / (args.new_tokens - 1) * 1e3}
        if not args.no_memory:
            for name, p in paths.items():
                cmd = [sys.executable, __file__, "--child", name, "--path", str(p), "--new-tokens",
                       str(args.new_tokens), "--threads", str(args.threads)]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
                res[name]["peak_rss_mib"] = json.loads(line[-1])["peak_rss_mib"]
    fp, fp_cpu = res["llmkit fp32"]["tok_s"], res["llmkit fp32"]["cpu_ms_per_token"]
    print(f"batch 1, {args.new_tokens} new tokens, threads={args.threads}, median of {args.reps}")
    for name, r in res.items():
        mem = f", peak RSS {r['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in r else ""
        print(f"  {name:<18} {r['tok_s']:7.1f} tok/s ({r['ms_per_token']:.2f} ms/token, {r['tok_s'] / fp:.2f}x fp32; "
              f"CPU {r['cpu_ms_per_token']:.2f} ms/token, {fp_cpu / r['cpu_ms_per_token']:.2f}x fp32){mem}")
    for ours, theirs in (("llmkit int8", "llama.cpp q8_0"), ("llmkit int4", "llama.cpp q4_0")):
        if theirs in res:
            cpu = res[theirs]["cpu_ms_per_token"] / res[ours]["cpu_ms_per_token"]
            ratio = res[ours]["tok_s"] / res[theirs]["tok_s"]
            print(f"  {ours} / {theirs}: {ratio:.2f}x tok/s, {cpu:.2f}x by CPU time")
    same = toks["onnxruntime fp32"] == toks["llmkit fp32"]
    print(f"  ONNX Runtime greedy tokens {'equal' if same else 'DIFFER from'} llmkit fp32's")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
