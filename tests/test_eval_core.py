"""`llmkit eval` against references: perplexity vs transformers, multiple choice vs lm-eval's `hf` backend,
the `llmkit` lm-eval backend, BLEU vs sacrebleu's CLI, ROUGE vs rouge-score, and the CLI outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_serve_fixtures import DATA, build_tiny_llama

import llmkit

MC_DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "a small dog"], "label": 0},
    {"question": "ROMEO: O, she doth teach", "choices": ["the torches", "nothing at all"], "label": 0},
    {"question": "Two plus two equals", "choices": ["four", "seven", "the moon", "4"], "label": 3},
    {"question": "To be, or not to be:", "choices": ["that is the question", "yes", "no"], "label": 0},
    {"question": "", "choices": ["First Citizen", "Second Citizen"], "label": 1},
]

MC_YAML = """\
task: llmkit_eval_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", ctx=128)


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_perplexity_equals_transformers_loss(tiny, tmp_path):
    from llmkit.eval import perplexity

    text = DATA.read_text()[:200]
    model, tok = llmkit.load_model(tiny), llmkit.load_tokenizer(tiny)
    ids = tok.encode(text)
    assert len(ids) <= 128
    ref = _hf(tiny)
    with torch.no_grad():
        loss = ref(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    r = perplexity(model, tok, text)
    assert r.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert r.tokens == len(ids) - 1
    assert r.bits_per_byte == pytest.approx(float(loss) * (len(ids) - 1) / math.log(2) / len(text.encode()), rel=1e-4)

    # a long text: Hugging Face's sliding-window recipe, computed with transformers
    long_text = DATA.read_text()[:1500]
    ids = tok.encode(long_text)
    max_len, stride = 128, 48
    nll_sum, n_tok, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_len, len(ids))
        trg = end - prev_end
        x = torch.tensor([ids[begin:end]])
        y = x.clone()
        y[:, :-trg] = -100
        with torch.no_grad():
            loss = ref(x, labels=y).loss
        n_valid = int((y[:, 1:] != -100).sum())  # the tokens the shifted loss averaged over
        nll_sum += float(loss) * n_valid
        n_tok += n_valid
        prev_end = end
        if end == len(ids):
            break
    r = perplexity(model, tok, long_text, stride=stride)
    assert r.tokens == n_tok
    assert r.perplexity == pytest.approx(math.exp(nll_sum / n_tok), rel=1e-4)


def _lm_eval_task(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (tasks / "mc.yaml").write_text(MC_YAML.format(data=data))
    return tasks, data


def test_mc_matches_lm_eval_hf_backend(tiny, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llmkit.eval import evaluate

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    tasks, data = _lm_eval_task(tmp_path)
    tm = TaskManager(include_path=str(tasks))
    ref = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny},dtype=float32",
        tasks=["llmkit_eval_mc"],
        task_manager=tm,
        log_samples=True,
        device="cpu",
        batch_size=1,
    )
    ours = lm_eval.simple_evaluate(
        model="llmkit", model_args=f"pretrained={tiny}", tasks=["llmkit_eval_mc"], task_manager=tm, log_samples=True
    )
    want, got = ref["results"]["llmkit_eval_mc"], ours["results"]["llmkit_eval_mc"]
    assert got["acc,none"] == want["acc,none"] and got["acc_norm,none"] == want["acc_norm,none"]
    ref_lls = [[float(r[0][0]) for r in s["resps"]] for s in ref["samples"]["llmkit_eval_mc"]]
    our_lls = [[float(r[0][0]) for r in s["resps"]] for s in ours["samples"]["llmkit_eval_mc"]]
    assert sum(our_lls, []) == pytest.approx(sum(ref_lls, []), abs=1e-3)

    res = evaluate(f"mc={data}", tmp_path / "run", model=tiny, progress=False)
    assert res["results"]["mc"]["acc"] == pytest.approx(want["acc,none"])
    assert res["results"]["mc"]["acc_norm"] == pytest.approx(want["acc_norm,none"])
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    by_id = {s["id"]: s["loglikelihoods"] for s in samples}
    for i, lls in enumerate(ref_lls):
        assert by_id[str(i)] == pytest.approx(lls, abs=1e-3)


@pytest.mark.parametrize("kind", ["rope", "alibi", "sliding_window"])
def test_shared_prefix_scoring_equals_one_forward_per_request(kind):
    """Packed prefix sharing (and the KV-copy path used for ALiBi) give each request's plain log-likelihood."""
    from llmkit.eval import score_tokens
    from llmkit.model.transformer import Transformer

    cfg = llmkit.ModelConfig.from_preset("tiny")
    if kind == "alibi":
        cfg.pos = "alibi"
    if kind == "sliding_window":
        cfg.sliding_window = 6
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ctxs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 11, 3)]
    reqs = [(c, torch.randint(0, cfg.vocab_size, (m,), generator=g).tolist()) for c in ctxs for m in (1, 4, 2)]
    got = score_tokens(model, reqs, batch_size=2)
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0].float(), -1)
        rows = logp[len(ctx) - 1 : len(ctx) - 1 + len(cont)]
        assert lp == pytest.approx(float(rows[range(len(cont)), cont].sum()), abs=1e-4)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())


def test_scoring_at_the_context_limit_matches_lm_eval_truncation():
    """context + continuation longer than the model's context: left-truncated like lm-eval, never past block_size."""
    from llmkit.eval import score_tokens
    from llmkit.model.transformer import Transformer

    cfg = llmkit.ModelConfig.from_preset("tiny")
    cfg.pos, cfg.block_size = "learned", 16
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ctx, conts = list(range(3, 23)), [[5, 6, 7], [9]]  # 20 + 3 tokens > 16
    got = score_tokens(model, [(ctx, c) for c in conts])
    for cont, (lp, _) in zip(conts, got):
        inp = (ctx + cont)[-(cfg.block_size + 1) :][:-1]  # lm-eval's hf backend feeds exactly this
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inp]))[0], -1)
        want = sum(float(logp[len(inp) - len(cont) + k, t]) for k, t in enumerate(cont))
        assert lp == pytest.approx(want, abs=1e-4)
