"""Serving throughput and latency over loopback, each workload before/after in the same run.

`--workload batching` (default): `llmkit serve` with --max-batch-size 32, then 1 (one request at a
time), driven by C concurrent streaming clients (C = 1, 8, 32). Each request generates a fixed number
of tokens (ignore_eos). Reports total throughput (generated tokens / wall time), TTFT (time to the first
token) and TPOT (time per output token after the first), then the batched / sequential throughput ratio.

`--workload shared-prefix`: one 1,000-token system prompt + 20 new tokens per request, with
--no-prefix-caching, then with prefix caching: the TTFT of the first and second request of a fresh
prefix (target: the second >= 5x faster), then C clients sharing the prompt (TTFT and inter-token
latency p50/p99, throughput).

`--workload mixed`: short streams decode while 4,000-token prompts arrive among them, with
--no-mixed-prefill, then with mixed chunked prefill: the streams' inter-token latency p50/p99/max,
the long prompts' TTFT, throughput.

`--workload memory` (in-process engine): how many sequences run at once in one KV pool when blocks are
taken as sequences grow, against reserving prompt + max_tokens on admission.

    python benchmarks/bench_serve.py                      # a random-init llama-6m (fast to build)
    python benchmarks/bench_serve.py --model DIR --tokens 64 --requests-per-client 2
    python benchmarks/bench_serve.py --workload shared-prefix
    python benchmarks/bench_serve.py --workload mixed
    python benchmarks/bench_serve.py --workload memory
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def build_model(out: Path, preset: str, ctx: int = 512) -> Path:
    """A random-init llmkit model with a byte-level BPE trained on tinyshakespeare (seconds on CPU)."""
    import torch

    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer
    from llmkit.tokenizer import train_bpe_from_iterator

    text = SHAKESPEARE.read_text()[:200_000] if SHAKESPEARE.exists() else "to be or not to be " * 5000
    tok = train_bpe_from_iterator(text.splitlines(), 1024, out, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, block_size=ctx)
    Transformer(cfg).save_pretrained(str(out))
    return out


class Server:
    """`llmkit serve` in a subprocess."""

    def __init__(self, model: Path, port: int, max_batch_size: int, threads: int | None, extra: tuple = (),
                 env: dict[str, str] | None = None):
        env = dict(os.environ if env is None else env)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [
            sys.executable,
            "-m",
            "llmkit",
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--max-batch-size",
            str(max_batch_size),
            "--max-queue",
            "256",
            "--log-level",
            "warning",
            *extra,
        ]
        self.proc = subprocess.Popen(cmd, env=env)
        self.url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError("llmkit serve did not come up")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def stream_stamps(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float, list[float]]:
    """POST a streaming /v1/completions body; (start time, arrival time of each event)."""
    t0 = time.perf_counter()
    stamps = []
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    return t0, stamps


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    t0, stamps = await stream_stamps(http, url, body)
    n = len(stamps)  # one event per token
    return {"ttft": stamps[0] - t0, "tpot": (stamps[-1] - stamps[0]) / max(n - 1, 1), "tokens": n}


async def run_load(url: str, model: str, clients: int, per_client: int, tokens: int) -> dict:
    prompts = [f"ROMEO: client {i} asks whether the night be long or short" for i in range(clients)]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await one_request(http, url, model, "warm up", 4)

        async def client(i: int) -> list[dict]:
            return [await one_request(http, url, model, prompts[i], tokens) for _ in range(per_client)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    total = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": total,
        "wall_s": wall,
        "throughput": total / wall,
        "ttft_p50": statistics.median(r["ttft"] for r in results),
        "ttft_p90": pct([r["ttft"] for r in results], 90),
        "tpot_p50": statistics.median(r["tpot"] for r in results),
    }


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)] if xs else float("nan")


async def stream_ids(http: httpx.AsyncClient, url: str, model: str, ids: list[int], tokens: int) -> dict:
    """One streaming completion of a token-id prompt; one event per token (logprobs: 0)."""
    body = {"model": model, "prompt": ids, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0}
    t0, stamps = await stream_stamps(http, url, body)
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps),
            "t0": t0, "stamps": stamps}


def random_ids(rng, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


async def shared_prefix_load(url: str, model: str, vocab: int, clients: int, per_client: int, tokens: int,
                             reps: int, prefix_len: int, new_len: int) -> dict:
    import random

    rng = random.Random(0)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await stream_ids(http, url, model, random_ids(rng, 16, vocab), 2)  # warm-up
        firsts, seconds = [], []
        for _ in range(reps):  # a fresh prefix each time: the first request misses, the second may hit
            system = random_ids(rng, prefix_len, vocab)
            firsts.append((await stream_ids(http, url, model, system + random_ids(rng, new_len, vocab), 4))["ttft"])
            seconds.append((await stream_ids(http, url, model, system + random_ids(rng, new_len, vocab), 4))["ttft"])
            print(f"  TTFT first {firsts[-1] * 1e3:.0f} ms, second {seconds[-1] * 1e3:.0f} ms", flush=True)
        system = random_ids(rng, prefix_len, vocab)
        # the system prompt has been seen before (steady state): one untimed request computes it
        await stream_ids(http, url, model, system + random_ids(rng, new_len, vocab), 1)

        async def client(i: int) -> list[dict]:
            return [await stream_ids(http, url, model, system + random_ids(rng, new_len, vocab), tokens)
                    for _ in range(per_client)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
        print(f"  {clients} clients: {wall:.1f} s", flush=True)
    ttfts = [r["ttft"] for r in results]
    itls = [x for r in results for x in r["itl"]]
    return {"ttft_first": statistics.median(firsts), "ttft_second": statistics.median(seconds),
            "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99), "itl_p50": pct(itls, 50), "itl_p99": pct(itls, 99),
            "throughput": sum(r["tokens"] for r in results) / wall, "requests": len(results)}


async def mixed_load(url: str, model: str, vocab: int, streams: int, long_len: int, n_long: int,
                     gap_s: float, stream_tokens: int) -> dict:
    import random

    rng = random.Random(1)
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await stream_ids(http, url, model, random_ids(rng, 16, vocab), 2)  # warm-up
        done = asyncio.Event()
        stream_results: list[dict] = []

        async def short(i: int) -> None:
            while not done.is_set():
                stream_results.append(await stream_ids(http, url, model, random_ids(rng, 16, vocab), stream_tokens))

        async def longs() -> list[dict]:
            out = []
            await asyncio.sleep(gap_s)
            for _ in range(n_long):
                out.append(await stream_ids(http, url, model, random_ids(rng, long_len, vocab), 4))
                await asyncio.sleep(gap_s)
            done.set()
            return out

        t0 = time.perf_counter()
        *_, long_results = await asyncio.gather(*(short(i) for i in range(streams)), longs())
        wall = time.perf_counter() - t0
    itls = [x for r in stream_results for x in r["itl"]]
    # the streams' gaps that overlap a long prompt's prefill (its arrival to its first token)
    windows = [(r["t0"], r["stamps"][0]) for r in long_results]
    during = [b - a for r in stream_results for a, b in zip(r["stamps"], r["stamps"][1:])
              if any(a < w1 and b > w0 for w0, w1 in windows)]
    tokens = sum(r["tokens"] for r in stream_results) + sum(r["tokens"] for r in long_results)
    return {"itl_p50": pct(itls, 50), "itl_p99": pct(itls, 99), "itl_max": max(itls),
            "during_p50": pct(during, 50), "during_p99": pct(during, 99),
            "long_ttft": statistics.median(r["ttft"] for r in long_results), "throughput": tokens / wall,
            "stream_tokens": sum(r["tokens"] for r in stream_results)}


def memory_workload(model_dir: Path, num_blocks: int, kv_block_size: int, prompt_len: int, max_tokens: int,
                    generated: int, n_requests: int) -> dict:
    """Peak sequences running at once in a pool of `num_blocks`: requests declare `max_tokens` but stop
    (the client cancels, as a stop string would) after `generated` tokens."""
    import random

    import llmkit
    from llmkit.infer.engine import Engine
    from llmkit.infer.sampling import SamplingParams

    rng = random.Random(2)
    model = llmkit.load_model(str(model_dir))
    vocab = model.config.vocab_size
    engine = Engine(model, max_batch_size=n_requests, kv_block_size=kv_block_size, num_blocks=num_blocks,
                    max_queue=n_requests).start()
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, ignore_eos=True)
    handles = [engine.submit(random_ids(rng, prompt_len, vocab), params) for _ in range(n_requests)]
    peak, t0 = 0, time.perf_counter()
    while any(not h.done for h in handles):
        for h in handles:
            if not h.done and len(h.token_ids) >= generated:
                h.cancel()
        peak = max(peak, engine.stats()["running"])
        time.sleep(0.002)
    wall = time.perf_counter() - t0
    stats = engine.stats()
    engine.shutdown()
    reserve = num_blocks // -(-(prompt_len + max_tokens) // kv_block_size)  # worst case reserved on admission
    return {"peak_running": peak, "reserve_worst_case": reserve, "preemptions": stats["preemptions"],
            "wall_s": wall, "num_blocks": num_blocks}


def batching(args, model: Path, name: str) -> dict:
    levels = [int(c) for c in args.clients.split(",")]
    table: dict[str, list[dict]] = {}
    for mode, mbs in (("batched", max(levels)), ("sequential", 1)):
        srv = Server(model, args.port, mbs, args.threads)
        try:
            table[mode] = [
                asyncio.run(run_load(srv.url, name, c, args.requests_per_client, args.tokens)) for c in levels
            ]
        finally:
            srv.close()

    print(
        f"\nmodel {name}, {args.tokens} tokens/request, {args.requests_per_client} requests/client, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'mode':<11}{'clients':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p90':>10}{'TPOT p50':>10}")
    for mode, rows in table.items():
        for r in rows:
            print(
                f"{mode:<11}{r['clients']:>8}{r['throughput']:>9.1f}{r['ttft_p50'] * 1e3:>8.0f}ms"
                f"{r['ttft_p90'] * 1e3:>8.0f}ms{r['tpot_p50'] * 1e3:>8.1f}ms"
            )
    for b, s in zip(table["batched"], table["sequential"]):
        print(
            f"throughput ratio batched/sequential at {b['clients']:>2} clients: "
            f"{b['throughput'] / s['throughput']:.2f}x"
        )
    return table


def shared_prefix(args, model: Path, name: str, vocab: int) -> dict:
    table = {}
    for arm, extra in (("off", ("--no-prefix-caching",)), ("on", ())):
        srv = Server(model, args.port, 16, args.threads, extra)
        try:
            load = shared_prefix_load(srv.url, name, vocab, args.prefix_clients, args.requests_per_client,
                                      args.tokens, args.reps, args.prefix_len, 20)
            table[arm] = asyncio.run(load)
        finally:
            srv.close()
    print(f"\nshared prefix: {args.prefix_len}-token system prompt + 20 new tokens; {args.prefix_clients} clients x "
          f"{args.requests_per_client} requests of {args.tokens} tokens")
    print(f"{'prefix cache':<13}{'TTFT 1st':>9}{'TTFT 2nd':>9}{'1st/2nd':>8}{'TTFT p50':>9}{'TTFT p99':>9}"
          f"{'ITL p50':>9}{'ITL p99':>9}{'tok/s':>7}")
    for arm, r in table.items():
        print(f"{arm:<13}{r['ttft_first'] * 1e3:>7.0f}ms{r['ttft_second'] * 1e3:>7.0f}ms"
              f"{r['ttft_first'] / r['ttft_second']:>7.1f}x{r['ttft_p50'] * 1e3:>7.0f}ms{r['ttft_p99'] * 1e3:>7.0f}ms"
              f"{r['itl_p50'] * 1e3:>7.1f}ms{r['itl_p99'] * 1e3:>7.1f}ms{r['throughput']:>7.1f}")
    on, off = table["on"], table["off"]
    print(f"second-request TTFT: {on['ttft_first'] / on['ttft_second']:.1f}x faster than the first (target >= 5x); "
          f"{off['ttft_second'] / on['ttft_second']:.1f}x faster than without prefix caching")
    return table


def mixed(args, model: Path, name: str, vocab: int) -> dict:
    table = {}
    small = max(16, args.prefill_chunk // 4)
    arms = (("off", ("--no-mixed-prefill",), args.prefill_chunk), ("on", (), args.prefill_chunk),
            (f"on, chunk {small}", (), small))
    for arm, extra, chunk in arms:
        srv = Server(model, args.port, 16, args.threads, extra + ("--prefill-chunk", str(chunk)))
        try:
            table[arm] = asyncio.run(mixed_load(srv.url, name, vocab, args.streams, args.long_len, args.n_long,
                                                args.gap, args.tokens))
        finally:
            srv.close()
    print(f"\nmixed: {args.streams} short streams ({args.tokens} tokens each, back to back) while "
          f"{args.n_long} prompts of {args.long_len} tokens arrive, {args.gap:.1f} s apart; "
          f"prefill chunk {args.prefill_chunk} unless said")
    print(f"{'mixed prefill':<16}{'ITL p50':>8}{'ITL p99':>9}{'ITL max':>9}{'during prefill p50/p99':>24}"
          f"{'long TTFT':>10}{'tok/s':>7}")
    for arm, r in table.items():
        print(f"{arm:<16}{r['itl_p50'] * 1e3:>6.1f}ms{r['itl_p99'] * 1e3:>7.0f}ms{r['itl_max'] * 1e3:>7.0f}ms"
              f"{r['during_p50'] * 1e3:>14.0f}ms /{r['during_p99'] * 1e3:>5.0f}ms"
              f"{r['long_ttft'] * 1e3:>8.0f}ms{r['throughput']:>7.1f}")
    off = table["off"]
    for arm, r in list(table.items())[1:]:
        print(f"streams' ITL while a long prompt is prefilled, p99: {off['during_p99'] / r['during_p99']:.1f}x lower "
              f"({arm}); over the whole run p99 {off['itl_p99'] / r['itl_p99']:.1f}x, "
              f"max {off['itl_max'] / r['itl_max']:.1f}x")
    return table


def memory(args, model: Path) -> dict:
    r = memory_workload(model, num_blocks=args.num_kv_blocks, kv_block_size=16, prompt_len=48, max_tokens=448,
                        generated=32, n_requests=32)
    print(f"\nmemory: a pool of {r['num_blocks']} KV blocks of 16 tokens; 32 requests of 48 prompt tokens declaring "
          f"max_tokens=448 that stop after 32")
    print(f"reserving prompt + max_tokens on admission: {r['reserve_worst_case']} sequences at once")
    print(f"blocks taken as sequences grow: {r['peak_running']} at once (measured peak), "
          f"{r['preemptions']} preemptions, {r['wall_s']:.1f} s")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: build a random-init --preset)")
    ap.add_argument("--preset", default="llama-6m")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server (OMP_NUM_THREADS)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--workload", default="batching", choices=["batching", "shared-prefix", "mixed", "memory"])
    ap.add_argument("--prefix-len", type=int, default=1000, help="shared-prefix: tokens of the system prompt")
    ap.add_argument("--prefix-clients", type=int, default=8, help="shared-prefix: concurrent clients")
    ap.add_argument("--reps", type=int, default=3, help="shared-prefix: fresh prefixes timed first/second")
    ap.add_argument("--streams", type=int, default=4, help="mixed: short streams")
    ap.add_argument("--long-len", type=int, default=4000, help="mixed: tokens of each long prompt")
    ap.add_argument("--n-long", type=int, default=3, help="mixed: long prompts")
    ap.add_argument("--gap", type=float, default=1.0, help="mixed: seconds between long prompts")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="mixed: the server's --prefill-chunk")
    ap.add_argument("--num-kv-blocks", type=int, default=128, help="memory: KV pool size")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")

    tmp = tempfile.TemporaryDirectory()
    ctx = {"batching": 512, "shared-prefix": 1280, "mixed": args.long_len + 64, "memory": 512}[args.workload]
    model = Path(args.model) if args.model else build_model(Path(tmp.name) / "bench-model", args.preset, ctx)
    name = model.resolve().name
    vocab = json.loads((model / "config.json").read_text()).get("vocab_size", 1024)
    if args.workload == "batching":
        table = batching(args, model, name)
    elif args.workload == "shared-prefix":
        table = shared_prefix(args, model, name, vocab)
    elif args.workload == "mixed":
        table = mixed(args, model, name, vocab)
    else:
        table = memory(args, model)
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
