"""The two kinds of model `llmkit eval` measures: a local model folder and an OpenAI-compatible endpoint.

Both offer the same three calls the tasks need:
- `loglikelihood([(context, continuation), ...]) -> [(logprob, is_greedy), ...]` (lm-eval's contract:
  trailing spaces of the context move to the continuation, the pair is encoded whole and split);
- `generate(prompts, max_new_tokens, stop, temperature, n, seed) -> [[text] * n, ...]`;
- `name`, `info()` (hash, parameters) for results.json.

The local model scores multiple-choice requests with the prompt's KV computed once: requests that
share a context run one prefill of the context, then all continuations as one batch on a copy of
that KV cache (`score_tokens`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llmkit.errors import InputError
from llmkit.infer.kv_cache import StaticKVCache
from llmkit.model.attention import AttnMeta


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the continuation (as lm-eval does)."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


@torch.inference_mode()
def score_tokens(
    model: torch.nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 32,
    progress: bool = False,
    max_batch_tokens: int = 4096,
) -> list[tuple[float, bool]]:
    """log p(continuation | context) and whether greedy decoding reproduces it, per (context_ids, cont_ids).

    Requests with the same context share its KV: the context is packed once, followed by all its
    continuations, and an attention mask lets each continuation see the context and itself only (its
    positions restart where the context ends). Several contexts are batched per forward (right-padded,
    up to `batch_size` rows and `max_batch_tokens` tokens). ALiBi models, whose bias follows the packed
    index rather than the position, prefill the context once and score the continuations on copies
    of its KV cache instead.
    """
    max_len, vocab = int(model.config.block_size), int(model.config.vocab_size)
    groups: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise InputError(f"request {i}: context and continuation must both have tokens, got {len(ctx)}/{len(cont)}")
        if len(cont) > max_len:
            raise InputError(f"request {i}: continuation of {len(cont)} tokens exceeds the context of {max_len}")
        if min(ctx + cont) < 0 or max(ctx + cont) >= vocab:
            raise InputError(f"request {i}: token ids outside [0, {vocab}) of this model; wrong tokenizer?")
        ctx = ctx[-(max_len + 1 - len(cont)) :]  # left-truncate like lm-eval: the last max_len tokens are fed
        groups.setdefault(tuple(ctx), []).append(i)
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    items = list(groups.items())
    bar = tqdm(total=len(items), desc="loglikelihood", disable=not progress, unit="ctx")
    if getattr(model, "alibi_slopes", None) is not None:
        for ctx, idxs in items:
            _score_on_cache(model, list(ctx), idxs, requests, out, batch_size)
            bar.update(1)
    else:
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        longest = 0
        for ctx, idxs in items:
            n = len(ctx) + sum(len(requests[i][1]) for i in idxs)
            if batch and (len(batch) >= batch_size or max(longest, n) * (len(batch) + 1) > max_batch_tokens):
                _score_packed(model, batch, requests, out)
                bar.update(len(batch))
                batch, longest = [], 0
            batch.append((ctx, idxs))
            longest = max(longest, n)
        if batch:
            _score_packed(model, batch, requests, out)
            bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


def _score_packed(model, batch, requests, out) -> None:
    """One forward for several contexts, each followed by all of its continuations (see `score_tokens`)."""
    device = next(model.parameters()).device
    rows, segs, poss, targets = [], [], [], []  # per row: ids, segment (0 = context, j = continuation j), positions
    for ctx, idxs in batch:
        Lc = len(ctx)
        ids, seg, pos, tg = list(ctx), [0] * Lc, list(range(Lc)), []
        for j, i in enumerate(idxs, 1):
            cont = requests[i][1]
            start = len(ids)
            # the logits predicting cont[k] sit at the context's last position (k = 0), else at cont[k - 1];
            # the last token is only a target, so it is not fed (at most block_size positions, as lm-eval)
            tg.append((i, [Lc - 1] + list(range(start, start + len(cont) - 1)), cont))
            ids += cont[:-1]
            seg += [j] * (len(cont) - 1)
            pos += list(range(Lc, Lc + len(cont) - 1))
        rows.append(ids), segs.append(seg), poss.append(pos), targets.append(tg)
    B, T = len(rows), max(len(r) for r in rows)
    x = torch.zeros(B, T, dtype=torch.long)
    seg_t = torch.full((B, T), -1, dtype=torch.long)
    pos_t = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n = len(rows[b])
        x[b, :n], seg_t[b, :n], pos_t[b, :n] = torch.tensor(rows[b]), torch.tensor(segs[b]), torch.tensor(poss[b])
    meta = TreeAttnMeta.build(seg_t.to(device), pos_t.to(device), model.windows)
    logits = model(x.to(device), attn_meta=meta)  # [B, T, V]
    for b in range(B):
        for i, at, cont in targets[b]:
            lp = torch.log_softmax(logits[b, at].float(), -1)  # [n, V]
            c = torch.tensor(cont, device=device)
            out[i] = (float(lp.gather(-1, c[:, None]).sum()), bool((lp.argmax(-1) == c).all()))


class TreeAttnMeta(AttnMeta):
    """Attention metadata of packed rows `context, continuation 1, continuation 2, ...`: a continuation
    attends to the context and to itself (causally), never to another continuation."""

    @classmethod
    def build(cls, seg: torch.Tensor, pos: torch.Tensor, windows: set[int | None]) -> TreeAttnMeta:
        """`seg` [B, T]: 0 = context, j = continuation j, -1 = padding; `pos` [B, T] positions."""
        T = seg.shape[1]
        idx = torch.arange(T, device=seg.device)
        causal = idx[None, :] <= idx[:, None]  # [T(q), T(k)]: key index <= query index
        same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])  # [B, T(q), T(k)]
        allowed = causal[None] & same & (seg[:, None, :] >= 0)
        allowed |= torch.eye(T, dtype=torch.bool, device=seg.device)[None]  # pad queries see themselves
        dist = pos[:, :, None] - pos[:, None, :]  # [B, T, T] position distance query - key
        meta = cls(pos, T, q_cols=idx[None])
        meta.tree = {w: (allowed if w is None else allowed & (dist < w))[:, None] for w in windows}
        return meta

    def mask(self, window: int | None, explicit: bool = False) -> torch.Tensor:
        return self.tree[window]  # [B, 1, T, T]


def _score_on_cache(model, ctx, idxs, requests, out, batch_size) -> None:
    """Prefill `ctx` once, then score its continuations in batches on copies of that KV cache."""
    device = next(model.parameters()).device
    Lc = len(ctx)
    cache = StaticKVCache.for_model(model, 1, Lc)
    last = torch.log_softmax(model(torch.tensor([ctx], device=device), kv_cache=cache)[0, -1].float(), -1)  # [V]
    for b0 in range(0, len(idxs), batch_size):
        chunk = idxs[b0 : b0 + batch_size]
        conts = [requests[i][1] for i in chunk]
        T = max(len(c) for c in conts)
        rows = torch.zeros(len(chunk), T, dtype=torch.long, device=device)
        for r, c in enumerate(conts):
            rows[r, : len(c)] = torch.tensor(c)
        lp = last.expand(len(chunk), 1, -1)
        if T > 1:
            bc = StaticKVCache.for_model(model, len(chunk), Lc + T - 1)
            for layer in range(bc.n_layer):  # the shared prefix, copied to every row
                bc.k[layer][:, :, :Lc] = cache.k[layer]
                bc.v[layer][:, :, :Lc] = cache.v[layer]
            bc.length = Lc
            pos = torch.arange(Lc, Lc + T - 1, device=device).expand(len(chunk), -1)
            rest = torch.log_softmax(model(rows[:, :-1], kv_cache=bc, position_ids=pos).float(), -1)
            lp = torch.cat([lp, rest], 1)  # [b, T, V]
        tok_lp = lp.gather(-1, rows[..., None])[..., 0]  # [b, T]
        greedy = lp.argmax(-1) == rows
        for r, i in enumerate(chunk):
            n = len(conts[r])
            out[i] = (float(tok_lp[r, :n].sum()), bool(greedy[r, :n].all()))


def folder_hash(path: str | Path) -> str:
    """A short content hash of a model folder: config + weight files' names, sizes and first/last MiB."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in {".json", ".safetensors", ".bin", ".pt", ".gguf"}):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if f.stat().st_size > 2 << 20:
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
    return h.hexdigest()[:16]


class LocalLM:
    """A model folder loaded with `llmkit.load_model` (or a model + tokenizer already in memory)."""

    kind = "local"

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        dtype: Any = None,
        device: str | None = None,
        batch_size: int = 32,
        max_batch_size: int = 16,
    ):
        from llmkit.model.hf import load_model
        from llmkit.tokenizer import load_tokenizer

        if isinstance(model, str | Path):
            self.path: Path | None = Path(model)
            if not self.path.is_dir():
                raise InputError(f"--model {model}: not a folder; expected a model folder (config.json + weights)")
            self.model = load_model(self.path, dtype=dtype, device=device)
            self.tokenizer = tokenizer or load_tokenizer(self.path)
        else:
            self.path, self.model, self.tokenizer = None, model, tokenizer
        if self.tokenizer is None:
            raise InputError("a tokenizer is needed to evaluate a model given as an object")
        if not hasattr(self.model, "blocks"):
            raise InputError("llmkit eval needs a decoder (causal LM); this folder holds an encoder")
        self.batch_size = batch_size
        self.max_batch_size = max_batch_size
        self.name = self.path.resolve().name if self.path else type(self.model).__name__
        self._engine: Any = None

    @property
    def max_length(self) -> int:
        return int(self.model.config.block_size)

    def info(self) -> dict[str, Any]:
        p = sum(t.numel() for t in self.model.parameters())
        nbytes = sum(t.numel() * t.element_size() for t in self.model.parameters())
        return {
            "kind": "local",
            "path": str(self.path) if self.path else None,
            "hash": folder_hash(self.path) if self.path else None,
            "parameters": p,
            "size_mb": round(nbytes / 2**20, 3),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
        }

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) the lm-eval way; an empty context becomes the EOS/BOS token."""
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            prefix = self.tokenizer.bos_token_id
            prefix = self.tokenizer.eos_token_id if prefix is None else prefix
            return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
        context, continuation = split_pair(context, continuation)
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], progress: bool = False) -> list[tuple[float, bool]]:
        return score_tokens(self.model, [self.encode_pair(c, x) for c, x in pairs], self.batch_size, progress)

    def engine(self) -> Any:
        from llmkit.infer.engine import Engine

        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, max_batch_size=self.max_batch_size, max_queue=1 << 30)
            self._engine.start()
        return self._engine

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 256,
        stop: list[str] | None = None,
        temperature: float = 0.0,
        n: int = 1,
        seed: int | None = 0,
        top_p: float = 1.0,
        progress: bool = False,
    ) -> list[list[str]]:
        """n completions per prompt through the continuous-batching engine; prompts are left-truncated to fit."""
        from llmkit.infer.sampling import SamplingParams

        eng = self.engine()
        handles = []
        for p in prompts:
            ids = self.encode(p)
            # a short context: keep at least half of it for the prompt, cut the budget, then the prompt's left
            max_new = max(1, min(max_new_tokens, self.max_length - min(len(ids), self.max_length // 2)))
            ids = ids[-(self.max_length - max_new) :]
            row = []
            for j in range(n):
                params = SamplingParams(
                    max_new_tokens=max_new,
                    temperature=temperature,
                    top_p=top_p,
                    stop=stop or None,
                    seed=None if seed is None else seed + j,
                )
                row.append(eng.submit(ids, params))
            handles.append(row)
        out = []
        for row in tqdm(handles, desc="generate", disable=not progress, unit="prompt"):
            out.append([h.result().text for h in row])
        return out

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown(drain=False)
            self._engine = None


class APILM:
    """An OpenAI-compatible endpoint (`/v1/completions` for text and log-likelihoods, via the openai client)."""

    kind = "api"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 8):
        import os

        from openai import OpenAI

        url = base_url.rstrip("/")
        if not url.endswith("/v1"):
            url += "/v1"
        self.client = OpenAI(base_url=url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "EMPTY"))
        self.base_url = url
        self.concurrency = concurrency
        if model is None:
            models = _list_models(self.client, url)
            if not models:
                raise InputError(f"{url}/models lists no model; pass --served-model NAME")
            model = models[0].id
        self.name = model

    def info(self) -> dict[str, Any]:
        return {"kind": "api", "base_url": self.base_url, "model": self.name, "hash": None}

    def _map(self, fn: Any, items: Sequence[Any], progress: bool, desc: str) -> list[Any]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=not progress))

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], progress: bool = False) -> list[tuple[float, bool]]:
        def one(pair: tuple[str, str]) -> tuple[float, bool]:
            ctx, cont = split_pair(*pair)
            r = self.client.completions.create(
                model=self.name, prompt=ctx + cont, max_tokens=0, echo=True, logprobs=1, temperature=0
            )
            lp = r.choices[0].logprobs
            total, greedy = 0.0, True
            for off, tlp, top in zip(lp.text_offset, lp.token_logprobs, lp.top_logprobs):
                if off < len(ctx) or tlp is None:
                    continue
                total += tlp
                if top and max(top.values()) > tlp + 1e-6:
                    greedy = False
            return total, greedy

        return self._map(one, list(pairs), progress, "loglikelihood")

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 256,
        stop: list[str] | None = None,
        temperature: float = 0.0,
        n: int = 1,
        seed: int | None = 0,
        top_p: float = 1.0,
        progress: bool = False,
    ) -> list[list[str]]:
        def one(prompt: str) -> list[str]:
            r = self.client.completions.create(
                model=self.name,
                prompt=prompt,
                max_tokens=max_new_tokens,
                stop=(stop or None) and stop[:4],
                temperature=temperature,
                top_p=top_p,
                n=n,
                seed=seed,
            )
            return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

        return self._map(one, list(prompts), progress, "generate")

    def close(self) -> None:
        self.client.close()


def _list_models(client: Any, url: str) -> list[Any]:
    """The endpoint's /models, or a clear error when it cannot be reached."""
    import openai

    try:
        return client.models.list().data
    except openai.APIError as e:
        raise InputError(f"cannot list models at {url} ({e}); is the server running? Or pass the model name") from e


def json_safe(x: Any) -> Any:
    """Floats that JSON can hold (NaN/inf become None)."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def dumps(x: Any) -> str:
    return json.dumps(json_safe(x), ensure_ascii=False)
