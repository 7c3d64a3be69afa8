"""Batched autoregressive generation: prefill once, then one-token decode steps over a static KV cache.

`generate` works on token ids; `generate_text` / `stream_text` add a tokenizer, UTF-8-safe
streaming and stop strings. Prompts of different lengths are left-padded; the attention mask
hides the padding and position ids start at 0 at each prompt's first real token, so a row's
output does not depend on what it is batched with.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmkit.errors import InputError
from llmkit.infer.kv_cache import StaticKVCache
from llmkit.infer.sampling import SamplingParams
from llmkit.infer.sequence import Sequence, TokenEvent, sample_step, speculative_step
from llmkit.infer.speculative import (
    SpeculativeConfig,
    draft_limit,
    make_proposer,
    rope_switch_length,
    speculative_config,
)
from llmkit.model.attention import AttnMeta
from llmkit.model.layers import check_token_ids
from llmkit.model.linear import set_decode_packing

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


@dataclass
class Generation:
    """One row's output of `generate(..., return_logprobs=True)`."""

    token_ids: list[int]
    logprobs: list[float]  # log p(chosen token), from the model's distribution after penalties/bias
    top_logprobs: list[list[tuple[int, float]]] | None  # per step, the top-N alternatives (SamplingParams.logprobs)


def make_params(params: SamplingParams | None = None, **kw: Any) -> SamplingParams:
    """A `SamplingParams` from an existing one and/or keyword overrides (None values are ignored)."""
    kw = {k: v for k, v in kw.items() if v is not None}
    unknown = sorted(set(kw) - SAMPLING_FIELDS)
    if unknown:
        raise InputError(
            f"unknown sampling argument(s) {', '.join(unknown)}; expected some of {', '.join(sorted(SAMPLING_FIELDS))}"
        )
    base = {f: getattr(params, f) for f in SAMPLING_FIELDS} if params is not None else {}
    return SamplingParams(**{**base, **kw})


def eos_token_ids(model: torch.nn.Module, tokenizer: Any = None) -> set[int]:
    """Stop ids: the model config's eos, generation_config.json's eos (when the model records its
    folder in `model.name_or_path`) and the tokenizer's `eos_token_ids`/`eos_token_id`."""
    ids: set[int] = set(getattr(model.config, "eos_token_ids", None) or [])
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    folder = getattr(model, "name_or_path", None)
    if gen_eos is None and folder and (Path(folder) / "generation_config.json").is_file():
        gen_eos = json.loads((Path(folder) / "generation_config.json").read_text()).get("eos_token_id")
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    if tokenizer is not None:
        tok_ids = getattr(tokenizer, "eos_token_ids", None)
        if tok_ids is None:
            tok_ids = [getattr(tokenizer, "eos_token_id", None)]
        ids.update(int(i) for i in tok_ids if i is not None)
    return ids


def _check_prompts(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> None:
    cfg = model.config
    if not prompts:
        raise InputError("no prompts given: expected a list of token ids or a list of such lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty: expected at least one token id")
        check_token_ids(p, cfg.vocab_size, what=f"prompt {i} has token id(s)")
        if len(p) + max_new_tokens > cfg.block_size:
            raise InputError(
                f"prompt {i} has {len(p)} tokens and max_new_tokens={max_new_tokens}: together more than "
                f"the model's context length of {cfg.block_size} tokens; shorten the prompt or lower "
                "max_new_tokens"
            )


class Generator:
    """Step-by-step batched generation for one batch of prompts over a static KV cache.

    Iterating yields, per decode step, one `TokenEvent` per row (None once a row has finished).
    Token -> text and stop handling is the `Sequence`'s, shared with the `Engine`. The events carry
    log-probabilities with `return_logprobs=True` or for rows whose params ask for them (`logprobs`), else None.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        params: list[SamplingParams],
        eos_ids: set[int],
        use_cache: bool = True,
        fast: bool = True,
        tokenizer: Any = None,
        speculative: SpeculativeConfig | None = None,
        return_logprobs: bool = False,
    ):
        self.model = model
        self.B = B = len(prompts)
        self.max_new = max(p.max_new_tokens for p in params)
        self.seq2seq = getattr(model, "is_encoder_decoder", False)
        _check_prompts(model, prompts, 1 if self.seq2seq else self.max_new)
        self.device = next(model.parameters()).device
        self.L = L = max(len(p) for p in prompts)
        ids = torch.full((B, L), 0, dtype=torch.long)
        mask = torch.ones((B, L + self.max_new), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p) :] = torch.tensor(p)
            mask[i, : L - len(p)] = 0  # left padding; generated positions are real tokens
        self.input_ids = ids.to(self.device)  # [B, L]
        self.encoded = None
        if self.seq2seq:  # encoder-decoder: encode the prompts once, decode from the start token
            with torch.inference_mode():
                self.encoded = model.encode(self.input_ids, mask[:, :L].to(self.device))
            start = model.config.decoder_start_token_id
            prompts = [[start] for _ in prompts]
            self.L = L = 1
            self.input_ids = torch.full((B, 1), start, dtype=torch.long, device=self.device)
            mask = torch.ones((B, 1 + self.max_new), dtype=torch.long)
        self.cache = StaticKVCache.for_model(model, B, L + self.max_new) if use_cache else None
        padded = any(len(p) != L for p in prompts)
        self.key_mask = mask.to(self.device) if padded else None  # [B, L + max_new]
        if self.cache is not None and padded:
            self.cache.set_padding(self.key_mask)
        self.seqs = [Sequence(p, sp, eos_ids, tokenizer, self.device, return_logprobs)
                     for p, sp in zip(prompts, params)]
        # rows that repeat a prompt (n samples of one prompt: GRPO's groups, OpenAI's n) prefill it once
        distinct: dict[tuple[int, ...], int] = {}
        inverse = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        self.shared = None  # (first row of each distinct prompt [U], its index for every row [B])
        if len(distinct) < B and self.cache is not None and not self.cache.prefix and not self.seq2seq:
            self.shared = (torch.tensor([inverse.index(u) for u in range(len(distinct))], device=self.device),
                           torch.tensor(inverse, device=self.device))
        if fast and use_cache:  # the packed-for-decode Linear kind (model/linear.py)
            set_decode_packing(model, True)
        elif not fast:
            set_decode_packing(model, False)
        self.rope_switch = rope_switch_length(model)  # LongRoPE: recompute the rows that cross it
        self.speculative = speculative
        self.proposer = None
        self.spec_counters = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}
        if speculative is not None:
            if B != 1 or self.seq2seq or not use_cache:
                raise InputError("speculative decoding runs one decoder-only prompt at a time with the KV cache "
                                 "(generate() splits a batch into rows; the Engine batches them)")
            self.proposer = make_proposer(speculative, model, L + self.max_new, 1, fast_decode=fast)

    def _forward(self, ids: Tensor, n_logits: int | None = None) -> Tensor:
        """Logits [B, V] of the last position after running ids [B, T] (appended to the cache, or the
        whole sequence so far when there is no cache); with `n_logits`, the last n positions' [B, n, V]."""
        T = ids.shape[1]
        if self.cache is not None:
            meta = self.cache.attn_meta(T)
        else:  # recompute the whole sequence (reference path for tests)
            km = self.key_mask[:, :T] if self.key_mask is not None else None
            pos = (km.cumsum(-1) - 1).clamp(min=0) if km is not None else torch.arange(T, device=self.device)[None]
            meta = AttnMeta(pos.expand(self.B, T), T, key_mask=km)
        if self.seq2seq:
            return self.model.decode(ids, self.encoded, kv_cache=self.cache, attn_meta=meta,
                                     num_logits_to_keep=1)[:, -1].float()
        kw = {"position_ids": meta.position_ids, "attn_meta": meta, "num_logits_to_keep": n_logits or 1}
        logits = self.model(ids, kv_cache=self.cache, **kw).float()
        return logits if n_logits else logits[:, -1]

    def _prefill(self) -> Tensor:
        """Logits [B, V] after the prompts, each distinct prompt run once (`_FanOut` writes its keys and
        values to every row that holds it)."""
        if self.shared is None:
            return self._forward(self.input_ids)
        first, inverse = self.shared
        meta = self.cache.attn_meta(self.L)
        meta = AttnMeta(meta.position_ids[first], meta.kv_len,
                        key_mask=meta.key_mask[first] if meta.key_mask is not None else None)
        logits = self.model(self.input_ids[first], kv_cache=_FanOut(self.cache, inverse),
                            position_ids=meta.position_ids, attn_meta=meta, num_logits_to_keep=1)
        return logits[inverse, -1].float()

    def _crosses_rope_switch(self) -> bool:
        """True when a row's next token sits at a LongRoPE model's original context length and its
        cache holds short-factor keys: like transformers, the whole sequence is then recomputed
        with the long factors (Phi-3)."""
        n = self.rope_switch
        return n is not None and self.cache is not None and any(
            s.finish_reason is None and s.prompt_len <= n and len(s.tokens) == n + 1 for s in self.seqs)

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[TokenEvent | None]]:
        logits = self._prefill()  # the whole prompt in one pass
        seq = self.input_ids
        for _ in range(self.max_new):
            active = [s.finish_reason is None for s in self.seqs]
            events = sample_step(logits, self.seqs, active)
            yield events
            if all(s.finish_reason is not None for s in self.seqs):
                return
            if self.proposer is not None:
                yield from self._speculate()
                return
            nxt = torch.tensor([[s.tokens[-1]] for s in self.seqs], device=self.device)  # [B, 1]
            if self.cache is None or self.rope_switch is not None:  # the whole sequence may be recomputed
                seq = torch.cat([seq, nxt], dim=1)
            if self._crosses_rope_switch():
                self.cache.reset()
            logits = self._forward(nxt if self.cache is not None and self.cache.length else seq)

    def _speculate(self) -> Iterator[list[TokenEvent | None]]:
        """Decode the one row by proposing k tokens and verifying them in one forward per step."""
        s = self.seqs[0]
        k_max = self.speculative.num_speculative_tokens
        while s.finish_reason is None:
            drafts, q = self.proposer.propose([s], [0], [draft_limit(s, k_max, self.model)])
            d = drafts[0]
            x = [s.tokens[-1]] + d
            if self._crosses_rope_switch():
                self.cache.reset()
                x = s.tokens + d
            logits = self._forward(torch.tensor([x], device=self.device), n_logits=len(d) + 1)  # [1, k+1, V]
            events, accepted = speculative_step([logits[0]], drafts, q, self.seqs)
            self.cache.rollback(len(d) + 1 - len(events[0]))  # drop the rejected drafts' keys/values
            if d:
                self.spec_counters["num_drafts"] += 1
                self.spec_counters["num_draft_tokens"] += len(d)
                self.spec_counters["num_accepted_tokens"] += accepted[0]
            for ev in events[0]:
                yield [ev]


class _FanOut:
    """The prefill's `kv_cache` when rows repeat a prompt: the U distinct prompts run once, and each
    layer's keys/values [U, Hkv, L, D] go to every row of `cache` holding that prompt (`inverse` [B])."""

    def __init__(self, cache: StaticKVCache, inverse: Tensor) -> None:
        self.cache, self.inverse = cache, inverse

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.cache.update(layer_idx, k[self.inverse], v[self.inverse])
        return k, v


def _as_batch(prompt_ids: list[int] | list[list[int]] | Tensor) -> tuple[list[list[int]], bool]:
    if isinstance(prompt_ids, Tensor):
        prompt_ids = prompt_ids.tolist()
    if not isinstance(prompt_ids, list | tuple) or len(prompt_ids) == 0:
        raise InputError("prompt_ids must be a non-empty list of token ids or a list of such lists")
    if all(isinstance(x, list | tuple) for x in prompt_ids):
        return [list(p) for p in prompt_ids], True
    if any(isinstance(x, list | tuple) for x in prompt_ids):
        raise InputError("prompt_ids mixes token ids and lists: expected list[int] or list[list[int]]")
    return [list(prompt_ids)], False


def generate(
    model: torch.nn.Module,
    prompt_ids: list[int] | list[list[int]],
    max_new_tokens: int | None = None,
    *,
    params: SamplingParams | list[SamplingParams] | None = None,
    eos_token_ids: set[int] | list[int] | None = None,
    use_cache: bool = True,
    fast: bool = True,
    return_logprobs: bool = False,
    speculative: SpeculativeConfig | dict | str | None = None,
    draft_model: Any = None,
    num_speculative_tokens: int | None = None,
    **sampling: Any,
) -> list[int] | list[list[int]] | Generation | list[Generation]:
    """Generate new tokens after each prompt; return only the new ids (list, or list of lists).

    `prompt_ids` is a list of ints or a list of lists (different lengths are fine). Sampling
    keywords are `SamplingParams` fields (temperature, top_k, top_p, min_p, seed, ...); without
    them decoding is greedy (temperature=0). `params` may instead give one `SamplingParams` per
    prompt (used as is). A row stops at EOS (model config and generation_config.json, or
    `eos_token_ids`), a stop token id, or `max_new_tokens`; like transformers, the EOS/stop token
    that ended a row is the last id of its output.
    `use_cache=False` recomputes the whole sequence every step (slow; a reference for tests);
    `fast=False` uses the model's own forward instead of the decode fast path.
    `return_logprobs=True` returns `Generation`s: ids, the chosen tokens' log-probabilities and,
    with `logprobs=N`, the top-N alternatives of every step.
    Speculative decoding: `speculative="ngram"` (prompt lookup) or `draft_model=` (a folder or a
    loaded model with the same tokenizer) proposes `num_speculative_tokens` tokens per step, verified
    in one forward: greedy output is unchanged, sampled output keeps the model's distribution.
    """
    spec = speculative_config(speculative, draft_model, num_speculative_tokens)
    prompts, batched = _as_batch(prompt_ids)
    if params is None:
        sampling.setdefault("temperature", 0.0)  # the Python API is greedy unless asked to sample
    plist = _params_list(params, len(prompts), max_new_tokens=max_new_tokens, **sampling)
    vocab = model.config.vocab_size
    for p in plist:
        p.validate(vocab_size=vocab)
        if p.stop:
            raise InputError("stop strings need a tokenizer: use generate_text/stream_text, or stop_token_ids")
    eos = set(eos_token_ids) if eos_token_ids is not None else _eos_from(model)
    if spec is not None and spec.method == "draft_model" and not isinstance(spec.draft_model, torch.nn.Module):
        from llmkit.model.hf import load_model  # load the draft once for every row

        p0 = next(model.parameters())
        spec.draft_model = load_model(spec.draft_model, dtype=p0.dtype, device=p0.device)
    # speculative decoding verifies one row at a time here (the Engine batches it)
    kw = {"use_cache": use_cache, "fast": fast, "return_logprobs": return_logprobs}
    groups = [([i], Generator(model, [prompts[i]], [plist[i]], eos, speculative=spec, **kw))
              for i in range(len(prompts))] if spec is not None else \
        [(list(range(len(prompts))), Generator(model, prompts, plist, eos, **kw))]
    rows = [Generation([], [], [] if p.logprobs else None) for p in plist]
    for idx, gen in groups:
        for events in gen:
            for i, ev in zip(idx, events):
                if ev is not None:
                    rows[i].token_ids.append(ev.token_id)
                    if return_logprobs:
                        rows[i].logprobs.append(ev.logprob)
                    if rows[i].top_logprobs is not None:
                        rows[i].top_logprobs.append(ev.top_logprobs or [])
    outs = rows if return_logprobs else [r.token_ids for r in rows]
    return outs if batched else outs[0]


def _eos_from(model: torch.nn.Module) -> set[int]:
    return eos_token_ids(model, None)


def _params_list(params: SamplingParams | list[SamplingParams] | None, n: int, **kw: Any) -> list[SamplingParams]:
    if isinstance(params, list):
        if len(params) != n:
            raise InputError(f"got {len(params)} SamplingParams for {n} prompts; expected one per prompt")
        return [make_params(p) for p in params]
    return [make_params(params, **kw) for _ in range(n)]


def stream_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | list[int],
    max_new_tokens: int | None = None,
    *,
    params: SamplingParams | None = None,
    add_special_tokens: bool = True,
    speculative: SpeculativeConfig | dict | str | None = None,
    draft_model: Any = None,
    num_speculative_tokens: int | None = None,
    **sampling: Any,
) -> Iterator[str]:
    """Yield the completion of `prompt` as text deltas that never split a UTF-8 character.

    Greedy unless sampling keywords say otherwise (see `generate`). Stop strings (`stop=[...]`)
    are honoured across token boundaries and never emitted; EOS ids come from the model and the
    tokenizer; the EOS/stop token's text is not emitted. `speculative`, `draft_model` and
    `num_speculative_tokens` turn on speculative decoding (see `generate`).
    """
    spec = speculative_config(speculative, draft_model, num_speculative_tokens)
    if params is None:
        sampling.setdefault("temperature", 0.0)
    if isinstance(prompt, str):
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        prompt_ids = getattr(prompt_ids, "ids", prompt_ids)  # a raw `tokenizers.Tokenizer` returns Encoding
    else:
        prompt_ids = list(prompt)
    p = make_params(params, max_new_tokens=max_new_tokens, **sampling).validate(model.config.vocab_size)
    gen = Generator(model, [prompt_ids], [p], eos_token_ids(model, tokenizer), tokenizer=tokenizer,
                    speculative=spec)
    for (event,) in gen:
        if event is None:
            return
        if event.text:
            yield event.text
        if event.finish_reason is not None:
            return


def generate_text(model: torch.nn.Module, tokenizer: Any, prompt: str | list[int], **kw: Any) -> str:
    """The completion of `prompt` as one string (see `stream_text` for the arguments)."""
    return "".join(stream_text(model, tokenizer, prompt, **kw))
