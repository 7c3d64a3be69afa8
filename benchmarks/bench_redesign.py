"""Same-run decode/engine speed of this tree against a previous commit (default 2fa4fed, before the
core redesign of issue #8 replaced `infer/fast_decode.py` with the packed-for-decode Linear kind).

The previous commit is checked out with `git worktree` into a temporary folder; each measurement
runs in a fresh child process with PYTHONPATH pointing at one tree, the two trees alternate round
after round (the CPU is shared), and the medians and their ratio (new / old, > 1 = faster) are
printed. Model: the `bench_decode.py` one (Llama-shaped, hidden 512, 8 layers, vocab 32000, fp32).

    python benchmarks/bench_redesign.py                       # 5 rounds, 2 threads
    python benchmarks/bench_redesign.py --rounds 7 --threads 1 --base 2fa4fed
    python benchmarks/bench_redesign.py --serve               # also `llmkit serve` over loopback

`--serve` also starts `llmkit serve` from each tree (the `bench_serve.py` model: random-init
llama-6m with a byte-level BPE) and drives it with 8 concurrent streaming clients, 2 requests each
of 32 tokens, `--serve-loads` times per server start (median): throughput and TTFT p50 per tree,
alternating as above.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT, NEW, ENGINE_ROWS, ENGINE_NEW = 32, 64, 8, 32


def child(folder: str, threads: int) -> None:
    """Measure the llmkit found on PYTHONPATH; print one JSON line."""
    import torch

    import llmkit
    from llmkit.infer.engine import Engine
    from llmkit.infer.sampling import SamplingParams

    torch.set_num_threads(threads)
    model = llmkit.load_model(folder)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT,), generator=g).tolist()
    llmkit.generate(model, prompt, 4)  # warm-up (packs the weights)

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    ttft, _ = timed(lambda: llmkit.generate(model, prompt, 1))
    total, ids = timed(lambda: llmkit.generate(model, prompt, NEW))
    prompts = [torch.randint(0, model.config.vocab_size, (PROMPT,), generator=g).tolist() for _ in range(ENGINE_ROWS)]
    with Engine(model, max_batch_size=ENGINE_ROWS) as engine:
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, temperature=0))  # warm-up
        greedy = SamplingParams(max_new_tokens=ENGINE_NEW, temperature=0)
        t_engine, res = timed(lambda: engine.generate(prompts, greedy))
    print(json.dumps({
        "decode_b1_tok_s": (NEW - 1) / (total - ttft),
        "ttft_ms": ttft * 1e3,
        "engine_b8_tok_s": sum(len(r.token_ids) for r in res) / t_engine,
        "tokens": ids,
    }))


def run(tree: Path, folder: str, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    cmd = [sys.executable, __file__, "--child", folder, "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=tree).stdout
    return json.loads(out.strip().splitlines()[-1])


def serve_round(tree: Path, model: Path, threads: int, port: int, loads: int) -> dict:
    """`llmkit serve` of `tree` under 8 concurrent streaming clients (bench_serve.py's load), `loads`
    times on one server (a load takes ~0.3 s, so one alone varies +-20%): the medians."""
    import asyncio

    from bench_serve import Server, run_load

    srv = Server(model, port, 8, threads, env={**os.environ, "PYTHONPATH": str(tree / "src")})
    try:
        rs = [asyncio.run(run_load(srv.url, model.name, 8, 2, 32)) for _ in range(loads)]
    finally:
        srv.close()
    return {"serve_tok_s": statistics.median(r["throughput"] for r in rs),
            "serve_ttft_ms": statistics.median(r["ttft_p50"] for r in rs) * 1e3}


def build(folder: str) -> None:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=1024, initializer_range=0.05, bos_token_id=None,
        eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="2fa4fed", help="the commit to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--serve", action="store_true", help="also compare `llmkit serve` over loopback")
    ap.add_argument("--serve-loads", type=int, default=3, help="--serve: loads per server start (median)")
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        old, folder = Path(tmp) / "base", str(Path(tmp) / "model")
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), args.base], check=True)
        try:
            build(folder)
            serve_model = None
            if args.serve:
                sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_serve: its model and its `llmkit serve` load
                from bench_serve import build_model

                serve_model = build_model(Path(tmp) / "serve-model", "llama-6m", 512)
            results: dict[str, list[dict]] = {"old": [], "new": []}
            for r in range(args.rounds):
                for name, tree in (("old", old), ("new", ROOT)) if r % 2 == 0 else (("new", ROOT), ("old", old)):
                    res = run(tree, folder, args.threads)
                    if serve_model is not None:
                        res.update(serve_round(tree, serve_model, args.threads, args.port, args.serve_loads))
                    results[name].append(res)
            assert results["old"][0]["tokens"] == results["new"][0]["tokens"], "greedy tokens differ"
            load = os.getloadavg()
            print(f"base {args.base} vs this tree; {args.rounds} alternating rounds, {args.threads} threads; "
                  f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; greedy tokens identical")
            keys = [("decode_b1_tok_s", "higher"), ("ttft_ms", "lower"), ("engine_b8_tok_s", "higher")]
            if args.serve:
                keys += [("serve_tok_s", "higher"), ("serve_ttft_ms", "lower")]
            for key, better in keys:
                o = statistics.median(x[key] for x in results["old"])
                n = statistics.median(x[key] for x in results["new"])
                ratio = n / o if better == "higher" else o / n
                print(f"{key:>16}: old {o:8.1f}  new {n:8.1f}  new/old speed {ratio:.2f}x  "
                      f"(all old: {[round(x[key], 1) for x in results['old']]}, "
                      f"new: {[round(x[key], 1) for x in results['new']]})")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)


if __name__ == "__main__":
    main()
