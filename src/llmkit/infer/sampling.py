"""Next-token sampling: logit processors (bias, penalties, temperature, top-k/top-p/min-p) and draws.

One call handles a whole batch; every row carries its own `SamplingParams` and its own
`torch.Generator`, so a seeded request draws the same tokens whatever it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.errors import InputError
from llmkit.infer.grammar import Grammar
from llmkit.model import kernels

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """How to pick each new token and when to stop (OpenAI/vLLM semantics)."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off
    min_p: float = 0.0  # 0 -> off
    repetition_penalty: float = 1.0  # HF/CTRL: on prompt + generated tokens
    presence_penalty: float = 0.0  # OpenAI: on generated tokens only
    frequency_penalty: float = 0.0  # OpenAI: on generated tokens only
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None  # also return the top-N alternatives
    ignore_eos: bool = False
    grammar: Grammar | None = None  # constrained decoding (infer/grammar.py): output must match it

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise `InputError` naming the first out-of-range field; return self."""

        def bad(name: str, expected: str) -> InputError:
            return InputError(f"sampling parameter {name}={getattr(self, name)!r} is invalid: expected {expected}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not self.temperature >= 0:
            raise bad("temperature", "a number >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 means off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "a number in [0, 1]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "a number > 0 (1 means off)")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "a number in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "a number in [-2, 2]")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            raise bad("seed", "an integer in [-2**63, 2**64) or None")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "an integer in [0, 20] or None")
        if self.stop is not None:
            if isinstance(self.stop, str):
                self.stop = [self.stop]
            if not all(isinstance(s, str) and s for s in self.stop):
                raise bad("stop", "a list of non-empty strings")
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError) as e:
                raise bad("logit_bias", "a mapping of integer token ids to numbers") from e
        ids = list(self.stop_token_ids or []) + list(self.logit_bias or {})
        for t in ids:
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                limit = f"< {vocab_size}" if vocab_size is not None else ""
                raise InputError(f"token id {t!r} in stop_token_ids/logit_bias is invalid: expected 0 <= id {limit}")
        return self

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded with `seed`, or None (use the global RNG) when unseeded."""
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


@dataclass
class SampleOutput:
    token_ids: Tensor  # [B] long
    logprobs: Tensor | None  # [B] float: log p(chosen token); None when no row asked for it
    top_ids: Tensor | None = None  # [B, N] long, N = max logprobs over the batch
    top_logprobs: Tensor | None = None  # [B, N] float


def apply_penalties(
    logits: Tensor,
    params: list[SamplingParams],
    history: list[list[int]],
    prompt_lens: list[int] | None = None,
) -> Tensor:
    """Apply logit_bias, repetition penalty and presence/frequency penalties in place; return logits.

    Repetition penalty (CTRL, as in HF `RepetitionPenaltyLogitsProcessor`) covers every token of
    `history` (prompt included): a positive logit is divided by the penalty, a negative one
    multiplied. Presence/frequency penalties (OpenAI) cover only generated tokens, i.e.
    `history[i][prompt_lens[i]:]`: `logit -= frequency * count + presence * (count > 0)`.
    """
    V = logits.shape[-1]
    for i, p in enumerate(params):
        if p.logit_bias:
            ids = torch.tensor([int(k) for k in p.logit_bias], dtype=torch.long, device=logits.device)
            vals = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            logits[i].index_add_(0, ids, vals)
        if p.repetition_penalty != 1.0 and history[i]:
            ids = torch.tensor(sorted(set(history[i])), dtype=torch.long, device=logits.device)
            seen = logits[i, ids]
            seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
            logits[i, ids] = seen
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            start = prompt_lens[i] if prompt_lens is not None else 0
            gen = history[i][start:]
            if gen:
                counts = torch.bincount(torch.tensor(gen, device=logits.device), minlength=V)[:V]
                counts = counts.to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def truncate_sorted(sorted_logits: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Mask (to -inf) what top-k, then top-p, then min-p remove; logits sorted descending [B, K].

    top_k [B] long (0 = off), top_p [B] float (1 = off), min_p [B] float (0 = off). The most
    likely token always survives.
    """
    B, K = sorted_logits.shape
    rank = torch.arange(K, device=sorted_logits.device).expand(B, K)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, K))
    out = sorted_logits.masked_fill(rank >= k[:, None], NEG_INF)
    probs = torch.softmax(out, dim=-1)
    # top-p (nucleus, Holtzman et al.): keep the smallest prefix whose mass reaches top_p
    mass_before = probs.cumsum(-1) - probs
    out = out.masked_fill((mass_before >= top_p[:, None]) & (rank > 0), NEG_INF)
    # min-p: drop tokens less likely than min_p * p(top token) (of the distribution before top-p)
    out = out.masked_fill((probs < min_p[:, None] * probs[:, :1]) & (rank > 0), NEG_INF)
    return out


def draw(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """One draw per row from unnormalised probabilities [B, V] by inverse CDF; each row uses its own RNG."""
    B = probs.shape[0]
    if all(g is None for g in generators):  # one call on the global RNG: the same numbers as B calls
        u = torch.rand(B, dtype=torch.float64)
    else:
        u = torch.empty(B, dtype=torch.float64)
        for i, g in enumerate(generators):
            u[i] = torch.rand((), generator=g, dtype=torch.float64)  # g=None -> global RNG
    cdf = probs.double().cumsum(-1)  # [B, V]
    target = (u.to(cdf.device) * cdf[:, -1])[:, None]  # [B, 1]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)  # first index with cdf > target
    return idx.clamp_(max=probs.shape[-1] - 1)


def sample_next(
    logits: Tensor,
    params: list[SamplingParams],
    history: list[list[int]],
    generators: list[torch.Generator | None],
    prompt_lens: list[int] | None = None,
    need_logprobs: list[bool] | None = None,
) -> SampleOutput:
    """Pick one token per row from next-token `logits` [B, V] (float32).

    Per row: logit_bias, repetition penalty (over `history[i]`, prompt included), presence and
    frequency penalties (over `history[i][prompt_lens[i]:]`, the generated tokens; prompt_lens
    defaults to 0, i.e. the whole history counts as generated), temperature (0 = greedy),
    top-k, top-p, min-p, then a draw with `generators[i]` (None = global RNG).

    The returned logprobs (chosen and top-N) are log-softmax of the logits *after* bias and
    penalties but *before* temperature and truncation, i.e. the model's distribution (like
    vLLM's default). `logits` is not modified. The chosen tokens' logprobs are computed when a row
    of `need_logprobs` (default: all) or of `params.logprobs` asks for them, else they are None: the
    log-sum-exp over the vocabulary is a sizeable part of a small model's decode step.
    """
    B, V = logits.shape
    if len(params) != B or len(history) != B or len(generators) != B:
        raise InputError(
            f"sample_next got {B} logit rows but {len(params)} params, {len(history)} "
            f"histories and {len(generators)} generators; expected one of each per row"
        )
    logits = logits.float()
    if any(p.logit_bias or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
        logits = apply_penalties(logits.clone(), params, history, prompt_lens)
    n_top = max((p.logprobs or 0) for p in params)

    greedy = [p.temperature == 0 for p in params]
    chosen = None  # the chosen tokens' logits, when the argmax already gave them
    if all(greedy):  # the first maximal index, as argmax (llmkit's C pass for fp32 CPU logits)
        top = kernels.argmax_rows(logits, lib) if kernels.readable(logits) and (lib := kernels.decode_lib()) else None
        chosen, token_ids = top if top is not None else logits.max(-1)
    else:
        temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
        scaled = logits / temp[:, None]
        top_k = torch.tensor([min(p.top_k, V) for p in params], dtype=torch.long, device=logits.device)
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)
        min_p = torch.tensor([p.min_p for p in params], device=logits.device)
        if all(p.top_k == 0 and p.top_p >= 1.0 and p.min_p <= 0.0 for p in params):
            sampled = draw(torch.softmax(scaled, -1), generators)
        else:
            if all(p.top_k > 0 for p in params):  # only the top max(k) can survive: partial sort
                sorted_logits, sorted_idx = scaled.topk(int(top_k.max()), dim=-1)
            else:
                sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True, stable=True)
            kept = truncate_sorted(sorted_logits, top_k, top_p, min_p)
            pos = draw(torch.softmax(kept, -1), generators)
            sampled = sorted_idx.gather(1, pos[:, None]).squeeze(1)
        token_ids = torch.where(torch.tensor(greedy, device=logits.device), logits.argmax(-1), sampled)

    if n_top == 0 and need_logprobs is not None and not any(need_logprobs) and \
            all(p.logprobs is None for p in params):
        return SampleOutput(token_ids=token_ids, logprobs=None)
    log_z = torch.logsumexp(logits, dim=-1)  # [B]
    if chosen is None:
        chosen = logits.gather(1, token_ids[:, None]).squeeze(1)
    chosen_lp = chosen - log_z
    top_ids = top_lp = None
    if n_top > 0:
        top_logits, top_ids = logits.topk(n_top, dim=-1)
        top_lp = top_logits - log_z[:, None]
    return SampleOutput(token_ids=token_ids, logprobs=chosen_lp, top_ids=top_ids, top_logprobs=top_lp)


def sampling_probs(
    logits: Tensor,
    params: list[SamplingParams],
    history: list[list[int]],
    prompt_lens: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """The distribution `sample_next` draws each row's token from, and the model's log-probabilities.

    Returns (probs [B, V] in vocab order: after bias, penalties, temperature, top-k/top-p/min-p;
    one-hot on the argmax for greedy rows) and (logprobs [B, V]: log-softmax after bias and
    penalties only, what `sample_next` reports). Speculative decoding verifies drafts against it.
    """
    logits = logits.float()
    if any(p.logit_bias or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
        logits = apply_penalties(logits.clone(), params, history, prompt_lens)
    logprobs = torch.log_softmax(logits, dim=-1)
    probs = torch.zeros_like(logits)
    greedy = torch.tensor([p.temperature == 0 for p in params], device=logits.device)
    if not bool(greedy.all()):
        temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
        V = logits.shape[-1]
        top_k = torch.tensor([min(p.top_k, V) for p in params], dtype=torch.long, device=logits.device)
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)
        min_p = torch.tensor([p.min_p for p in params], device=logits.device)
        sorted_logits, sorted_idx = (logits / temp[:, None]).sort(dim=-1, descending=True, stable=True)
        kept = truncate_sorted(sorted_logits, top_k, top_p, min_p)
        probs.scatter_(1, sorted_idx, torch.softmax(kept, dim=-1))
    one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, probs), logprobs
