"""Continuous batching vs. one request at a time: total throughput of N concurrent greedy requests.

Same model, same requests (prompts of different lengths, different max_new_tokens), three ways:
  1. `Engine(max_batch_size=B)` with all N submitted at once (continuous batching),
  2. `Engine(max_batch_size=1)`: the same engine serving them one at a time,
  3. `llmkit.generate` once per request (static KV cache, no engine): the plain sequential peer.
Prints tokens/s of each, the ratios, time to first token, and checks the greedy tokens agree.

    python benchmarks/bench_engine.py --threads 1         # llama-60m preset shape, 16 requests
    python benchmarks/bench_engine.py --preset tiny --requests 8 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import llmkit
from llmkit.infer.engine import Engine
from llmkit.infer.sampling import SamplingParams
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer


def make_requests(n: int, vocab: int, max_new: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """N (prompt, max_new_tokens) pairs: prompts of 8..64 tokens, outputs of max_new/2..max_new."""
    rng = random.Random(seed)
    return [
        ([rng.randrange(vocab) for _ in range(rng.randint(8, 64))], rng.randint(max_new // 2, max_new))
        for _ in range(n)
    ]


def run_engine(model, requests, batch: int) -> tuple[float, float, list[list[int]], list[float]]:
    """Submit every request at once; return (wall s, CPU s, outputs, time to first token per request)."""
    engine = Engine(model, max_batch_size=batch, max_queue=len(requests), max_seq_len=256).start()
    engine.submit(requests[0][0], SamplingParams(max_new_tokens=2, temperature=0)).result()  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    handles = [engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0)) for p, n in requests]
    outs = [h.result().token_ids for h in handles]
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    ttft = [h.first_token_at - h.submitted_at for h in handles]  # stamped by the engine thread
    engine.shutdown()
    return elapsed, cpu, outs, ttft


def run_generate(model, requests) -> tuple[float, float, list[list[int]]]:
    llmkit.generate(model, requests[0][0], max_new_tokens=2, temperature=0)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    outs = [llmkit.generate(model, p, max_new_tokens=n, temperature=0, eos_token_ids=[]) for p, n in requests]
    return time.perf_counter() - t0, time.process_time() - c0, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-60m", help="model shape (random init, fp32)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="engine max_batch_size")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each mode; the fastest counts")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset, eos_token_id=None)
    model = Transformer(cfg).eval()
    requests = make_requests(args.requests, cfg.vocab_size, args.max_new_tokens)
    n_tokens = sum(n for _, n in requests)
    ttft = None
    print(
        f"model {args.preset} ({model.num_params() / 1e6:.1f}M params, fp32, {torch.get_num_threads()} threads); "
        f"{args.requests} requests, {n_tokens} new tokens in all"
    )

    # modes interleaved, best of --repeat: other load on the machine hits all of them alike. CPU
    # seconds (process time, all threads) are reported too: on a shared machine they measure the
    # work done, while wall time also counts waiting for a core.
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeat):
        runs = {
            f"engine, continuous batching (batch {args.batch})": run_engine(model, requests, args.batch),
            "engine, one request at a time": run_engine(model, requests, 1),
            "llmkit.generate, one request at a time": run_generate(model, requests),
        }
        for name, (wall, cpu, *rest) in runs.items():
            if name.startswith("engine, continuous") and (name not in best or wall < best[name][0]):
                ttft = rest[1]  # time to first token of the fastest batched run
            old_wall, old_cpu = best.get(name, (wall, cpu))
            best[name] = (min(wall, old_wall), min(cpu, old_cpu))
        out_batch, out_one, out_gen = (r[2] for r in runs.values())
    names = list(best)
    print(f"{'':<44} {'wall s':>7} {'tok/s':>8} {'CPU s':>7} {'tok/CPU-s':>10}")
    for name in names:
        wall, cpu = best[name]
        print(f"{name:<44} {wall:7.2f} {n_tokens / wall:8.1f} {cpu:7.2f} {n_tokens / cpu:10.1f}")
    (wb, cb), (wo, co), (wg, cg) = (best[n] for n in names)
    print(f"speed-up of continuous batching vs engine one-at-a-time: {wo / wb:.2f}x wall, {co / cb:.2f}x CPU")
    print(f"speed-up of continuous batching vs llmkit.generate one-at-a-time: {wg / wb:.2f}x wall, {cg / cb:.2f}x CPU")
    print(
        f"time to first token under load: median {statistics.median(ttft) * 1e3:.0f} ms, max {max(ttft) * 1e3:.0f} ms"
    )
    same = sum(a == b == c for a, b, c in zip(out_batch, out_one, out_gen))
    print(f"identical greedy tokens in all three runs: {same}/{len(requests)} requests")


if __name__ == "__main__":
    main()
