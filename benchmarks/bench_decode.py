"""Decode speed of `llmkit.generate` versus `transformers` `generate` on the same weights.

Model: Llama-shaped, hidden 512, 8 layers, 8 heads (MHA), intermediate 1376, vocab 32000, random
init (std 0.05), fp32, CPU. Both run greedy with the KV cache, 128 new tokens, prompts of 32 tokens,
in the same process and interleaved (the CPU is shared, so the peer ratio is what counts); each
figure is the best of `--reps` runs. Asserts identical greedy tokens. Reports decode tok/s, time to
first token (a 1-token generate: prefill + first sample), peak RSS (each engine alone in a
child process) and the memory-bandwidth floor (time to read every weight once, measured now).

    python benchmarks/bench_decode.py                 # batch 1 and 8, 2 threads
    python benchmarks/bench_decode.py --batch 1 --threads 1 --reps 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

HIDDEN, LAYERS, HEADS, INTER, VOCAB, PROMPT = 512, 8, 8, 1376, 32000, 32


def build(folder: str):
    """Random-init the transformers model, save it, load the same weights with llmkit."""
    import transformers

    import llmkit

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=1024,
        initializer_range=0.05,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(folder)
    return hf, llmkit.load_model(folder)


def prompts(batch: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))


def run_hf(hf, ids: torch.Tensor, n: int) -> list[list[int]]:
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
        )
    return out[:, ids.shape[1] :].tolist()


def run_ours(model, ids: torch.Tensor, n: int) -> list[list[int]]:
    import llmkit

    return llmkit.generate(model, ids.tolist(), n, temperature=0)


def timed(fn, *args) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def speed(hf, ours, batch: int, n: int, reps: int) -> dict:
    ids = prompts(batch)
    run_hf(hf, ids, 4), run_ours(ours, ids, 4)  # warm-up
    best = {"hf": [1e9, 1e9], "llmkit": [1e9, 1e9]}  # [total, ttft]
    outs = {}
    floor = 1e9
    weights = torch.randn(ours.num_params())
    for _ in range(reps):
        floor = min(floor, read_floor_ms(weights))
        for name, fn, model in (("hf", run_hf, hf), ("llmkit", run_ours, ours)):
            ttft, _ = timed(fn, model, ids, 1)
            total, outs[name] = timed(fn, model, ids, n)
            best[name] = [min(best[name][0], total), min(best[name][1], ttft)]
    assert outs["hf"] == outs["llmkit"], "greedy tokens differ between transformers and llmkit"
    res = {"batch": batch, "new_tokens": n, "read_floor_ms": floor}
    for name, (total, ttft) in best.items():
        res[name] = {
            "decode_tok_s": batch * (n - 1) / (total - ttft),
            "ms_per_step": (total - ttft) / (n - 1) * 1e3,
            "ttft_ms": ttft * 1e3,
        }
    res["speedup"] = res["llmkit"]["decode_tok_s"] / res["hf"]["decode_tok_s"]
    return res


def read_floor_ms(w: torch.Tensor, reps: int = 5) -> float:
    """Time to read `w` (as many fp32 values as the model has weights) once: a decode step's floor."""
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        w.sum()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def child_memory(engine: str, folder: str, batch: int, n: int, threads: int) -> None:
    """Run one engine alone and print its peak RSS (MiB) as JSON."""
    torch.set_num_threads(threads)
    ids = prompts(batch)
    if engine == "hf":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        run_hf(model, ids, n)
    else:
        import llmkit

        run_ours(llmkit.load_model(folder), ids, n)
    # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, kept across exec)
    with open("/proc/self/status") as f:
        hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mib": hwm_kib / 1024}))


def memory(folder: str, batch: int, n: int, threads: int) -> dict:
    out = {}
    for engine in ("hf", "llmkit"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            engine,
            "--folder",
            folder,
            "--batch",
            str(batch),
            "--new-tokens",
            str(n),
            "--threads",
            str(threads),
        ]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        out[engine] = json.loads(line)["peak_rss_mib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--child", choices=["hf", "llmkit"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_memory(args.child, args.folder, args.batch[0], args.new_tokens, args.threads)

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        hf, ours = build(folder)
        print(
            f"model: hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, intermediate {INTER}, vocab {VOCAB}, "
            f"{ours.num_params() / 1e6:.1f}M params, fp32; threads={args.threads}; prompt {PROMPT} tokens"
        )
        for b in args.batch:
            r = speed(hf, ours, b, args.new_tokens, args.reps)
            if not args.no_memory:
                r["peak_rss_mib"] = memory(folder, b, args.new_tokens, args.threads)
            h, o = r["hf"], r["llmkit"]
            print(
                f"batch {b}: transformers {h['decode_tok_s']:.1f} tok/s ({h['ms_per_step']:.1f} ms/step, "
                f"TTFT {h['ttft_ms']:.0f} ms) | llmkit {o['decode_tok_s']:.1f} tok/s "
                f"({o['ms_per_step']:.1f} ms/step, TTFT {o['ttft_ms']:.0f} ms) | "
                f"speedup {r['speedup']:.2f}x | tokens identical"
            )
            floor = r["read_floor_ms"]
            print(
                f"batch {b}: reading every weight once takes {floor:.1f} ms (best, same run): a step costs "
                f"{o['ms_per_step'] / floor:.2f}x that in llmkit, {h['ms_per_step'] / floor:.2f}x in transformers"
            )
            if "peak_rss_mib" in r:
                m = r["peak_rss_mib"]
                print(f"batch {b}: peak RSS transformers {m['hf']:.0f} MiB | llmkit {m['llmkit']:.0f} MiB")
            print(json.dumps(r))


if __name__ == "__main__":
    main()
