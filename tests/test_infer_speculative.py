"""Speculative decoding: greedy output equals plain decoding and transformers; sampled output keeps
the target's distribution (chi-square against the exact joint distribution of the first tokens)."""

from __future__ import annotations

import math

import pytest
import torch

import llmkit
from llmkit.errors import InputError
from llmkit.infer import sequence as seq_mod
from llmkit.infer.engine import Engine
from llmkit.infer.sampling import SamplingParams, draw
from llmkit.infer.speculative import ngram_propose, rejection_sample
from tests.test_infer_fixtures import hf_checkpoint

REPETITIVE = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    hf = hf_checkpoint("llama", d / "target", seed=0)
    hf_checkpoint("llama", d / "draft", seed=1, num_hidden_layers=1)
    return hf, llmkit.load_model(d / "target"), llmkit.load_model(d / "draft"), d / "draft"


def test_ngram_prompt_lookup_takes_the_latest_longest_match():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3, 4, 1, 2, 3], k=2) == [4, 1]  # "1 2 3" last seen before 4
    assert ngram_propose([1, 2, 3, 4, 5], k=3) == []  # the suffix never occurred before
    assert ngram_propose([7, 7], k=3) == [7]  # only what exists after the match


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_greedy_speculative_output_equals_plain_decoding_and_transformers(models, spec):
    hf, model, draft, _ = models
    kw = {"ngram": dict(speculative="ngram"), "draft": dict(draft_model=draft, num_speculative_tokens=3)}[spec]
    prompts = [REPETITIVE, [3, 1, 4, 1, 5, 9, 2, 6]]
    for p in prompts:
        ref = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)[0, len(p):].tolist()
        assert llmkit.generate(model, p, 16, **kw) == ref
    # history-dependent penalties are applied at every verified position
    plain = llmkit.generate(model, prompts, 16, repetition_penalty=1.5, presence_penalty=0.5)
    assert llmkit.generate(model, prompts, 16, repetition_penalty=1.5, presence_penalty=0.5, **kw) == plain


def test_engine_verifies_drafts_of_a_batch_in_one_forward_with_the_same_tokens(models):
    _, model, _, draft_dir = models
    prompts = [REPETITIVE, [1, 2, 3, 1, 2, 3, 1, 2], [9, 8, 7, 6, 5], [4, 4, 4, 4]]
    ref = llmkit.generate(model, prompts, 20)
    small_pool = dict(speculative="ngram", kv_block_size=4, num_blocks=14)  # preempts: recomputed rows stay exact
    for kw in (dict(speculative="ngram"), dict(draft_model=str(draft_dir), num_speculative_tokens=2),
               dict(draft_model=model), small_pool):
        with Engine(model, max_batch_size=3, **kw) as engine:
            out = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0))
            s = engine.stats()
        assert [r.token_ids for r in out] == ref
        assert s["free_blocks"] == s["total_blocks"]  # rolled-back blocks returned with the sequence
        assert 0 < s["spec_decode_num_drafts"] and s["spec_decode_num_accepted_tokens"] <= s[
            "spec_decode_num_draft_tokens"]
        assert sum(s["spec_decode_num_accepted_tokens_per_pos"]) == s["spec_decode_num_accepted_tokens"]
        if kw is small_pool:
            assert s["preemptions"] > 0
        if kw.get("draft_model") is model:  # the target as its own draft: every greedy draft is accepted
            assert s["spec_decode_num_accepted_tokens"] == s["spec_decode_num_draft_tokens"]


def test_bad_speculative_settings_raise_input_errors(models):
    model = models[1]
    with pytest.raises(InputError, match="unknown"):
        llmkit.generate(model, [1, 2], 4, speculative="medusa")
    with pytest.raises(InputError, match="num_speculative_tokens"):
        llmkit.generate(model, [1, 2], 4, speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(InputError, match="draft model"):
        Engine(model, speculative="draft_model")


# ---- the sampled output keeps the target's distribution ------------------------------------------------

V = 6  # tiny vocabulary: the joint distribution of the first tokens can be enumerated exactly
N_NEW = 3
SAMPLING = dict(temperature=0.9, top_k=4)


def _exact_joint(hf, prompt):
    """P(t1, t2, t3 | prompt) from transformers' logits, temperature and top-k applied by hand."""

    def dist(ids):
        logits = hf(torch.tensor([ids])).logits[0, -1].double() / SAMPLING["temperature"]
        kth = logits.topk(SAMPLING["top_k"]).values[-1]
        return torch.softmax(logits.masked_fill(logits < kth, -math.inf), -1)

    joint = {}
    with torch.no_grad():
        for t1, p1 in enumerate(dist(prompt).tolist()):
            if p1 == 0:
                continue
            for t2, p2 in enumerate(dist(prompt + [t1]).tolist()):
                if p2 == 0:
                    continue
                for t3, p3 in enumerate(dist(prompt + [t1, t2]).tolist()):
                    if p3:
                        joint[(t1, t2, t3)] = p1 * p2 * p3
    return joint


def _chi_square_rejects(counts: dict, joint: dict, n: int) -> bool:
    """Pearson's chi-square of sampled counts against `joint`, cells with < 5 expected pooled;
    True when it rejects at alpha = 1e-3 (Wilson-Hilferty quantile of the chi-square law)."""
    stat, df, pool_e, pool_o = 0.0, -1, 0.0, 0
    for cell in set(joint) | set(counts):
        e, o = joint.get(cell, 0.0) * n, counts.get(cell, 0)
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
            continue
        stat, df = stat + (o - e) ** 2 / e, df + 1
    if pool_e > 0:
        stat, df = stat + (pool_o - pool_e) ** 2 / pool_e, df + 1
    z = 3.090  # 1e-3 upper quantile of N(0, 1)
    return stat > df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec_stat")
    over = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                initializer_range=0.5)
    hf = hf_checkpoint("llama", d / "target", seed=3, **over)
    hf_checkpoint("llama", d / "draft", seed=4, num_hidden_layers=1, **over)
    return hf, llmkit.load_model(d / "target"), llmkit.load_model(d / "draft")


def _resample_from_p_after_rejection(p, draft, q, g, greedy):
    out = []
    for i, x in enumerate(draft):
        if float(torch.rand((), generator=g, dtype=torch.float64)) < float(p[i, x] / q[i, x]):
            out.append(x)
            continue
        return out + [int(draw(p[i : i + 1], [g])[0])]
    return out + [int(draw(p[len(draft) :], [g])[0])]


def _sample_counts(model, draft, prompt, n):
    with Engine(model, max_batch_size=64, max_queue=n, draft_model=draft, num_speculative_tokens=2) as engine:
        handles = [engine.submit(prompt, SamplingParams(max_new_tokens=N_NEW, seed=i, **SAMPLING))
                   for i in range(n)]
        outs = [tuple(h.result().token_ids) for h in handles]
        drafted = engine.stats()["spec_decode_num_draft_tokens"]
    assert drafted >= n  # every request verified a draft
    counts: dict = {}
    for o in outs:
        counts[o] = counts.get(o, 0) + 1
    return counts


@pytest.mark.parametrize("rule", ["rejection_sampling", "wrong_rule"])
def test_speculative_sampling_keeps_the_target_distribution(tiny_vocab, rule, monkeypatch):
    hf, model, draft = tiny_vocab
    prompt = [1, 2, 3]
    joint = _exact_joint(hf, prompt)
    if rule == "wrong_rule":  # a classic bug: after a rejection, resample from p instead of max(0, p - q)
        monkeypatch.setattr(seq_mod, "rejection_sample", _resample_from_p_after_rejection)
    n = 3000
    counts = _sample_counts(model, draft, prompt, n)
    assert _chi_square_rejects(counts, joint, n) == (rule == "wrong_rule")


def test_rejection_sampling_rule_alone_matches_p_for_random_p_and_q():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 5, generator=g) * 2, -1)  # target at position 1 and the bonus
    q = torch.softmax(torch.randn(1, 5, generator=g) * 2, -1)  # draft at position 1
    n, counts = 20000, torch.zeros(5)
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=g))
        counts[rejection_sample(p, [x], q, g, greedy=False)[0]] += 1
    expected = p[0] * n
    assert float(((counts - expected) ** 2 / expected).sum()) < 18.5  # chi-square(4) at alpha 1e-3


# ---- reachable from `llmkit generate` and `llmkit serve` ------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from test_serve_fixtures import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("spec_serve"))


def test_generate_cli_with_a_draft_model_prints_the_greedy_completion(chat_model):
    import subprocess
    import sys

    model = llmkit.load_model(chat_model)
    tok = llmkit.load_tokenizer(chat_model)
    prompt = "the king, the king, the king"
    want = tok.decode(llmkit.generate(model, tok.encode(prompt), 12), skip_special_tokens=True)
    res = subprocess.run([sys.executable, "-m", "llmkit", "generate", "--model", str(chat_model), "--prompt", prompt,
                          "--temperature", "0", "--max-new-tokens", "12", "--draft-model", str(chat_model),
                          "--num-speculative-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == want + "\n"
    res = subprocess.run([sys.executable, "-m", "llmkit", "generate", "--model", str(chat_model), "--prompt", "x",
                          "--num-speculative-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "--speculative-method or --draft-model" in res.stderr
    assert "Traceback" not in res.stderr


def test_served_completions_speculate_and_metrics_use_vllm_names(chat_model):
    import httpx
    import openai
    from test_serve_fixtures import running_server

    model = llmkit.load_model(chat_model)
    tok = llmkit.load_tokenizer(chat_model)
    prompt = "To be, or not to be, to be, or not to be"
    want = tok.decode(llmkit.generate(model, tok.encode(prompt), 16), skip_special_tokens=True)
    spec = {"method": "draft_model", "draft_model": str(chat_model), "num_speculative_tokens": 3}  # its own draft
    with running_server(chat_model, speculative=spec) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
        out = client.completions.create(model=chat_model.name, prompt=prompt, max_tokens=16, temperature=0)
        assert out.choices[0].text == want
        metrics = httpx.get(srv.url + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("vllm:spec_decode")}
    assert values["vllm:spec_decode_num_drafts_total"] > 0
    assert values["vllm:spec_decode_num_accepted_tokens_total"] == values["vllm:spec_decode_num_draft_tokens_total"]
    assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{position="0"}' in values
