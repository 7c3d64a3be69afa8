"""Sampler tests: hand-computed logit processors, allowed sets of top-k/top-p/min-p, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from llmkit.errors import InputError
from llmkit.infer.sampling import SamplingParams, sample_next


def _run(logits, params, history=None, gens=None, prompt_lens=None):
    B = logits.shape[0]
    history = history if history is not None else [[] for _ in range(B)]
    gens = gens if gens is not None else [p.make_generator() for p in params]
    return sample_next(logits, params, history, gens, prompt_lens=prompt_lens)


def test_greedy_and_temperature_zero_equal_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    out = _run(logits, [SamplingParams(temperature=0.0)] * 5)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    # temperature -> 0 (tiny but positive) concentrates all mass on the argmax
    out = _run(logits, [SamplingParams(temperature=1e-4, seed=i) for i in range(5)])
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def _allowed_sets(probs: torch.Tensor, k: int, p: float, min_p: float) -> set[int]:
    """Hand computation (plain Python over a sorted list) of which tokens may be emitted."""
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    if k:
        order = order[:k]
    z = sum(float(probs[i]) for i in order)
    renorm = {i: float(probs[i]) / z for i in order}
    keep, mass = [], 0.0
    for i in order:
        if keep and mass >= p:
            break
        keep.append(i)
        mass += renorm[i]
    top = renorm[order[0]]
    return {i for i in keep if renorm[i] >= min_p * top or i == order[0]}


@pytest.mark.parametrize(
    "k,p,min_p", [(5, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.2), (8, 0.7, 0.05), (1, 1.0, 0.0), (3, 0.3, 0.0)]
)
def test_truncation_never_emits_outside_allowed_set(k, p, min_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 40, generator=g) * 2
    temp = 0.8
    allowed = _allowed_sets(torch.softmax(logits[0] / temp, -1), k, p, min_p)
    params = [SamplingParams(temperature=temp, top_k=k, top_p=p, min_p=min_p, seed=s) for s in range(400)]
    out = _run(logits.expand(400, -1).contiguous(), params)
    seen = set(out.token_ids.tolist())
    assert seen <= allowed
    if len(allowed) > 1:
        assert len(seen) > 1  # really sampling, not collapsing to argmax


def test_unrestricted_sampling_matches_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    probs = torch.softmax(logits[0], -1)
    n = 4000
    params = [SamplingParams(seed=s) for s in range(n)]
    out = _run(logits.expand(n, -1).contiguous(), params)
    freq = torch.bincount(out.token_ids, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.03)


def test_seed_reproduces_regardless_of_batch():
    torch.manual_seed(3)
    logits = torch.randn(4, 100)
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=42),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=20, seed=7),
        SamplingParams(temperature=0.0),
    ]
    a = _run(logits, params)
    # row 2 alone, with a fresh generator from the same seed -> same token as in the batch
    alone = _run(logits[2:3], [params[2]])
    assert alone.token_ids.item() == a.token_ids[2].item()
    alone0 = _run(logits[0:1], [params[0]])
    assert alone0.token_ids.item() == a.token_ids[0].item()
    # a sequence of draws with one generator is reproducible
    g1, g2 = params[0].make_generator(), params[0].make_generator()
    s1 = [sample_next(logits[:1], params[:1], [[]], [g1]).token_ids.item() for _ in range(20)]
    s2 = [sample_next(logits[:1], params[:1], [[]], [g2]).token_ids.item() for _ in range(20)]
    assert s1 == s2 and len(set(s1)) > 1


def test_penalties_and_bias_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.5, 1.0]])
    p = SamplingParams(
        temperature=0.0,
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logit_bias={5: 10.0},
        logprobs=6,
    )
    history = [[0, 1, 3, 3, 2]]  # prompt = [0, 1]; generated = [3, 3, 2]
    out = _run(logits, [p], history=history, prompt_lens=[2])
    expected = [
        2.0 / 2,  # in history (prompt), positive -> divided
        -1.0 * 2,  # in history, negative -> multiplied
        0.5 / 2 - 0.5 - 0.25 * 1,  # generated once
        3.0 / 2 - 0.5 - 0.25 * 2,  # generated twice
        -2.5,  # untouched
        1.0 + 10.0,  # bias
    ]
    ref = torch.log_softmax(torch.tensor(expected), -1)
    assert out.token_ids.item() == 5
    assert out.logprobs.item() == pytest.approx(ref[5].item(), abs=1e-5)
    order = torch.argsort(ref, descending=True)
    assert out.top_ids[0].tolist() == order.tolist()
    assert torch.allclose(out.top_logprobs[0], ref[order], atol=1e-5)
    # input logits untouched
    assert logits[0, 5].item() == 1.0


def test_logprobs_are_before_temperature_and_truncation():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    out = _run(logits, [SamplingParams(temperature=0.5, top_k=1, logprobs=2, seed=0)])
    ref = torch.log_softmax(logits[0], -1)
    assert out.token_ids.item() == 3
    assert out.logprobs.item() == pytest.approx(ref[3].item(), abs=1e-6)
    assert out.top_ids[0].tolist() == [3, 2]
    assert out.top_logprobs[0, 1].item() == pytest.approx(math.log(math.exp(2) / sum(math.exp(i) for i in range(4))))


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-1),
        dict(top_p=0.0),
        dict(top_k=-2),
        dict(min_p=1.5),
        dict(max_new_tokens=0),
        dict(repetition_penalty=0),
        dict(presence_penalty=3),
        dict(logit_bias={"x": 1}),
        dict(stop=[""]),
        dict(stop_token_ids=[99]),
    ],
)
def test_validate_rejects_bad_values(kw):
    with pytest.raises(InputError):
        SamplingParams(**kw).validate(vocab_size=50)


def test_validate_normalises():
    p = SamplingParams(stop="###", logit_bias={"3": 1}).validate(vocab_size=10)
    assert p.stop == ["###"] and p.logit_bias == {3: 1.0}
