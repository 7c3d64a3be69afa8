"""Pretraining objectives besides the causal LM: BERT masked LM (`mlm`) and T5 span corruption (`span`).

Both read the same token windows as `clm` (RandomWindowSampler over `llmkit data prepare` shards) and turn
each window into (inputs, labels) here; the Trainer only asks an objective for its model and its loss.
Random draws use torch's global RNG, which checkpoints save and restore, so resume stays exact.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import ConfigError
from llmkit.model.config import ModelConfig

OBJECTIVES = ("clm", "mlm", "span")
MASK_TOKEN = "[MASK]"
N_SENTINELS = 100  # T5's <extra_id_0> .. <extra_id_99>


# ---------------------------------------------------------------------------- masked LM (Devlin et al., 2019)
def word_starts(token_texts: list[str]) -> torch.Tensor:
    """[V] bool: does token v start a word? A token continues a word when it begins with a letter/digit
    (no leading space, `Ġ` or `▁`); used for whole-word masking with any tokenizer (char, byte-BPE)."""
    starts = [not (t[:1].isalnum()) for t in token_texts]
    return torch.tensor(starts, dtype=torch.bool)


def mask_tokens(
    ids: torch.Tensor,  # [B, T]
    mask_id: int,
    n_random: int,  # random replacements are drawn from ids [0, n_random)
    prob: float = 0.15,
    starts: torch.Tensor | None = None,  # [V] bool from `word_starts`: whole-word masking
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: select `prob` of the tokens (or of the words), then 80% -> [MASK], 10% -> a random token,
    10% kept. Returns inputs [B, T] and labels [B, T] (the original id where selected, else -100)."""
    g = generator
    if starts is None:
        selected = torch.rand(ids.shape, generator=g) < prob
    else:
        is_start = starts[ids].clone()
        is_start[:, 0] = True  # a window may begin mid-word: that fragment is a word of its own
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        start_of = torch.where(is_start, pos, 0).cummax(1).values  # [B, T] where each token's word starts
        chosen = torch.rand(ids.shape, generator=g) < prob  # read at word starts only: one draw per word
        selected = torch.gather(chosen, 1, start_of)
    labels = ids.masked_fill(~selected, -100)
    r = torch.rand(ids.shape, generator=g)
    to_mask = selected & (r < 0.8)
    to_random = selected & (r >= 0.8) & (r < 0.9)
    inputs = ids.masked_fill(to_mask, mask_id)
    rand = torch.randint(n_random, ids.shape, generator=g)
    inputs = torch.where(to_random, rand, inputs)
    return inputs, labels


# ---------------------------------------------------------------------------- span corruption (Raffel et al., 2020)
def _segments(n: int, k: int, g: torch.Generator | None) -> list[int]:
    """A uniformly random split of n items into k non-empty segments (their lengths)."""
    cuts = (torch.randperm(n - 1, generator=g)[: k - 1] + 1).sort().values.tolist()
    edges = [0, *cuts, n]
    return [b - a for a, b in zip(edges, edges[1:])]


def span_noise_mask(length: int, noise: float = 0.15, mean_span: float = 3.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """[length] bool, True = corrupted: round(noise * length) tokens in round(n_noise / mean_span) spans,
    alternating with kept spans and starting with a kept one (T5's `random_spans_noise_mask`)."""
    n_noise = min(max(round(length * noise), 1), length - 1)
    n_spans = max(min(round(n_noise / mean_span), n_noise, length - n_noise), 1)
    keep = _segments(length - n_noise, n_spans, generator)
    drop = _segments(n_noise, n_spans, generator)
    out = []
    for k, d in zip(keep, drop):
        out += [False] * k + [True] * d
    return torch.tensor(out)


def span_corrupt(ids: torch.Tensor, noise_mask: torch.Tensor, sentinel0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence [T] -> (inputs, targets): each corrupted span becomes one sentinel in the inputs;
    the targets are each sentinel followed by the span it replaced. Sentinel i is `sentinel0 - i`."""
    inputs, targets, i, prev = [], [], -1, False
    for tok, m in zip(ids.tolist(), noise_mask.tolist()):
        if m and not prev:
            i += 1
            inputs.append(sentinel0 - i)
            targets.append(sentinel0 - i)
        if m:
            targets.append(tok)
        else:
            inputs.append(tok)
        prev = m
    return torch.tensor(inputs), torch.tensor(targets)


def span_restore(inputs: list[int], targets: list[int], sentinel0: int, n_sentinels: int = N_SENTINELS) -> list[int]:
    """Undo `span_corrupt`: put every target span back in place of its sentinel."""
    spans: dict[int, list[int]] = {}
    cur = None
    for t in targets:
        if sentinel0 - n_sentinels < t <= sentinel0:
            cur = spans.setdefault(t, [])
        else:
            cur.append(t)
    out = []
    for t in inputs:
        out += spans[t] if t in spans else [t]
    return out


# ---------------------------------------------------------------------------- the objectives the Trainer runs
class MaskedLM:
    """`train.objective: mlm`: BertForMaskedLM over windows; [MASK] is the tokenizer's if it has one,
    else added to it (one id after the vocabulary; the saved tokenizer names it `mask_token`)."""

    name = "mlm"

    def __init__(self, tokenizer, whole_word: bool = False, prob: float = 0.15, nsp: bool = False):
        V = tokenizer.vocab_size
        texts = [tokenizer.decode([i]) for i in range(V)] if whole_word else None
        self.mask_id = tokenizer.add_special_tokens([MASK_TOKEN], "mask_token")[0]  # saved with the model
        self.nsp = nsp
        if nsp:  # [CLS] A [SEP] B [SEP]
            self.cls_id = tokenizer.add_special_tokens(["[CLS]"], "cls_token")[0]
            self.sep_id = tokenizer.add_special_tokens(["[SEP]"], "sep_token")[0]
        self.n_random, self.prob = min(V, self.mask_id), prob  # random replacements: ordinary tokens
        self.vocab_size = max(tokenizer.vocab_size, self.mask_id + 1)
        self.starts = None
        if whole_word:
            self.starts = word_starts(texts + ["[MASK]"] * (self.vocab_size - V))

    def model_config(self, base: ModelConfig, seq_len: int) -> ModelConfig:
        return dataclasses.replace(
            base, model_type="bert", vocab_size=self.vocab_size, norm="layernorm", norm_eps=1e-12, norm_bias=True,
            mlp="gelu", activation="gelu", pos="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True,
            intermediate_size=base.intermediate_size or 4 * base.n_embd, block_size=seq_len, n_kv_head=None,
            tie_embeddings=True, pad_token_id=None, n_expert=0,
        )

    def build(self, cfg: ModelConfig) -> nn.Module:
        from llmkit.model.bert import BertForMaskedLM

        return BertForMaskedLM(cfg, nsp=self.nsp)

    def batch(self, x: torch.Tensor, generator: torch.Generator | None = None):
        if not self.nsp:
            inputs, labels = mask_tokens(x, self.mask_id, self.n_random, self.prob, self.starts, generator)
            return (inputs,), labels
        return self.nsp_batch(x, generator)

    def nsp_batch(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """[CLS] A [SEP] B [SEP] from windows x [B, T]: A is the first (T-3)//2 tokens; B is what follows
        (IsNext, label 0) or, half of the time, the same span of another row (NotNext, label 1)."""
        n, T = x.shape
        a = (T - 3) // 2
        is_random = torch.rand(n, generator=generator) < 0.5  # [n]
        second = torch.where(is_random[:, None], x.roll(1, 0)[:, a : T - 3], x[:, a : T - 3])
        inputs, labels = mask_tokens(torch.cat([x[:, :a], second], 1), self.mask_id, self.n_random, self.prob,
                                     self.starts, generator)

        def frame(t: torch.Tensor, cls: int, sep: int) -> torch.Tensor:
            col = t.new_full((n, 1), 0)
            return torch.cat([col + cls, t[:, :a], col + sep, t[:, a:], col + sep], 1)  # [n, T]

        ids, labels = frame(inputs, self.cls_id, self.sep_id), frame(labels, -100, -100)
        types = torch.zeros_like(ids)
        types[:, a + 2 :] = 1
        return (ids, None, types), (labels, is_random.long())

    def logits(self, model: nn.Module, inputs: tuple):
        return model(*inputs, return_nsp=True) if self.nsp else model(*inputs)


class SpanCorruption:
    """`train.objective: span`: T5 encoder-decoder; sentinels are the tokenizer's `<extra_id_0..99>`, added
    after the vocabulary when missing (<extra_id_0> is the highest id, as in T5)."""

    name = "span"

    def __init__(self, tokenizer, noise: float = 0.15, mean_span: float = 3.0):
        ids = tokenizer.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(N_SENTINELS))])
        self.sentinel0 = ids[-1]  # <extra_id_0>; <extra_id_i> is sentinel0 - i
        self.vocab_size = max(tokenizer.vocab_size, self.sentinel0 + 1)
        self.noise, self.mean_span = noise, mean_span

    def model_config(self, base: ModelConfig, seq_len: int) -> ModelConfig:
        return dataclasses.replace(
            base, model_type="t5", vocab_size=self.vocab_size, norm="rmsnorm", norm_eps=1e-6, mlp="gelu",
            activation="relu", pos="none", head_dim=base.n_embd // base.n_head, n_kv_head=None,
            intermediate_size=base.intermediate_size or 4 * base.n_embd, block_size=seq_len,
            n_decoder_layer=base.n_decoder_layer or base.n_layer, tie_embeddings=True, scale_decoder_outputs=True,
            pad_token_id=0, decoder_start_token_id=0, qkv_bias=False, n_expert=0, norm_offset=0.0,
        )

    def build(self, cfg: ModelConfig) -> nn.Module:
        from llmkit.model.t5 import T5Model

        return T5Model(cfg)

    def batch(self, x: torch.Tensor, generator: torch.Generator | None = None):
        mask = span_noise_mask(x.shape[1], self.noise, self.mean_span, generator)  # one layout per batch:
        pairs = [span_corrupt(row, mask, self.sentinel0) for row in x]  # equal lengths, no padding
        inputs = torch.stack([p[0] for p in pairs])
        labels = torch.stack([p[1] for p in pairs])
        return (inputs, labels), labels

    def logits(self, model: nn.Module, inputs: tuple) -> torch.Tensor:
        enc_in, labels = inputs
        raw = model.module if hasattr(model, "module") else model
        return model(enc_in, decoder_input_ids=raw.shift_right(labels))


def get_objective(name: str, tokenizer, whole_word: bool = False, nsp: bool = False):
    """The objective object for `train.objective` (None for clm: the Trainer's own causal path)."""
    if name == "clm":
        return None
    if name == "mlm":
        return MaskedLM(tokenizer, whole_word, nsp=nsp)
    if name == "span":
        return SpanCorruption(tokenizer)
    raise ConfigError(f"train.objective={name!r}; expected one of {', '.join(OBJECTIVES)}")


def objective_loss(objective, model: nn.Module, x: torch.Tensor, generator=None, reduction: str = "mean"):
    """Cross-entropy of `model` on the objective's corrupted `x` [B, T]; also returns the label count."""
    inputs, labels = objective.batch(x.cpu(), generator)
    dev = x.device
    out = objective.logits(model, tuple(None if t is None else t.to(dev) for t in inputs))
    nsp_logits, nsp_labels = None, None
    if isinstance(labels, tuple):  # MLM + NSP: the loss is their sum, as in BERT
        (out, nsp_logits), (labels, nsp_labels) = out, labels
    loss = F.cross_entropy(out.reshape(-1, out.size(-1)).float(), labels.to(dev).reshape(-1),
                           ignore_index=-100, reduction=reduction)
    n = int((labels != -100).sum())
    if nsp_logits is not None:
        nsp = F.cross_entropy(nsp_logits.float(), nsp_labels.to(dev))
        loss = loss + (nsp * n if reduction == "sum" else nsp)  # eval: sum / n = mlm mean + nsp mean
    return loss, n
