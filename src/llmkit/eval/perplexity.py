"""Perplexity with a sliding window (Hugging Face's "Perplexity of fixed-length models" method).

The text is tokenized once (special tokens added as the tokenizer adds them). Windows of the model's
context length start every `stride` tokens; each window scores only the tokens the previous window
did not, with up to `max_length - stride` tokens of left context. With `stride >= max_length` the
windows are disjoint; a text that fits in one window gives exactly `exp` of the `transformers` loss
with `labels=input_ids`. Bits per byte = total NLL / (ln 2 * UTF-8 bytes), comparable across tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmkit.errors import InputError


@dataclass
class PerplexityResult:
    nll: float  # total negative log-likelihood in nats over the scored tokens
    tokens: int  # scored tokens (all but the first of the text)
    bytes: int  # UTF-8 bytes of the text

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * max(self.bytes, 1))


@torch.inference_mode()
def sliding_nll(
    model: torch.nn.Module,
    ids: list[int],
    stride: int | None = None,
    max_length: int | None = None,
    progress: bool = False,
):
    """(total NLL in nats, number of scored tokens) of `ids` under `model`, with HF's sliding window."""
    max_length = int(max_length or model.config.block_size)
    stride = int(stride or max_length)
    if stride < 1 or stride > max_length:
        raise InputError(f"--stride must be in [1, {max_length}] (the model's context), got {stride}")
    device = next(model.parameters()).device
    x_all = torch.tensor(ids, device=device)
    from tqdm import tqdm

    nll, count, prev_end = 0.0, 0, 0
    n_windows = max(1, -(-(len(ids) - max_length) // stride) + 1) if len(ids) > max_length else 1
    bar = tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress)
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end  # tokens this window scores (the rest is context)
        x = x_all[begin:end][None]  # [1, T]
        logp = torch.log_softmax(model(x)[0, :-1].float(), -1)  # predicts x[1:]
        tgt = x[0, 1:]
        tok_nll = -logp.gather(-1, tgt[:, None])[:, 0]  # [T-1]
        keep = min(trg_len, len(tok_nll))  # the first window cannot score its first token
        nll += float(tok_nll[len(tok_nll) - keep :].sum())
        count += keep
        prev_end = end
        bar.update(1)
        if end == len(ids):
            break
    bar.close()
    return nll, count


def perplexity(
    model: torch.nn.Module, tokenizer, text: str, stride: int | None = None, progress: bool = False
) -> PerplexityResult:
    """Perplexity and bits per byte of one text."""
    ids = list(tokenizer.encode(text))
    if len(ids) < 2:
        raise InputError("perplexity needs a text of at least 2 tokens")
    nll, n = sliding_nll(model, ids, stride, progress=progress)
    return PerplexityResult(nll, n, len(text.encode("utf-8")))


def run(ctx, task: str, path: str | None) -> dict[str, dict[str, float]]:
    """The `perplexity` task: every text file (a file, or a folder's *.txt / *.md) scored separately."""
    from pathlib import Path

    if path is None:
        raise InputError("task perplexity needs text: --tasks perplexity=FILE_OR_FOLDER")
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in {".txt", ".md", ".text"})
    elif p.is_file():
        files = [p]
    else:
        raise InputError(f"{p}: no such file or folder; expected text files")
    if not files:
        raise InputError(f"{p}: no .txt/.md files found")
    lm = ctx.need_lm(task)
    if getattr(lm, "kind", "") != "local":
        raise InputError("perplexity needs a local model (--model DIR): it reads the logits of every token")
    files = ctx.limited(files)
    nll = tokens = nbytes = 0.0
    for f in files:
        key = ctx.key(task, str(f))
        rec = ctx.store.get(key)
        if rec is None:
            text = ctx.text(f.read_text(encoding="utf-8"))
            r = perplexity(lm.model, lm.tokenizer, text, ctx.stride, progress=ctx.progress)
            rec = ctx.store.add(
                {
                    "key": key,
                    "task": task,
                    "perturbation": ctx.tag,
                    "id": str(f),
                    "nll": r.nll,
                    "tokens": r.tokens,
                    "bytes": r.bytes,
                    "perplexity": r.perplexity,
                    "bits_per_byte": r.bits_per_byte,
                }
            )
        nll, tokens, nbytes = nll + rec["nll"], tokens + rec["tokens"], nbytes + rec["bytes"]
    total = PerplexityResult(nll, int(tokens), int(nbytes))
    return {
        task: {
            "perplexity": total.perplexity,
            "bits_per_byte": total.bits_per_byte,
            "tokens": int(tokens),
            "bytes": int(nbytes),
            "files": len(files),
        }
    }
