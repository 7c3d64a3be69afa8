"""Perplexity against sparsity for magnitude, Wanda, SparseGPT (0-70%) and 2:4, one plot.

Model: stories260K (llama2.c). Its tokenizer and TinyStories text are not available offline, so as in
bench_quant_quality.py the held-out set is text the dense model samples (temperature 1, fixed seeds)
and calibration uses other samples: the perplexity measures drift from the dense model.

    python benchmarks/bench_prune.py --stories ../shared/data/stories260K/stories260K.bin --out out/prune-bench
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_quant_quality import perplexity  # the one held-out perplexity of the benchmarks

import llmkit
from llmkit.model.prune import prune_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stories", required=True, help="stories260K.bin")
    ap.add_argument("--calib", type=int, default=8, help="calibration windows")
    ap.add_argument("--held", type=int, default=8, help="held-out windows")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--out", default="out/prune-bench")
    args = ap.parse_args()
    base = llmkit.load_llama2c(args.stories)
    W = args.window
    samples = [torch.tensor([1] + llmkit.generate(base, [1], W - 1, temperature=1.0, seed=s, ignore_eos=True))
               for s in range(args.calib + args.held)]
    calib, held = torch.stack(samples[: args.calib]), torch.cat(samples[args.calib :])
    dense = perplexity(base, held, W, args.held)
    rows = [dict(method="dense", sparsity=0.0, ppl=dense)]
    print(json.dumps(rows[-1]), flush=True)
    for method in ("magnitude", "wanda", "sparsegpt"):
        for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
            m = llmkit.load_llama2c(args.stories)  # fresh (deepcopy fails on decode-packed copies)
            prune_model(m, method, s, calibration=calib)
            rows.append(dict(method=method, sparsity=s, ppl=perplexity(m, held, W, args.held)))
            print(json.dumps(rows[-1]), flush=True)
    for label, cal in (("2:4 (magnitude)", None), ("2:4 (wanda)", calib)):
        m = llmkit.load_llama2c(args.stories)  # fresh (deepcopy fails on decode-packed copies)
        prune_model(m, "2:4", calibration=cal)
        rows.append(dict(method=label, sparsity=0.5, ppl=perplexity(m, held, W, args.held)))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune.json").write_text(json.dumps(rows, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ("magnitude", "wanda", "sparsegpt"):
        pts = [(0.0, dense)] + [(r["sparsity"], r["ppl"]) for r in rows if r["method"] == method]
        ax.plot(*zip(*pts), marker="o", label=method)
    for r, mk in zip([r for r in rows if r["method"].startswith("2:4")], ("s", "D")):
        ax.scatter([0.5], [r["ppl"]], marker=mk, s=60, label=r["method"], zorder=3)
    ax.set(xlabel="sparsity of the block projections", ylabel="held-out perplexity (log)", yscale="log",
           title="stories260K: perplexity vs sparsity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "prune.png", dpi=110)
    print(f"\nwrote {out / 'prune.png'}")
    print("method      " + " ".join(f"{s:>7.0%}" for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)))
    for method in ("magnitude", "wanda", "sparsegpt"):
        print(f"{method:<11} " + " ".join(f"{r['ppl']:7.2f}" for r in rows if r["method"] == method))
    print(f"dense {dense:.2f}; " + "; ".join(f"{r['method']} {r['ppl']:.2f}" for r in rows if "2:4" in r["method"]))


if __name__ == "__main__":
    main()
