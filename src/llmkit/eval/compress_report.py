"""`llmkit compress report`: one table and one plot comparing a model with its compressed variants.

Per folder (the base model first): size on disk, parameters, sparsity (zero fraction of the block
weights), held-out perplexity, decode tokens/s (batch 1, greedy, EOS ignored; median of `repeats`)
and peak memory. Every folder is measured in its own fresh Python process, so the peak resident
set (CPU) or `max_memory_allocated` (GPU) is that model's alone. Works for any folder `load_model`
reads: pruned, low-rank, distilled, quantized (int8 / int4 / W8A8).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import InputError
from llmkit.fsutil import atomic_path, atomic_write_text

COLUMNS = (("name", "variant"), ("size_mb", "size (MB)"), ("parameters", "parameters"),
           ("sparsity", "sparsity"), ("perplexity", "perplexity"), ("decode_tokens_per_s", "decode tok/s"),
           ("peak_memory_mb", "peak memory (MB)"))


def block_sparsity(model: torch.nn.Module) -> float | None:
    """Fraction of zeros among the float 2-D weights of the blocks (None for a quantized model)."""
    if getattr(model, "quantization", None):
        return None
    zero = total = 0
    for n, p in model.named_parameters():
        if n.startswith("blocks.") and p.dim() == 2 and p.is_floating_point():
            zero += int((p == 0).sum())
            total += p.numel()
    return zero / total if total else None


def measure(folder: str | Path, ids: list[int] | None = None, new_tokens: int = 64, repeats: int = 3,
            seq_len: int | None = None) -> dict[str, Any]:
    """Size, parameters, sparsity, perplexity of `ids` (sliding windows of `seq_len`), decode tok/s and
    peak memory of one model folder, in this process."""
    from llmkit.eval.efficiency import _peak_mb
    from llmkit.eval.perplexity import sliding_nll
    from llmkit.infer.generate import generate
    from llmkit.model.hf import load_model

    folder = Path(folder)
    model = load_model(folder)
    if not hasattr(model, "blocks"):
        raise InputError(f"{folder} is not a decoder model; compress report compares decoders")
    row: dict[str, Any] = {
        "name": folder.name,
        "path": str(folder),
        "size_mb": sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20,
        "parameters": model.num_params(),
        "sparsity": block_sparsity(model),
    }
    if ids:
        L = min(seq_len or model.config.block_size, model.config.block_size)
        nll, n = sliding_nll(model, ids, max_length=L)
        row["perplexity"] = math.exp(nll / max(n, 1))
    prompt = [int(i) % model.config.vocab_size for i in (ids or [1, 2, 3, 4])[:8]]
    new = max(1, min(new_tokens, model.config.block_size - len(prompt)))
    generate(model, prompt, max_new_tokens=new, ignore_eos=True)  # warm-up (and decode packing)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(model, prompt, max_new_tokens=new, ignore_eos=True)
        times.append(time.perf_counter() - t0)
    row["decode_tokens_per_s"] = new / statistics.median(times)
    row["peak_memory_mb"] = _peak_mb(next(model.parameters()).device)
    return row


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key == "parameters":
        return f"{v:,}"
    if key == "sparsity":
        return f"{v:.1%}"
    if isinstance(v, float):
        return f"{v:,.2f}" if v < 1000 else f"{v:,.0f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    """The report as a Markdown table."""
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Four bar charts (size, perplexity, decode tok/s, peak memory), one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(max(8, 1.1 * len(rows) + 4), 7))
    for ax, (key, title) in zip(axes.flat, (("size_mb", "size (MB)"), ("perplexity", "perplexity (lower is better)"),
                                            ("decode_tokens_per_s", "decode tokens/s"),
                                            ("peak_memory_mb", "peak memory (MB)")), strict=True):
        ax.bar(range(len(rows)), [r.get(key) or 0 for r in rows], color=["#555"] + ["#3a7"] * (len(rows) - 1))
        ax.set_title(title)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def compress_report(model: str | Path, variants: list[str | Path], out: str | Path, data: str | Path | None = None,
                    max_tokens: int = 8192, seq_len: int | None = None, new_tokens: int = 64, repeats: int = 3,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Measure `model` and every variant folder (each in a fresh process); write `out/report.md` (the
    table), `out/report.json` and `out/report.png`. `data`: held-out text (a file, tokenized with the
    base model's tokenizer, its first `max_tokens` tokens) or a prepared data folder (its val split)."""
    from tqdm import tqdm

    folders = [Path(model), *(Path(v) for v in variants)]
    for f in folders:
        if not (f / "config.json").is_file():
            raise InputError(f"{str(f)!r} is not a model folder (no config.json)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = held_out_ids(model, data, max_tokens) if data is not None else None
    ids_file = out / "held_out_ids.json"
    atomic_write_text(ids_file, json.dumps(ids))
    rows = []
    for f in tqdm(folders, desc="compress report", unit="model", disable=not progress):
        cmd = [sys.executable, "-m", "llmkit.eval.compress_report", str(f), str(ids_file), str(new_tokens),
               str(repeats), str(seq_len or 0)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise InputError(f"measuring {f} failed: {p.stderr.strip().splitlines()[-1] if p.stderr else p.returncode}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    rows[0]["name"] = f"{rows[0]['name']} (base)"
    atomic_write_text(out / "report.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(out / "report.md", table(rows))
    plot(rows, out / "report.png")
    return rows


def held_out_ids(model: str | Path, data: str | Path, max_tokens: int) -> list[int]:
    """Token ids of the held-out text: a prepared folder's val split, or a text file's tokens."""
    p = Path(data)
    if (p / "manifest.json").is_file():
        from llmkit.data.shards import load_tokens

        return [int(i) for i in load_tokens(p, "val")[:max_tokens]]
    if not p.is_file():
        raise InputError(f"--data {str(p)!r} is neither a text file nor a prepared data folder")
    from llmkit.tokenizer import load_tokenizer

    ids = load_tokenizer(model).encode(p.read_text(encoding="utf-8", errors="replace"))[:max_tokens]
    if len(ids) < 2:
        raise InputError(f"--data {str(p)!r} holds fewer than 2 tokens")
    return list(ids)


if __name__ == "__main__":  # one measurement in a fresh process (compress_report's subprocess)
    folder, ids_file, new_tokens, repeats, seq = sys.argv[1:6]
    row = measure(folder, json.loads(Path(ids_file).read_text()), int(new_tokens), int(repeats), int(seq) or None)
    print(json.dumps(row))
