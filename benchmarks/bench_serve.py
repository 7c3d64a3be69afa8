"""Serving throughput and latency: continuous batching vs one request at a time, same model, same load.

Starts `llmkit serve` twice as a subprocess (--max-batch-size 32, then --max-batch-size 1) and drives it
with C concurrent streaming clients (C = 1, 8, 32) over loopback. Each request generates a fixed number
of tokens (ignore_eos). Reports total throughput (generated tokens / wall time), TTFT (time to the first
token) and TPOT (time per output token after the first), then the batched / sequential throughput ratio.

    python benchmarks/bench_serve.py                      # a random-init llama-6m (fast to build)
    python benchmarks/bench_serve.py --model DIR --tokens 64 --requests-per-client 2
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


def build_model(out: Path, preset: str) -> Path:
    """A random-init llmkit model with a byte-level BPE trained on tinyshakespeare (seconds on CPU)."""
    import torch

    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer
    from llmkit.tokenizer import train_bpe_from_iterator

    text = SHAKESPEARE.read_text()[:200_000] if SHAKESPEARE.exists() else "to be or not to be " * 5000
    tok = train_bpe_from_iterator(text.splitlines(), 1024, out, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, block_size=512)
    Transformer(cfg).save_pretrained(str(out))
    return out


class Server:
    """`llmkit serve` in a subprocess."""

    def __init__(self, model: Path, port: int, max_batch_size: int, threads: int | None):
        env = dict(os.environ)
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
        self.proc.wait(30)


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    stamps = []
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
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
        "ttft_p90": sorted(r["ttft"] for r in results)[math.ceil(0.9 * len(results)) - 1],
        "tpot_p50": statistics.median(r["tpot"] for r in results),
    }


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
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else build_model(Path(tmp.name) / "bench-model", args.preset)
    name = model.resolve().name
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
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
