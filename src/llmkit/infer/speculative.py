"""Speculative decoding: a cheap proposer guesses k tokens, the target model checks them in one forward.

Proposers:
- n-gram prompt lookup (Saxena 2023; vLLM's `ngram` method): the k tokens that followed the latest
  earlier occurrence of the sequence's last n tokens. No second model; strong on code and on answers
  that quote their context.
- a draft model (Leviathan et al. 2023; Chen et al. 2023): a smaller model with the same tokenizer
  samples k tokens autoregressively from its own paged KV cache.

The target scores `[last token] + draft` in one forward, giving k + 1 next-token distributions;
`rejection_sample` keeps a prefix of the draft and adds one token of its own, so every step yields
1..k+1 tokens. Greedy rows keep the draft while it equals the target's argmax (output identical to
plain decoding); sampled rows accept x_i with probability min(1, p(x_i) / q(x_i)) and otherwise draw
from norm(max(0, p - q)), which leaves the output distributed exactly as the target's p. The KV
entries of rejected tokens are rolled back (`StaticKVCache.rollback` / `PagedKVCache.rollback`).
The per-sequence step that applies this to `Sequence`s is `infer.sequence.speculative_step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from llmkit.errors import InputError
from llmkit.infer.paged_cache import PagedKVCache
from llmkit.infer.sampling import draw, sampling_probs
from llmkit.model.linear import set_decode_packing

if TYPE_CHECKING:
    from llmkit.infer.sequence import Sequence

METHODS = ("ngram", "draft_model")


@dataclass
class SpeculativeConfig:
    """How to speculate (vLLM's `speculative_config` keys). `draft_model` is a folder or a loaded model."""

    method: str = "ngram"  # "ngram" (prompt lookup) or "draft_model"
    num_speculative_tokens: int = 4  # k: tokens proposed per step
    draft_model: Any = None
    prompt_lookup_min: int = 1  # shortest suffix n-gram looked up
    prompt_lookup_max: int = 4  # longest suffix n-gram looked up (tried first)

    def validate(self) -> SpeculativeConfig:
        if self.method not in METHODS:
            raise InputError(f"speculative method {self.method!r} is unknown; expected one of {', '.join(METHODS)}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or not 1 <= k <= 64:
            raise InputError(f"num_speculative_tokens={k!r} is invalid: expected an integer in [1, 64]")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise InputError(f"prompt_lookup_min={lo!r}, prompt_lookup_max={hi!r}: expected 1 <= min <= max")
        if self.method == "draft_model" and self.draft_model is None:
            raise InputError("speculative method 'draft_model' needs a draft model (--draft-model DIR)")
        if self.method == "ngram" and self.draft_model is not None:
            raise InputError("a draft model was given with speculative method 'ngram'; use method 'draft_model'")
        return self


def speculative_config(
    speculative: SpeculativeConfig | dict | str | None = None,
    draft_model: Any = None,
    num_speculative_tokens: int | None = None,
) -> SpeculativeConfig | None:
    """A validated `SpeculativeConfig` from the forms the API takes (None: no speculation).

    `speculative` is a config, a dict of its fields, or a method name ("ngram", "draft_model");
    `draft_model` alone means method "draft_model".
    """
    if speculative is None and draft_model is None:
        if num_speculative_tokens is not None:
            raise InputError("num_speculative_tokens needs a speculative method (ngram) or a draft model")
        return None
    if isinstance(speculative, SpeculativeConfig):
        cfg = SpeculativeConfig(**vars(speculative))
    elif isinstance(speculative, dict):
        unknown = set(speculative) - set(SpeculativeConfig.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown speculative config key(s) {sorted(unknown)}; expected some of "
                             f"{sorted(SpeculativeConfig.__dataclass_fields__)}")
        cfg = SpeculativeConfig(**speculative)
    elif isinstance(speculative, str):
        cfg = SpeculativeConfig(method=speculative)
    elif speculative is None:
        cfg = SpeculativeConfig(method="draft_model")
    else:
        raise InputError(f"speculative must be a SpeculativeConfig, dict or method name, got {type(speculative)}")
    if draft_model is not None:
        cfg.draft_model, cfg.method = draft_model, "draft_model"
    if num_speculative_tokens is not None:
        cfg.num_speculative_tokens = num_speculative_tokens
    return cfg.validate()


# ---------------------------------------------------------------- proposers


def ngram_propose(tokens: list[int], k: int, n_min: int = 1, n_max: int = 4) -> list[int]:
    """Prompt lookup: the (up to) k tokens that followed the latest earlier occurrence of the last n
    tokens, trying n = n_max down to n_min; [] when no suffix occurs earlier."""
    L = len(tokens)
    if k < 1 or L < 2:
        return []
    last = tokens[-1]
    ends = [i for i in range(L - 2, -1, -1) if tokens[i] == last]  # earlier positions of the last token, latest first
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = tokens[L - n :]
        for i in ends:
            if i >= n - 1 and tokens[i - n + 1 : i + 1] == suffix:
                return tokens[i + 1 : i + 1 + k]
    return []


class NgramProposer:
    """n-gram prompt lookup over each sequence's own tokens (prompt + generated)."""

    def __init__(self, cfg: SpeculativeConfig):
        self.cfg = cfg

    def propose(self, seqs: list[Sequence], keys: list[int], limits: list[int]) -> tuple[list[list[int]], None]:
        """Drafts of at most limits[b] tokens per sequence; no draft distributions (q is one-hot)."""
        c = self.cfg
        return [ngram_propose(s.tokens, k, c.prompt_lookup_min, c.prompt_lookup_max) if k > 0 else []
                for s, k in zip(seqs, limits)], None

    def retain(self, keys: list[int]) -> None:
        """Nothing to free (the n-gram proposer keeps no state)."""


class DraftModelProposer:
    """A draft model samples k tokens per sequence, batched, over a paged KV cache of its own.

    Each sequence's cache holds a prefix of its tokens; before proposing it is cut back to the
    longest prefix still shared with the sequence (the accepted part of the last draft) and caught
    up on the tokens after it. Rows are sampled with the request's own parameters and generator,
    and the draft distribution q of every proposed token is returned for rejection sampling.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, max_seq_len: int, max_batch_size: int = 1,
                 kv_block_size: int = 16, max_chunk: int = 512, fast_decode: bool = True):
        cfg = model.config
        if getattr(model, "is_encoder_decoder", False):
            raise InputError("the draft model must be a decoder-only model with the target's tokenizer")
        self.model = model.eval()
        set_decode_packing(model, fast_decode)
        self.vocab_size = vocab_size  # the target's
        self.max_seq_len = min(max_seq_len, cfg.block_size)
        self.max_chunk = max_chunk
        p = next(model.parameters())
        self.device = p.device
        windows = {cfg.window_for_layer(i) for i in range(cfg.n_layer)}
        blocks_per_seq = -(-self.max_seq_len // kv_block_size)
        # keep every block (no sliding-window freeing): a rollback may reach back past a freed block
        self.cache = PagedKVCache(n_layer=cfg.n_layer, n_kv_head=cfg.n_kv_head or cfg.n_head,
                                  head_dim=getattr(cfg, "head_dim", None) or cfg.n_embd // cfg.n_head,
                                  num_blocks=max_batch_size * blocks_per_seq, kv_block_size=kv_block_size,
                                  dtype=p.dtype, device=p.device, mask_windows=windows)
        self.cached: dict[int, list[int]] = {}  # key -> tokens in the draft cache

    def retain(self, keys: list[int]) -> None:
        """Free the cache of every sequence not in `keys` (finished, cancelled or preempted)."""
        for key in set(self.cached) - set(keys):
            self.cache.free_sequence(key)
            del self.cached[key]

    def _sync(self, seq: Sequence, key: int) -> list[int] | None:
        """Cut the key's cache back to its common prefix with seq.tokens[:-1]; the tokens to feed next."""
        if key not in self.cached:
            if self.cache.num_free_blocks < self.cache.blocks_needed(self.max_seq_len):
                return None
            self.cache.add_sequence(key)
            self.cached[key] = []
        have, toks = self.cached[key], seq.tokens
        n = 0
        limit = min(len(have), len(toks) - 1)
        while n < limit and have[n] == toks[n]:
            n += 1
        if n < len(have):
            self.cache.rollback(key, n)
            del have[n:]
        return toks[n:]

    def _forward(self, keys: list[int], chunks: list[list[int]]) -> Tensor:
        """Append chunks[b] to key b's draft cache; logits of each chunk's last token [B, V_target]."""
        batch = self.cache.batch(keys, chunks)
        x = batch.input_ids()  # [B, T] right-padded by repeating each row's last token
        logits = self.model(x, position_ids=batch.meta.position_ids, kv_cache=batch, attn_meta=batch.meta,
                            num_logits_to_keep=1)[:, -1].float()
        batch.commit()
        for key, c in zip(keys, chunks):
            self.cached[key] += c
        V, Vd = self.vocab_size, logits.shape[-1]
        if Vd > V:
            return logits[:, :V]
        return torch.nn.functional.pad(logits, (0, V - Vd), value=float("-inf")) if Vd < V else logits

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], keys: list[int], limits: list[int]) -> tuple[list[list[int]], list]:
        """Drafts of at most limits[b] tokens, and per row the draft distributions q [len(draft), V]."""
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[list[Tensor]] = [[] for _ in seqs]
        feed: dict[int, list[int]] = {}
        for b, (s, key, k) in enumerate(zip(seqs, keys, limits)):
            k = min(k, self.max_seq_len - len(s.tokens))  # the draft's own context
            if k > 0 and (todo := self._sync(s, key)) is not None:
                feed[b] = todo
        limits = [min(k, self.max_seq_len - len(s.tokens)) for s, k in zip(seqs, limits)]
        while feed:
            long = [b for b in feed if len(feed[b]) > self.max_chunk]  # catch up long prefixes first
            if long:
                self._forward([keys[b] for b in long], [feed[b][: self.max_chunk] for b in long])
                for b in long:
                    feed[b] = feed[b][self.max_chunk :]
                continue
            rows = list(feed)
            logits = self._forward([keys[b] for b in rows], [feed[b] for b in rows])  # [R, V]
            params = [seqs[b].params for b in rows]
            hist = [seqs[b].tokens + drafts[b] for b in rows]
            q, _ = sampling_probs(logits, params, hist, [seqs[b].prompt_len for b in rows])
            for i, b in enumerate(rows):
                g = seqs[b].generator
                x = int(q[i].argmax()) if params[i].temperature == 0 else int(draw(q[i : i + 1], [g])[0])
                drafts[b].append(x)
                qs[b].append(q[i])
            feed = {b: [drafts[b][-1]] for b in rows if len(drafts[b]) < limits[b]}
        return drafts, [torch.stack(q) if q else None for q in qs]


def make_proposer(cfg: SpeculativeConfig, target: torch.nn.Module, max_seq_len: int, max_batch_size: int = 1,
                  fast_decode: bool = True) -> NgramProposer | DraftModelProposer:
    """The proposer for `cfg` (loading the draft model from its folder when given a path)."""
    if cfg.method == "ngram":
        return NgramProposer(cfg)
    draft = cfg.draft_model
    if not isinstance(draft, torch.nn.Module):
        from llmkit.model.hf import load_model

        p = next(target.parameters())
        draft = load_model(draft, dtype=p.dtype if p.is_floating_point() else None, device=p.device)
    return DraftModelProposer(draft, target.config.vocab_size, max_seq_len, max_batch_size,
                              fast_decode=fast_decode)


def draft_limit(seq: Sequence, k: int, model: torch.nn.Module) -> int:
    """How many tokens to propose for `seq` this step: at most k, none past its last token
    (`max_new_tokens`), none for a grammar-constrained row, and none whose verification would
    cross a LongRoPE model's original context (its RoPE changes there; see `rope_switch_length`)."""
    if seq.constraint is not None:
        return 0
    k = min(k, seq.params.max_new_tokens - seq.n_generated - 1)
    switch = rope_switch_length(model)
    if switch is not None and len(seq.tokens) <= switch:
        k = min(k, switch - len(seq.tokens))  # the verify forward's last position stays < switch
    return max(k, 0)


def rope_switch_length(model: torch.nn.Module) -> int | None:
    """The sequence length past which the whole sequence's RoPE changes (LongRoPE: short -> long
    factors past `original_max_position_embeddings`), or None."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "rope_type", None) == "longrope" and getattr(cfg, "pos", "rope") == "rope":
        return int(cfg.rope_scaling["original_max_position_embeddings"])
    return None


# ---------------------------------------------------------------- verification


def rejection_sample(p: Tensor, draft: list[int], q: Tensor | None, generator: torch.Generator | None,
                     greedy: bool) -> list[int]:
    """The tokens one verification step emits: an accepted prefix of `draft` plus one target token.

    p [k+1, V]: the target's sampling distributions after each draft prefix (`sampling_probs`);
    q [k, V]: the draft's distributions, None for a deterministic proposal (q_i = one-hot(x_i)).
    Greedy keeps x_i while it is the target's argmax. Otherwise x_i is accepted with probability
    min(1, p_i(x_i) / q_i(x_i)); the first rejected position draws from norm(max(0, p_i - q_i)), and
    when all k are accepted a bonus token is drawn from p_{k+1}.
    """
    out: list[int] = []
    for i, x in enumerate(draft):
        if greedy:
            best = int(p[i].argmax())
            out.append(best)
            if best != x:
                return out
            continue
        px = float(p[i, x])
        qx = float(q[i, x]) if q is not None else 1.0
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if qx > 0 and u < px / qx:
            out.append(x)
            continue
        residual = p[i].clone()
        if q is None:
            residual[x] = 0.0
        else:
            residual = (residual - q[i]).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p is exact
            residual = p[i]
        out.append(int(draw(residual[None], [generator])[0]))
        return out
    k = len(draft)
    out.append(int(p[k].argmax()) if greedy else int(draw(p[k : k + 1], [generator])[0]))
    return out
