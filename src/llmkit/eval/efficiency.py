"""Efficiency: prefill and decode tokens/s, time to first token, peak memory and model size.

Local models: prefill = one forward over a `prompt_len`-token prompt; decode = `llmkit.generate` of
`new_tokens` tokens (EOS ignored) minus its prefill; TTFT = submit to first token through the
continuous-batching engine. Each figure is the median of `repeats` runs. Peak memory is
`torch.cuda.max_memory_allocated` on a GPU, else the process's peak resident set size.
Endpoints: TTFT and decode tokens/s from a streamed completion.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llmkit.eval.context import TaskContext


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def measure_local(lm: Any, prompt_len: int = 128, new_tokens: int = 64, repeats: int = 3) -> dict[str, float]:
    from llmkit.infer.generate import generate
    from llmkit.infer.sampling import SamplingParams

    model = lm.model
    ctx_len = int(model.config.block_size)
    prompt_len = max(2, min(prompt_len, ctx_len // 2))
    new_tokens = max(1, min(new_tokens, ctx_len - prompt_len))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g).tolist()
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pre, dec, ttft = [], [], []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            model(x, num_logits_to_keep=1)
            sync()
            pre.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            generate(model, ids, max_new_tokens=new_tokens, ignore_eos=True)
            sync()
            dec.append(max(time.perf_counter() - t0 - pre[-1], 1e-9))
    eng = lm.engine()
    for _ in range(repeats):
        t0 = time.perf_counter()
        h = eng.submit(ids, SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True))
        next(iter(h))
        ttft.append(time.perf_counter() - t0)
        h.result()
    size = lm.info()["size_mb"]
    disk = sum(f.stat().st_size for f in Path(lm.path).glob("*.safetensors")) / 2**20 if lm.path else None
    return {
        "prefill_tokens_per_s": prompt_len / statistics.median(pre),
        "decode_tokens_per_s": new_tokens / statistics.median(dec),
        "ttft_ms": 1000 * statistics.median(ttft),
        "peak_memory_mb": _peak_mb(device),
        "model_size_mb": size,
        **({"disk_size_mb": disk} if disk else {}),
        "parameters": lm.info()["parameters"],
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
    }


def measure_api(lm: Any, new_tokens: int = 64, repeats: int = 3) -> dict[str, float]:
    prompt = "Once upon a time, " * 8
    ttft, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        first, n = None, 0
        stream = lm.client.completions.create(
            model=lm.name, prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                n += 1
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        ttft.append((first or end) - t0)
        dec.append(max(n - 1, 1) / max(end - (first or t0), 1e-9))
    return {"ttft_ms": 1000 * statistics.median(ttft), "decode_tokens_per_s": statistics.median(dec)}


def run(ctx: TaskContext, task: str, path: str | None) -> dict[str, dict[str, float]]:
    lm = ctx.need_lm(task)
    opts = ctx.options
    if lm.kind == "local":
        res = measure_local(lm, int(opts.get("prompt_len") or 128), int(opts.get("new_tokens") or 64))
    else:
        res = measure_api(lm, int(opts.get("new_tokens") or 64))
    ctx.store.add({"key": ctx.key(task, "run"), "task": task, "perturbation": ctx.tag, "id": "run", **res})
    return {task: res}
