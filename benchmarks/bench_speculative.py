"""Speculative decoding against plain decoding, same model, same process: accepted-token rate and tok/s.

Target: stories260K (llama2.c, a real pretrained tiny Llama; its tokenizer is not available offline,
so the workloads are token ids the model writes itself). Batch 1, `llmkit.generate`'s loop
(`infer.generate.Generator`), KV cache, fp32 CPU.

Workloads:
- free: a story continued from BOS + 4 sampled tokens (free text), 128 new tokens, greedy;
- quote: a RAG-style answer that quotes its context: the prompt is a 160-token story, BOS, then the
  story's first 8 tokens again; the model continues (it copies the story), 128 new tokens, greedy;
- free-sampled: as free, temperature 0.8 (rejection sampling instead of greedy matching).

Methods: plain; ngram (prompt lookup, k tokens); draft (an early-exit draft: the target's own first
`--draft-layers` layers + its final norm and head, k tokens). Every run is timed `--reps` times,
methods interleaved, and the median is reported; greedy outputs are asserted identical to plain.

    python benchmarks/bench_speculative.py --stories ../shared/data/stories260K/stories260K.bin
    python benchmarks/bench_speculative.py --stories ../shared/data/stories260K/stories260K.bin --k 6 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import llmkit
from llmkit.infer.generate import Generator
from llmkit.infer.sampling import SamplingParams
from llmkit.infer.speculative import speculative_config


def early_exit_draft(path: str, n_layers: int) -> torch.nn.Module:
    """The target's first n layers with its final norm and head (a LayerSkip-style self-draft)."""
    draft = llmkit.load_llama2c(path)
    draft.blocks = torch.nn.ModuleList(list(draft.blocks)[:n_layers])
    draft.config.n_layer = n_layers
    return draft


def run(model, prompt: list[int], params: SamplingParams, spec) -> tuple[list[int], float, dict]:
    gen = Generator(model, [prompt], [params], set(), speculative=spec)
    t0 = time.perf_counter()
    toks = [ev[0].token_id for ev in gen]
    return toks, time.perf_counter() - t0, gen.spec_counters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stories", required=True, help="stories260K.bin")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--draft-layers", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per workload")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    model = llmkit.load_llama2c(args.stories)
    draft = early_exit_draft(args.stories, args.draft_layers)
    starts = [[1] + llmkit.generate(model, [1], 4, temperature=1.0, seed=s, ignore_eos=True)
              for s in range(args.prompts)]
    quotes = []
    for s in range(args.prompts):
        story = [1] + llmkit.generate(model, [1], 159, temperature=1.0, seed=100 + s, ignore_eos=True)
        quotes.append(story + [1] + story[1:9])
    greedy = SamplingParams(max_new_tokens=args.new, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=args.new, temperature=0.8, ignore_eos=True)
    workloads = {"free": (starts, greedy), "quote": (quotes, greedy), "free-sampled": (starts, sampled)}
    methods = {"plain": None,
               "ngram": speculative_config("ngram", num_speculative_tokens=args.k),
               "draft": speculative_config(draft_model=draft, num_speculative_tokens=args.k)}
    rows = []
    for wname, (prompts, params) in workloads.items():
        times = {m: [] for m in methods}
        counters = {m: {} for m in methods}
        outs = {}
        for _ in range(args.reps):
            for mname, spec in methods.items():  # interleaved: the machine's load hits every method alike
                total, cnt, toks = 0.0, {}, []
                for i, p in enumerate(prompts):
                    ps = SamplingParams(**{**vars(params), "seed": i})
                    out, dt, c = run(model, p, ps, spec)
                    total += dt
                    toks.append(out)
                    for key, v in c.items():
                        cnt[key] = cnt.get(key, 0) + v
                times[mname].append(total)
                counters[mname] = cnt
                outs[mname] = toks
        if params.temperature == 0:
            for mname in methods:
                assert outs[mname] == outs["plain"], f"{wname}/{mname}: greedy output differs from plain decoding"
        n_tok = args.new * len(prompts)
        base = statistics.median(times["plain"])
        for mname in methods:
            med = statistics.median(times[mname])
            c = counters[mname]
            row = dict(workload=wname, method=mname, k=args.k if mname != "plain" else 0,
                       tok_s=round(n_tok / med, 1), speedup=round(base / med, 2),
                       acceptance=round(c["num_accepted_tokens"] / c["num_draft_tokens"], 3)
                       if c.get("num_draft_tokens") else None,
                       tokens_per_step=round(n_tok / (n_tok - c["num_accepted_tokens"]), 2) if c else 1.0)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    print("\n| workload | method | k | tok/s | vs plain | accepted draft tokens | tokens / target forward |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{100 * r['acceptance']:.1f}%" if r["acceptance"] is not None else "-"
        print(f"| {r['workload']} | {r['method']} | {r['k']} | {r['tok_s']} | x{r['speedup']} | {acc} "
              f"| {r['tokens_per_step']} |")


if __name__ == "__main__":
    main()
