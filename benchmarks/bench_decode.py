"""Decode speed of `llmkit.generate` versus `transformers` `generate` and llama.cpp on the same weights.

Model: Llama-shaped, hidden 512, 8 layers, 8 heads (MHA), intermediate 1376, vocab 32000, random
init (std 0.05), fp32, CPU. All run greedy with the KV cache, 128 new tokens, prompts of 32 tokens,
in the same process and interleaved (the CPU is shared, so the peer ratio is what counts); each
figure is the best of `--reps` runs. Asserts identical greedy tokens with transformers. Reports decode
tok/s (wall clock) and CPU ms per step (process time: what a step costs when the box is shared), time
to first token (a 1-token generate: prefill + first sample), peak RSS (each engine alone in a child
process) and the memory-bandwidth floor (time to read every weight once, measured now).

llama.cpp (`pip install -e .[llamacpp]`, skipped when absent) runs batch 1 on an f32 GGUF of the same
weights written by `llmkit export gguf`, driven token by token through llama-cpp-python (greedy argmax
of its logits); its tokens are compared with llmkit's and the ratio llmkit / llama.cpp is printed.

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


def save_weights(folder: str):
    """Random-init the transformers model and save it with a word-level tokenizer (GGUF files carry
    one); returns the transformers model. `bench_quant_speed.py` builds its model here too."""
    import transformers
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers

    from llmkit.tokenizer import Tokenizer

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
    raw = RawTokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    Tokenizer(raw, {}).save(folder)
    return hf


def build(folder: str):
    """The transformers model and the same weights loaded with llmkit."""
    import llmkit

    hf = save_weights(folder)
    return hf, llmkit.load_model(folder)


def build_llama_cpp(folder: str, threads: int, qtype: str = "f32"):
    """llama.cpp on a GGUF of `folder` written by `llmkit export gguf`; None when llama-cpp-python is absent."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed (pip install -e .[llamacpp]): llama.cpp rows skipped", file=sys.stderr)
        return None
    from llmkit.compress.gguf import export_gguf

    return load_llama_cpp(export_gguf(folder, f"{folder}/m-{qtype}.gguf", qtype), threads)


def load_llama_cpp(path, threads: int):
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads, n_batch=64,
                           verbose=False)


def llama_cpp_greedy(llm, prompt: list[int], n: int, on_first=None) -> list[int]:
    """Greedy decode through llama-cpp-python, one `eval` per token (argmax of the last position's
    logits); `on_first()` is called after the first token (prefill) is known."""
    import llama_cpp
    import numpy as np

    def next_token() -> int:  # argmax of the last position's logits (`scores` needs logits_all=True)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    vocab = llm.n_vocab()
    llm.reset()
    llm.eval(prompt)
    toks = [next_token()]
    if on_first is not None:
        on_first()
    for _ in range(n - 1):
        llm.eval([toks[-1]])
        toks.append(next_token())
    return toks


def run_llama_cpp(llm, ids: torch.Tensor, n: int) -> list[list[int]]:
    return [llama_cpp_greedy(llm, ids[0].tolist(), n)]


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


def timed(fn, *args) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of fn(*args)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - t, time.process_time() - c, out


def speed(hf, ours, batch: int, n: int, reps: int, llm=None) -> dict:
    ids = prompts(batch)
    engines = [("hf", run_hf, hf), ("llmkit", run_ours, ours)]
    if llm is not None and batch == 1:
        engines.append(("llama.cpp", run_llama_cpp, llm))
    for _, fn, model in engines:  # warm-up
        fn(model, ids, 4)
    best = {name: [1e9, 1e9, 1e9] for name, _, _ in engines}  # [decode wall, ttft, decode cpu]
    outs = {}
    floor = 1e9
    weights = torch.randn(ours.num_params())
    for _ in range(reps):
        floor = min(floor, read_floor_ms(weights))
        for name, fn, model in engines:
            ttft, ttft_cpu, _ = timed(fn, model, ids, 1)
            total, cpu, outs[name] = timed(fn, model, ids, n)
            b = best[name]
            best[name] = [min(b[0], total - ttft), min(b[1], ttft), min(b[2], cpu - ttft_cpu)]
    assert outs["hf"] == outs["llmkit"], "greedy tokens differ between transformers and llmkit"
    res = {"batch": batch, "new_tokens": n, "read_floor_ms": floor}
    for name, (dec, ttft, cpu) in best.items():
        res[name] = {
            "decode_tok_s": batch * (n - 1) / dec,
            "ms_per_step": dec / (n - 1) * 1e3,
            "cpu_ms_per_step": cpu / (n - 1) * 1e3,
            "ttft_ms": ttft * 1e3,
        }
    res["speedup"] = res["llmkit"]["decode_tok_s"] / res["hf"]["decode_tok_s"]
    if "llama.cpp" in outs:
        a, b = outs["llmkit"][0], outs["llama.cpp"][0]
        res["llama_cpp_same_tokens"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        res["vs_llama_cpp"] = res["llmkit"]["decode_tok_s"] / res["llama.cpp"]["decode_tok_s"]
        res["vs_llama_cpp_cpu"] = res["llama.cpp"]["cpu_ms_per_step"] / res["llmkit"]["cpu_ms_per_step"]
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
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    with tempfile.TemporaryDirectory() as folder:
        hf, ours = build(folder)
        llm = build_llama_cpp(folder, args.threads)
        print(
            f"model: hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, intermediate {INTER}, vocab {VOCAB}, "
            f"{ours.num_params() / 1e6:.1f}M params, fp32; threads={args.threads}; prompt {PROMPT} tokens"
        )
        for b in args.batch:
            r = speed(hf, ours, b, args.new_tokens, args.reps, llm)
            if not args.no_memory:
                r["peak_rss_mib"] = memory(folder, b, args.new_tokens, args.threads)
            h, o = r["hf"], r["llmkit"]
            print(
                f"batch {b}: transformers {h['decode_tok_s']:.1f} tok/s ({h['ms_per_step']:.1f} ms/step, "
                f"TTFT {h['ttft_ms']:.0f} ms) | llmkit {o['decode_tok_s']:.1f} tok/s "
                f"({o['ms_per_step']:.1f} ms/step, TTFT {o['ttft_ms']:.0f} ms) | "
                f"speedup {r['speedup']:.2f}x | tokens identical"
            )
            print(f"batch {b}: CPU ms/step transformers {h['cpu_ms_per_step']:.1f} | llmkit {o['cpu_ms_per_step']:.1f}")
            if "llama.cpp" in r:
                c = r["llama.cpp"]
                print(
                    f"batch {b}: llama.cpp f32 {c['decode_tok_s']:.1f} tok/s ({c['ms_per_step']:.1f} ms/step, "
                    f"CPU {c['cpu_ms_per_step']:.1f} ms/step, TTFT {c['ttft_ms']:.0f} ms) | llmkit / llama.cpp "
                    f"{r['vs_llama_cpp']:.2f}x tok/s, {r['vs_llama_cpp_cpu']:.2f}x by CPU time | first "
                    f"{r['llama_cpp_same_tokens']} of {args.new_tokens} greedy tokens identical"
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
