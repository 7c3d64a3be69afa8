"""Compression on a model llmkit pretrained on tiny Shakespeare (issue #13's figures).

Needs the teacher first (configs/shakespeare-char-llmkit.yaml, here 1500 steps):
    llmkit pretrain --config configs/shakespeare-char-llmkit.yaml --out_dir out/shk --max_iters 1500 \
        --train.lr_decay_iters 1500
    nice -n 10 python benchmarks/bench_compress.py --model out/shk --out out/compress-bench \
        --only distill prune structured lowrank variants
    python benchmarks/bench_compress.py --model out/shk --out out/compress-bench --only report   # timed
    python benchmarks/bench_compress.py --out out/compress-bench --markdown                      # the tables

1. distillation: a half-size student (2 of 4 blocks) distilled from it (alpha 0.5, T 2) against the same
   student trained from scratch (alpha 0: cross-entropy only) on the same windows and steps; both
   held-out curves in one plot.
2. pruning: perplexity against sparsity (0-70%) for magnitude, Wanda, SparseGPT, and 2:4. The docs' figures
   use a wider, longer-trained model (on the 0.8M one Wanda loses to magnitude, see docs/compress.md):
       llmkit pretrain --config configs/shakespeare-char-192.yaml --out_dir out/shk192
       nice -n 10 python benchmarks/bench_compress.py --model out/shk192 --out out/prune-bench-192 \
           --only prune prune-diag
3. structured: heads and channels at 25% / 50%, perplexity before and after recovery
   (`--recover-steps 100`: `llmkit finetune --method full` on the text); `--only structured-speed`
   (timed: run it under chrt) adds decode tok/s of each folder.
   `--only prune-diag`: why Wanda does or does not beat magnitude (comparison groups, sequential vs one
   shot, calibration size, per-layer mixes, the spread of the input-channel norms ||X_j||).
4. low-rank: perplexity and parameters against rank, plain SVD and ASVD.
5. `llmkit compress report` over a set of the folders.
Held-out = the first --held tokens of the teacher's validation split (the last 10% of the text,
never trained on), in non-overlapping 64-token windows; calibration = 32 windows of the train split.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import llmkit
from llmkit.model.lowrank import lowrank_model
from llmkit.model.prune import _collect, lowest_mask, prune_model, prune_targets, wanda_score
from llmkit.train.distill import distill
from llmkit.train.finetune import finetune
from llmkit.train.trainer import lm_loss

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def ppl(model, held: np.ndarray, T: int = 64) -> float:
    n = (len(held) - 1) // T
    x = torch.from_numpy(held[: n * T + 1].astype(np.int64))
    nll = 0.0
    with torch.no_grad():
        for i in range(0, n, 64):
            idx = range(i, min(n, i + 64))
            xb = torch.stack([x[j * T : j * T + T] for j in idx])
            yb = torch.stack([x[j * T + 1 : j * T + T + 1] for j in idx])
            nll += float(lm_loss(model(xb), yb, reduction="sum"))
    return math.exp(nll / (n * T))


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "llmkit", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def markdown(results: dict) -> str:
    """The figures as Markdown tables (for docs/compress.md and docs/benchmarks.md)."""
    d = results["dense"]
    lines = [f"Teacher: {d['params']:,} parameters, held-out perplexity {d['ppl']:.3f}. Load: {results['uptime']}", ""]
    if "distill" in results:
        lines += ["| student (2 blocks) | parameters | held-out perplexity | final val loss | seconds |",
                  "|---|---|---|---|---|"]
        for name, r in results["distill"].items():
            lines.append(f"| {name} | {r['params']:,} | {r['held_ppl']:.3f} | {r['curve'][-1][1]:.4f} | "
                         f"{r['seconds']:.0f} |")
        lines.append("")
    if "prune" in results:
        sp = sorted({r["sparsity"] for r in results["prune"] if r["method"] in ("magnitude", "wanda", "sparsegpt")})
        lines += ["| method | " + " | ".join(f"{int(100 * s)}%" for s in sp) + " |", "|---|" + "---|" * len(sp)]
        for m in ("magnitude", "wanda", "sparsegpt"):
            by = {r["sparsity"]: r["ppl"] for r in results["prune"] if r["method"] == m}
            lines.append(f"| {m} | " + " | ".join(f"{by[s]:.3f}" for s in sp) + " |")
        for r in results["prune"]:
            if r["method"].startswith("2:4"):
                lines.append(f"| {r['method']} | " + " | ".join(f"{r['ppl']:.3f}" if s == 0.5 else "" for s in sp)
                             + " |")
        lines.append("")
    if "structured" in results:
        speed = results.get("structured_speed", {})

        def tps(name: str) -> str:
            return f"{speed[name]:.0f}" if name in speed else "-"
        lines += ["| removed | parameters | perplexity pruned | after recovery | decode tok/s |",
                  "|---|---|---|---|---|",
                  f"| none (dense) | {d['params']:,} | {d['ppl']:.3f} | - | {tps('base')} |"]
        by = {(r["method"], r["removed"], r["stage"]): r for r in results["structured"]}
        for (m, s, stage), r in by.items():
            if stage == "pruned":
                rec = by[(m, s, "recovered")]
                lines.append(f"| {int(100 * s)}% {m} | {r['params']:,} | {r['ppl']:.3f} | {rec['ppl']:.3f} | "
                             f"{tps(r['folder'])} / {tps(rec['folder'])} |")
        lines.append("")
    if "prune_diag" in results:
        lines += ["| 50% sparsity | perplexity |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in results["prune_diag"]["ppl"].items()]
        lines += ["", "| layer | max/median of norm(X_j) |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in results["prune_diag"]["spread"].items()]
        lines.append("")
    if "lowrank" in results:
        lines += ["| rank | parameters | SVD perplexity | ASVD perplexity |", "|---|---|---|---|"]
        for r in sorted({r["rank"] for r in results["lowrank"]}):
            by = {x["method"]: x for x in results["lowrank"] if x["rank"] == r}
            lines.append(f"| {r} | {by['svd']['params']:,} | {by['svd']['ppl']:.3f} | {by['asvd']['ppl']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def calib_windows(data: Path, n: int, T: int = 64) -> torch.Tensor:
    """`n` windows of `T` tokens evenly spaced over a prepared folder's train split: [n, T]."""
    train = np.fromfile(data / "train.bin", dtype=np.uint16)
    starts = np.linspace(0, len(train) - T - 1, n).astype(int)
    return torch.from_numpy(np.stack([train[s : s + T] for s in starts]).astype(np.int64))


def prune_diag(base_dir: Path, calib: torch.Tensor, held: np.ndarray, s: float = 0.5) -> dict:
    """Why Wanda does or does not beat magnitude, at sparsity `s` (held-out perplexity):
    - each score (|W|, Wanda's |W|*||X||) with each comparison group: per output row (Wanda's), per
      Hugging Face Linear (magnitude's: q, k, v, gate, up separately) and per fused llmkit layer;
    - Wanda with its statistics from the dense model (one shot) instead of block by block on the
      already-pruned model (sequential, the paper's code), and with more calibration windows;
    - Wanda on one kind of projection, magnitude on the rest;
    and, per layer, the spread max/median of the input-channel norms ||X_j|| (Wanda's weighting)."""
    from llmkit.model.prune import hf_parts, parts_mask
    from llmkit.model.quant import sequential_groups  # the block order of prune_model

    T = calib.shape[1]

    def run(score_of, group_of, cal: torch.Tensor = calib, sequential: bool = True) -> float:
        m = llmkit.load_model(base_dir)
        m.eval()
        names = prune_targets(m)
        with torch.no_grad():
            dense = None if sequential else _collect(m, names, list(cal[:, None]), "wanda")
            for group in sequential_groups(m, names):
                stats = _collect(m, group, list(cal[:, None]), "wanda") if sequential else dense
                for name in group:
                    lin = m.get_submodule(name)
                    w = lin.weight.detach().float()
                    score, g = score_of(name, w, stats[name]["x_norm"]), group_of(name)
                    mask = (lowest_mask(score, int(round(s * w.shape[1])), dim=1) if g == "row"
                            else parts_mask(score, s, hf_parts(m, name) if g == "linear" else None))
                    lin.weight.copy_(w.masked_fill(mask, 0))
        return ppl(m, held, T)

    def mag(_n, w, _x):
        return w.abs()

    def wanda(_n, w, x):
        return wanda_score(w, x)

    groups = {"row": "per output row", "linear": "per Hugging Face Linear", "fused": "per fused llmkit layer"}
    out = {}
    for label, score in (("magnitude", mag), ("Wanda", wanda)):
        for g, words in groups.items():
            out[f"{label} {words}"] = run(score, lambda n, g=g: g)
            print(json.dumps({k: round(v, 4) for k, v in out.items()}), flush=True)
    out["Wanda per output row, statistics from the dense model (one shot)"] = run(wanda, lambda n: "row",
                                                                                  sequential=False)
    for n in (128, 512):  # more windows, evenly spaced over the train split like `calib`
        more = calib_windows(base_dir / "data", n, T)
        out[f"Wanda per output row, {n} x {T} calibration tokens"] = run(wanda, lambda n: "row", cal=more)
    for kind in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"):
        out[f"Wanda (per row) on {kind} only, magnitude (per Linear) on the rest"] = run(
            lambda n, w, x, k=kind: wanda_score(w, x) if n.endswith(k) else w.abs(),
            lambda n, k=kind: "row" if n.endswith(k) else "linear")
    print(json.dumps({k: round(v, 4) for k, v in out.items()}), flush=True)
    spread = {}
    m = llmkit.load_model(base_dir)
    stats = _collect(m, prune_targets(m), list(calib[:, None]), "wanda")
    for name, st in stats.items():
        x = st["x_norm"]
        spread[name] = float(x.max() / x.median())
    return {"ppl": out, "spread": spread}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="out/shk")
    ap.add_argument("--out", default="out/compress-bench")
    ap.add_argument("--held", type=int, default=32768)
    ap.add_argument("--distill-steps", type=int, default=500)
    ap.add_argument("--recover-steps", type=int, default=100)
    ap.add_argument("--speed-rounds", type=int, default=5)
    ap.add_argument("--recover-lr", type=float, default=3e-4)
    ap.add_argument("--calib-windows", type=int, default=32, help="calibration windows of 64 train tokens")
    ap.add_argument("--only", nargs="*", default=["distill", "prune", "structured", "lowrank", "variants", "report"])
    ap.add_argument("--markdown", action="store_true", help="print the tables of --out/results.json and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads((Path(args.out) / "results.json").read_text())))
        return
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_dir, data = Path(args.model), Path(args.model) / "data"
    held = np.fromfile(data / "val.bin", dtype=np.uint16)[: args.held]
    calib = calib_windows(data, args.calib_windows)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    base = llmkit.load_model(base_dir)
    results["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results["dense"] = {"ppl": ppl(base, held), "params": base.num_params()}
    print(json.dumps(results["dense"]), flush=True)

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    if "distill" in args.only:  # 1. distilled vs scratch, same student init, windows and steps
        student = {"n_layer": 2, "n_head": 4, "n_kv_head": 4, "n_embd": 128, "intermediate_size": 352,
                   "mlp": "swiglu", "norm": "rmsnorm", "pos": "rope", "tie_embeddings": True, "model_type": "llama"}
        runs = {}
        for name, alpha in (("distilled", 0.5), ("scratch", 0.0)):
            t0 = time.time()
            r = distill(str(base_dir), str(data), str(out / f"student-{name}"), student_config=student,
                        max_steps=args.distill_steps, alpha=alpha, temperature=2.0, lr=2e-3, batch_size=12,
                        seq_len=64, eval_interval=50, eval_iters=20, num_threads=1, overwrite=True, progress=False)
            s = llmkit.load_model(out / f"student-{name}")
            runs[name] = {"curve": [(m["step"], m["val_loss"]) for m in r.metrics], "held_ppl": ppl(s, held),
                          "params": s.num_params(), "seconds": time.time() - t0}
            print(name, json.dumps({k: v for k, v in runs[name].items() if k != "curve"}), flush=True)
        results["distill"] = runs
        save()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in runs.items():
            label = f"{name} (held-out ppl {r['held_ppl']:.2f})"
            ax.plot(*zip(*r["curve"], strict=True), marker="o", ms=3, label=label)
        ax.axhline(math.log(results["dense"]["ppl"]), color="gray", ls="--", label="teacher")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(f"2-block student ({runs['scratch']['params']:,} params) of a 4-block teacher")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "distill.png", dpi=110)

    if "prune" in args.only:  # 2. perplexity against sparsity
        rows = []
        for method in ("magnitude", "wanda", "sparsegpt"):
            for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
                m = llmkit.load_model(base_dir)
                prune_model(m, method, s, calibration=calib)
                rows.append({"method": method, "sparsity": s, "ppl": ppl(m, held)})
                print(json.dumps(rows[-1]), flush=True)
        for label, cal in (("2:4 (magnitude)", None), ("2:4 (wanda)", calib)):
            m = llmkit.load_model(base_dir)
            prune_model(m, "2:4", calibration=cal)
            rows.append({"method": label, "sparsity": 0.5, "ppl": ppl(m, held)})
            print(json.dumps(rows[-1]), flush=True)
        results["prune"] = rows
        save()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for method in ("magnitude", "wanda", "sparsegpt"):
            pts = [(0.0, results["dense"]["ppl"])] + [(r["sparsity"], r["ppl"]) for r in rows if r["method"] == method]
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        for r, mk in zip([r for r in rows if r["method"].startswith("2:4")], ("s", "D"), strict=True):
            ax.scatter([0.5], [r["ppl"]], marker=mk, s=50, zorder=3, label=r["method"])
        ax.set_yscale("log")
        ax.set_xlabel("sparsity of the block projections")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"Pruning a Shakespeare char model ({results['dense']['params'] / 1e6:.1f}M parameters)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "prune.png", dpi=110)

    if "structured" in args.only:  # 3. heads / channels, before and after recovery
        # the same steps as `llmkit prune --method M --sparsity S --calib D --recover-steps R` (recovery:
        # `llmkit finetune --method full --data-format text`), in this process (one thread: the box is shared)
        rows = []
        for method, levels in (("heads", (0.25, 0.5)), ("channels", (0.25, 0.5))):
            for s in levels:
                d0, d1 = out / f"{method}{int(s * 100)}", out / f"{method}{int(s * 100)}-rec"
                m = llmkit.load_model(base_dir)
                prune_model(m, method, s, calibration=calib)
                m.save_pretrained(d0)
                llmkit.load_tokenizer(base_dir).save(d0)
                finetune(str(d0), str(data), str(d1), method="full", data_format="text", max_steps=args.recover_steps,
                         lr=args.recover_lr, batch_size=12, max_seq_len=64, eval_interval=args.recover_steps,
                         warmup_steps=max(1, args.recover_steps // 10), num_threads=1, overwrite=True,
                         progress=False)
                for label, d in (("pruned", d0), ("recovered", d1)):
                    m = llmkit.load_model(d)
                    rows.append({"method": method, "removed": s, "stage": label, "ppl": ppl(m, held),
                                 "params": m.num_params(), "folder": d.name})
                    print(json.dumps(rows[-1]), flush=True)
        results["structured"] = rows
        save()

    if "structured-speed" in args.only:  # 3b. decode tok/s (batch 1, 64 new tokens), round-robin, median
        from llmkit.eval.compress_report import measure

        names = ["base"] + [f"{m}{p}{r}" for m in ("heads", "channels") for p in (25, 50) for r in ("", "-rec")]
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.speed_rounds):
            for n in names:
                row = measure(base_dir if n == "base" else out / n, None, new_tokens=64, repeats=1)
                times[n].append(row["decode_tokens_per_s"])
        results["structured_speed"] = {n: float(np.median(v)) for n, v in times.items()}
        results["structured_speed_uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(json.dumps(results["structured_speed"]), flush=True)
        save()

    if "prune-diag" in args.only:  # 2b. Wanda vs magnitude at 50%: comparison groups and where Wanda loses
        results["prune_diag"] = prune_diag(base_dir, calib, held)
        print(json.dumps(results["prune_diag"], indent=1), flush=True)
        save()

    if "lowrank" in args.only:  # 4. perplexity and parameters against rank
        rows = []
        for r in (16, 32, 64, 96):
            for label, cal in (("svd", None), ("asvd", calib)):
                m = llmkit.load_model(base_dir)
                lowrank_model(m, rank=r, calibration=cal)
                rows.append({"rank": r, "method": label, "ppl": ppl(m, held), "params": m.num_params()})
                print(json.dumps(rows[-1]), flush=True)
        results["lowrank"] = rows
        save()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label in ("svd", "asvd"):
            pts = [(r["params"], r["ppl"]) for r in rows if r["method"] == label]
            ax.plot(*zip(*pts, strict=True), marker="o", label=label.upper())
            for r in rows:
                if r["method"] == label:
                    ax.annotate(f"r{r['rank']}", (r["params"], r["ppl"]), fontsize=7)
        ax.scatter([results["dense"]["params"]], [results["dense"]["ppl"]], color="k", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("Low-rank block projections (rank annotated)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "lowrank.png", dpi=110)

    v = out / "variants"
    if "variants" in args.only:  # 5a. the other folders of the report
        cli("prune", "--model", str(base_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", str(data),
            "--calib-samples", "32", "--calib-seq-len", "64", "--out", str(v / "wanda50"))
        cli("prune", "--model", str(base_dir), "--method", "2:4", "--calib", str(data), "--calib-samples", "32",
            "--calib-seq-len", "64", "--out", str(v / "2-4"))
        cli("lowrank", "--model", str(base_dir), "--rank", "64", "--calib", str(data), "--calib-samples", "32",
            "--calib-seq-len", "64", "--out", str(v / "asvd-r64"))
        cli("prune", "--model", str(base_dir), "--method", "layers", "--sparsity", "0.25", "--calib", str(data),
            "--calib-samples", "32", "--calib-seq-len", "64", "--out", str(v / "layers25"))
        cli("quantize", "--model", str(base_dir), "--dtype", "int8", "--group-size", "0", "--out", str(v / "int8"))
        cli("quantize", "--model", str(base_dir), "--dtype", "int4", "--method", "gptq", "--group-size", "64",
            "--calib", str(data), "--calib-samples", "32", "--calib-seq-len", "64", "--out", str(v / "gptq-int4"))
    if "report" in args.only:  # 5b. the table, from the command (run it without `nice`: it times decoding)
        folders = [str(v / n) for n in ("wanda50", "2-4", "asvd-r64", "layers25", "int8", "gptq-int4")]
        folders += [str(out / n) for n in ("heads25-rec", "heads50-rec", "channels25-rec", "channels50-rec",
                                           "student-distilled") if (out / n / "config.json").is_file()]
        subprocess.run([sys.executable, "-m", "llmkit", "compress", "report", "--model", str(base_dir), "--variants",
                        *folders, "--data", str(data), "--max-tokens", "8192", "--seq-len", "64",
                        "--out", str(out / "report")], check=True)


if __name__ == "__main__":
    main()
