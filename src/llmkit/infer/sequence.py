"""The one decode step shared by `generate`/`stream_text` (static cache) and the `Engine` (paged cache).

A `Sequence` is one row being generated: its tokens, sampling state and the single
token -> text/finish path (stop ids and EOS, UTF-8-safe detokenizing, stop strings, length).
`sample_step` turns one forward's last-position logits into one `TokenEvent` per row;
`speculative_step` turns one verification forward over `[last token] + draft` into 1..k+1 events
per row (infer/speculative.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmkit.infer.detok import IncrementalDetokenizer
from llmkit.infer.grammar import Constraint, mask_logits
from llmkit.infer.sampling import SamplingParams, sample_next, sampling_probs
from llmkit.infer.speculative import rejection_sample
from llmkit.infer.stopping import StopChecker


@dataclass
class TokenEvent:
    """One generated token as it is streamed to the caller.

    `text` is the new text this token made visible (UTF-8 safe, stop strings removed; may be "").
    `logprob` is log p(token) under the model's distribution (after logit bias/penalties), None
    when the request asked for no log-probabilities (`Sequence.return_logprobs`);
    `top_logprobs` lists (token_id, logprob) of the top-N alternatives when `params.logprobs` is set.
    `finish_reason` is set on the last event: "stop" (EOS, stop token or stop string) or "length".
    """

    token_id: int
    text: str
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


class Sequence:
    """One row being generated: prompt + generated tokens, sampler state, detokenizer and stop checks.

    `return_logprobs=False` (and no `params.logprobs`): its events carry no log-probability (None),
    which saves the step a log-sum-exp over the vocabulary.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        eos_token_ids: set[int],
        tokenizer: Any = None,
        device: torch.device | str = "cpu",
        return_logprobs: bool = True,
    ):
        self.params = params
        self.return_logprobs = return_logprobs or params.logprobs is not None
        self.tokens = list(prompt_ids)  # prompt + generated
        self.prompt_len = len(prompt_ids)
        self.generator = params.make_generator(device)
        self.checker = StopChecker(params.stop, set(params.stop_token_ids or ()), eos_token_ids, params.ignore_eos)
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self.raw_text = ""  # decoded text so far, held-back part included
        self.finish_reason: str | None = None
        self.constraint = Constraint(tokenizer, params.grammar, eos_token_ids) if params.grammar else None

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def add(self, token: int) -> tuple[str, str | None]:
        """Append a sampled token; return (text it made visible, finish reason or None)."""
        self.tokens.append(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        finish = self.checker.check_token(token)  # stop token / EOS: its text is not shown
        text = ""
        stop_string_hit = False
        if finish is None and self.detok is not None:
            stop_string_hit, text = self._text_step(self.detok.add(token))
            finish = "stop" if stop_string_hit else None
        if finish is None and self.n_generated >= self.params.max_new_tokens:
            finish = "length"
        if finish is not None and not stop_string_hit and self.detok is not None:
            # release what the detokenizer and the stop checker were still holding back
            hit, more = self._text_step(self.detok.flush())
            text += more if hit else more + self.checker.flush(self.raw_text)
        self.finish_reason = finish
        return text, finish

    def _text_step(self, delta: str) -> tuple[bool, str]:
        """Run a detokenized delta through the stop-string checker: (stop string hit, text to show)."""
        hit, emit = self.checker.check_text(self.raw_text, delta)
        self.raw_text += delta
        return hit, emit


def sample_step(
    logits: torch.Tensor, seqs: list[Sequence], active: list[bool] | None = None
) -> list[TokenEvent | None]:
    """Sample every row's next token from `logits` [B, V] and pass it through its `Sequence`.

    Rows not `active` (finished, kept in a static batch) get None and are not advanced.
    A row with a grammar (`params.grammar`) samples only among the tokens its grammar allows.
    """
    constrained = [b for b, s in enumerate(seqs) if s.constraint is not None and (active is None or active[b])]
    if constrained:
        logits = logits.float().clone()
        mask_logits(logits, constrained, [seqs[b].constraint for b in constrained])
    out = sample_next(
        logits, [s.params for s in seqs], [s.tokens for s in seqs], [s.generator for s in seqs],
        prompt_lens=[s.prompt_len for s in seqs], need_logprobs=[s.return_logprobs for s in seqs],
    )
    token_ids = out.token_ids.tolist()
    logprobs = out.logprobs.tolist() if out.logprobs is not None else [None] * len(seqs)
    top_ids = out.top_ids.tolist() if out.top_ids is not None else None
    top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    events: list[TokenEvent | None] = []
    for b, seq in enumerate(seqs):
        if active is not None and not active[b]:
            events.append(None)
            continue
        n_top = seq.params.logprobs
        top = list(zip(top_ids[b][:n_top], top_lps[b][:n_top])) if n_top and top_ids is not None else None
        text, finish = seq.add(token_ids[b])
        events.append(TokenEvent(token_ids[b], text, logprobs[b] if seq.return_logprobs else None, top, finish))
    return events


def speculative_step(
    logits: list[torch.Tensor],
    drafts: list[list[int]],
    draft_probs: list[torch.Tensor | None] | None,
    seqs: list[Sequence],
) -> tuple[list[list[TokenEvent]], list[int]]:
    """Verify each row's draft and pass the tokens it keeps through its `Sequence`.

    logits[b] [1 + len(drafts[b]), V]: the target's next-token logits after the row's last token and
    after each draft prefix; draft_probs[b] [len(drafts[b]), V] the draft's distributions (None: a
    deterministic n-gram draft). Returns the events of every row (its accepted draft prefix, then
    the target's own token; cut at the first finish) and the number of draft tokens each row
    accepted. A row without a draft takes a plain `sample_step`.
    """
    events: list[list[TokenEvent]] = [[] for _ in seqs]
    accepted = [0] * len(seqs)
    plain = [b for b, d in enumerate(drafts) if not d]
    if plain:
        evs = sample_step(torch.stack([logits[b][0] for b in plain]), [seqs[b] for b in plain])
        for b, ev in zip(plain, evs):
            events[b] = [ev]
    spec = [b for b, d in enumerate(drafts) if d]
    if not spec:
        return events, accepted
    params, hist, plens = [], [], []
    for b in spec:  # one row per verified position: the history it is sampled after (for penalties)
        s, d = seqs[b], drafts[b]
        for i in range(len(d) + 1):
            params.append(s.params)
            hist.append(s.tokens + d[:i])
            plens.append(s.prompt_len)
    p, lp = sampling_probs(torch.cat([logits[b][: len(drafts[b]) + 1] for b in spec]), params, hist, plens)
    off = 0
    for b in spec:
        s, d = seqs[b], drafts[b]
        q = draft_probs[b] if draft_probs is not None else None
        tokens = rejection_sample(p[off : off + len(d) + 1], d, q, s.generator, s.params.temperature == 0)
        accepted[b] = len(tokens) - 1
        n_top = s.params.logprobs
        for i, t in enumerate(tokens):
            row = lp[off + i]
            top = None
            if n_top:
                v, ids = row.topk(n_top)
                top = list(zip(ids.tolist(), v.tolist()))
            text, finish = s.add(t)
            events[b].append(TokenEvent(t, text, float(row[t]) if s.return_logprobs else None, top, finish))
            if finish is not None:
                break
        off += len(d) + 1
    return events, accepted
