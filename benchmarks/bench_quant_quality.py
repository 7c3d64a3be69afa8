"""Held-out perplexity of quantized models: fp32, int8 RTN, int4 RTN / GPTQ / AWQ (group 64 and 128), W8A8.

Two models:
- a char-level Llama llmkit pretrained on tiny Shakespeare (`configs/shakespeare-char-llmkit.yaml`);
  calibration = windows of the training text (first 90%), held-out = the last 10% (the val split);
- stories260K (llama2.c). Its tokenizer and TinyStories text are not available offline, so the
  held-out set is text the fp32 model itself samples (temperature 1, fixed seeds) and calibration
  uses other samples: the perplexity shows how far each quantized model drifts from fp32.

    llmkit pretrain --config configs/shakespeare-char-llmkit.yaml \
        --data ../shared/data/tinyshakespeare/input.txt --out_dir out/shakespeare-char-llmkit
    python benchmarks/bench_quant_quality.py --shakespeare out/shakespeare-char-llmkit --windows 2000 \
        --stories ../shared/data/stories260K/stories260K.bin --calib 32 --int8-skip blocks.0 blocks.1.attn.qkv

`--only int4` runs the variants whose label contains a string; `--int8-skip` adds int8 RTN and GPTQ g32 rows
that keep those modules float (the mixed-precision settings for stories260K's 0.5% target). Each GPTQ/AWQ
share of the RTN gap is printed with its bootstrap spread over the held-out windows (`--bootstrap`): on
stories260K 24 held-out stories give a std of 3-4 points, 192 (the default) about 1 (docs/log.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F

import llmkit


@torch.no_grad()
def window_nll(model, tokens: torch.Tensor, window: int, max_windows: int) -> torch.Tensor:
    """Mean NLL per token [n] of each non-overlapping window of `tokens` (each predicts window-1 next tokens)."""
    n = min(max_windows, len(tokens) // window)  # each window holds its own targets
    x = tokens[: n * window].view(n, window)
    out = []
    for i in range(0, n, 16):
        batch = x[i : i + 16]
        logits = model(batch[:, :-1])
        nll = F.cross_entropy(logits.flatten(0, 1).double(), batch[:, 1:].flatten(), reduction="none")
        out.append(nll.view(len(batch), -1).mean(1))
    return torch.cat(out)


def perplexity(model, tokens: torch.Tensor, window: int, max_windows: int) -> float:
    """exp(mean NLL) over non-overlapping windows of `tokens`."""
    return math.exp(window_nll(model, tokens, window, max_windows).mean().item())


def gap_closed(fp: torch.Tensor, rtn: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Share of int4 RTN's perplexity gap a method closes, from per-window mean NLLs [..., n] (same windows)."""
    fp, rtn, q = (t.mean(-1).exp() for t in (fp, rtn, q))
    return (rtn - q) / (rtn - fp)


def bootstrap_interval(fp, rtn, q, reps: int, seed: int = 0) -> tuple[float, float, float]:
    """Std and 5%/95% quantiles of `gap_closed` over `reps` resamples (with replacement) of the windows."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, fp.shape[0], (reps, fp.shape[0]), generator=g)
    share = gap_closed(fp[idx], rtn[idx], q[idx])
    return share.std().item(), share.quantile(0.05).item(), share.quantile(0.95).item()


def change_interval(fp: torch.Tensor, q: torch.Tensor, reps: int, seed: int = 0) -> tuple[float, float]:
    """5%/95% quantiles of the perplexity change q/fp - 1 over `reps` resamples of the windows."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, fp.shape[0], (reps, fp.shape[0]), generator=g)
    change = (q[idx].mean(-1) - fp[idx].mean(-1)).exp() - 1
    return change.quantile(0.05).item(), change.quantile(0.95).item()


def variants():
    yield "fp32", None
    yield "int8 RTN (per channel)", dict(dtype="int8", group_size=0, method="rtn")
    yield "int8 RTN (g64)", dict(dtype="int8", group_size=64, method="rtn")
    yield "int8 RTN (g32)", dict(dtype="int8", group_size=32, method="rtn")
    if INT8_SKIP:
        for m in ("rtn", "gptq"):
            yield f"int8 {m.upper()} (g32, float {'+'.join(INT8_SKIP)})", dict(dtype="int8", group_size=32, method=m,
                                                                               skip=tuple(INT8_SKIP))
    yield "W8A8 SmoothQuant (dynamic)", dict(dtype="int8", method="w8a8")
    for g in (64, 128):
        for m in ("rtn", "gptq", "awq"):
            yield f"int4 {m.upper()} (g{g})", dict(dtype="int4", group_size=g, method=m)


def run(name: str, base, held: torch.Tensor, calib: torch.Tensor, window: int, max_windows: int) -> list[dict]:
    rows = []
    for label, kw in variants():
        if kw is not None and ONLY and not any(o in label for o in ONLY):
            continue
        model = copy.deepcopy(base)
        t = time.perf_counter()
        if kw is not None:
            model.quantize(kw["dtype"], kw.get("group_size", 64), kw["method"], calibration=calib,
                           skip=("embeddings",) + kw.get("skip", ()))
        dt = time.perf_counter() - t
        nll = window_nll(model, held, window, max_windows)
        ppl = math.exp(nll.mean().item())
        rows.append(dict(model=name, variant=label, ppl=ppl, quantize_s=dt))
        print(json.dumps(rows[-1]), flush=True)
        rows[-1]["nll"] = nll
    fp = rows[0]["ppl"]
    rtn = {r["variant"].split("(")[1]: r for r in rows if r["variant"].startswith("int4 RTN")}
    n = len(rows[0]["nll"])
    print(f"\n{name}: perplexity ({n} held-out windows), change vs fp32, share of int4 RTN's gap closed"
          + (f" (bootstrap over the windows, {BOOTSTRAP} resamples: std, 5-95%)" if BOOTSTRAP else ""))
    for r in rows:
        line = f"  {r['variant']:<34} {r['ppl']:8.4f}  {100 * (r['ppl'] / fp - 1):+7.2f}%"
        g = r["variant"].split("(")[-1]
        if r["variant"].startswith("int4") and "RTN" not in r["variant"] and g in rtn and rtn[g]["ppl"] > fp:
            base, ref = rows[0]["nll"], rtn[g]["nll"]
            line += f"   closes {100 * gap_closed(base, ref, r['nll']).item():5.1f}% of the RTN gap"
            if BOOTSTRAP:
                sd, lo, hi = bootstrap_interval(base, ref, r["nll"], BOOTSTRAP)
                line += f"  (std {100 * sd:4.1f}, {100 * lo:5.1f}-{100 * hi:5.1f}%)"
        elif BOOTSTRAP and not r["variant"].startswith(("fp32", "int4")):
            lo, hi = change_interval(rows[0]["nll"], r["nll"], BOOTSTRAP)
            line += f"   (5-95%: {100 * lo:+.2f}% .. {100 * hi:+.2f}%)"
        print(line)
    if SAVE:
        torch.save({r["variant"]: r["nll"] for r in rows}, f"{SAVE}.{name.split()[0]}.pt")
    return rows


def shakespeare(folder: str, n_calib: int, max_windows: int) -> list[dict]:
    model = llmkit.load_model(folder)
    tok = llmkit.load_tokenizer(folder)
    text = open(TEXT, encoding="utf-8").read()
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    split = int(0.9 * len(ids))
    train, held = ids[:split], ids[split:]
    W = model.config.block_size
    starts = torch.linspace(0, len(train) - W - 1, n_calib).long()
    calib = torch.stack([train[s : s + W] for s in starts])
    return run("shakespeare-char (llmkit)", model, held, calib, W, max_windows)


def stories(path: str, n_calib: int, n_held: int = 192) -> list[dict]:
    model = llmkit.load_llama2c(path)
    W = 256
    samples = []
    for seed in range(n_calib + n_held):
        out = llmkit.generate(model, [1], W - 1, temperature=1.0, seed=seed, ignore_eos=True)
        samples.append(torch.tensor([1] + out))
    calib = torch.stack(samples[:n_calib])
    held = torch.cat(samples[n_calib:])
    return run("stories260K", model, held, calib, W, n_held)  # one window per story


TEXT = "../shared/data/tinyshakespeare/input.txt"
ONLY: list[str] = []
INT8_SKIP: list[str] = []
BOOTSTRAP = 0
SAVE = ""

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shakespeare", help="folder of the llmkit-pretrained char model")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--stories", help="stories260K.bin")
    ap.add_argument("--calib", type=int, default=64, help="calibration windows")
    ap.add_argument("--windows", type=int, default=400, help="Shakespeare: max held-out windows")
    ap.add_argument("--held", type=int, default=192,
                    help="stories260K: held-out samples of 256 tokens (192: the gap shares' bootstrap std is ~1 point)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--int8-skip", nargs="*", default=[],
                    help="also int8 RTN and GPTQ g32 keeping these modules float (e.g. blocks.0 blocks.1.attn.qkv)")
    ap.add_argument("--only", nargs="*", default=[], help="run only the variants whose label contains one of these")
    ap.add_argument("--bootstrap", type=int, default=1000,
                    help="resamples of the held-out windows for the spread of each gap share (0: off)")
    ap.add_argument("--save", default="", help="save each variant's per-window NLLs to SAVE.<model>.pt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    TEXT, ONLY, INT8_SKIP, BOOTSTRAP, SAVE = args.text, args.only, args.int8_skip, args.bootstrap, args.save
    if args.shakespeare:
        shakespeare(args.shakespeare, args.calib, args.windows)
    if args.stories:
        stories(args.stories, args.calib, args.held)
