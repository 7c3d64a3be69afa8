"""llmkit's int8 / int4 matmul kernels alone, batch 1, on the 33 weight matrices of the Llama-shaped 58M decode
benchmark (`bench_decode.py`: qkv 1536x512, proj 512x512, SwiGLU fc 2752x512, mlp proj 512x1376, x 8 layers,
and the LM head 32000x512), against the byte floor: the same number of bytes read by `torch.sum` (the fastest
plain read measured here), at each thread count.

A "step" calls the 33 kernels in model order through `kernels.QuantMatmul` (what `Int8Linear` / `Int4Linear`
call), as consecutive decode steps do: 42 MB of int8 weights do not fit the 32 MB last-level cache, so each
step streams them from memory. Random weights (int8 per channel, int4 group 64), one activation row per
call. Median of `--steps` steps, per-shape median per call. End-to-end decode figures, against llama.cpp's
whole step: `bench_quant_speed.py`.

    python benchmarks/bench_quant_kernels.py --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from llmkit.model import kernels

SHAPES = [("qkv", 1536, 512), ("proj", 512, 512), ("fc", 2752, 512), ("mlp proj", 512, 1376)] * 8
SHAPES += [("lm_head", 32000, 512)]


def layers(bits: int, lib) -> tuple[list[kernels.QuantMatmul], int]:
    """The 33 matrices as kernel calls, and the bytes each step reads (weights, scales, zero points, sums)."""
    torch.manual_seed(0)
    out, nbytes = [], 0
    for _, n, k in SHAPES:
        if bits == 8:
            w, s = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, 1) * 1e-3
            aux = kernels.int8_wsum(w, 1)
        else:
            g = k // 64 if k % 64 == 0 else k // 64 + 1
            w = torch.randint(0, 256, (n, g * 32), dtype=torch.uint8)
            s, aux = torch.rand(n, g) * 1e-3, torch.randint(0, 16, (n, g), dtype=torch.uint8)
        out.append(kernels.QuantMatmul(bits, w, s, aux, lib))
        nbytes += sum(t.numel() * t.element_size() for t in (w, s, aux))
    return out, nbytes


def run(bits: int, steps: int, lib) -> tuple[float, dict[str, float], float, int]:
    """(median step ms, median us per call by shape, floor ms, bytes per step)."""
    mms, nbytes = layers(bits, lib)
    xs = {k: torch.randn(1, k) for _, _, k in SHAPES}
    per: dict[str, list[float]] = {name: [] for name, _, _ in SHAPES}
    total = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for (name, _, k), mm in zip(SHAPES, mms):
            t = time.perf_counter()
            mm(xs[k])
            per[name].append(time.perf_counter() - t)
        total.append(time.perf_counter() - t0)
    floor_t = torch.rand(nbytes // 4)  # as many bytes, read by one plain reduction
    floor = []
    for _ in range(steps):
        t = time.perf_counter()
        floor_t.sum()
        floor.append(time.perf_counter() - t)
    return (statistics.median(total) * 1e3, {n: statistics.median(v) * 1e6 for n, v in per.items()},
            statistics.median(floor) * 1e3, nbytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    lib = kernels.build()
    if lib is None:
        raise SystemExit("llmkit's kernels could not be built (no C compiler?)")
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for bits in (8, 4):
            step, per, floor, nbytes = run(bits, args.steps, lib)
            calls = " ".join(f"{n} {us:.0f}" for n, us in per.items())
            print(f"threads={threads} int{bits}: step {step:.3f} ms for {nbytes / 1e6:.1f} MB "
                  f"({nbytes / step / 1e6:.0f} GB/s), byte floor {floor:.3f} ms ({nbytes / floor / 1e6:.0f} GB/s): "
                  f"{step / floor:.2f}x the floor; us per call: {calls}")


if __name__ == "__main__":
    main()
