"""Alignment: reward model vs transformers, DPO losses vs transformers log-probs, GAE / GRPO / k3 by hand,
PPO and GRPO runs (metrics, rl.png, exact resume), guards."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import llmkit
from llmkit.errors import ConfigError, InputError, LlmkitError
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.train.align_losses import gae, group_advantages, grpo_reduce, k3_kl, whiten
from llmkit.train.metrics import read_metrics

WORDS = "apple bear cat dog eel fig goat hen ink jam kite lion moon nut owl pear".split()


def _words(i: int) -> list[str]:
    return [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(3 + i % 2)]


def _pref(i: int) -> dict:
    w = _words(i)
    good = " ".join(sorted(w))
    bad = " ".join(sorted(w)[::-1])
    prompt = "sort: " + " ".join(w)
    if i % 3 == 0:  # chat-message forms on some lines
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}]}
    return {"prompt": prompt, "chosen": good, "rejected": bad}


REWARD_PY = '''
def reward(prompt, completion, answer="", **row):
    """Fraction of the answer's words found in the completion (a dense verifiable reward)."""
    words = answer.split()
    return sum(w in completion.split() for w in words) / len(words)

def nan_reward(prompt, completion, **row):
    return float("nan")

def flat_reward(prompt, completion, **row):
    return 1.0
'''


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama with a BPE tokenizer (ChatML template); preference and prompt files."""
    from llmkit.tokenizer import train_bpe_from_iterator

    d = tmp_path_factory.mktemp("align")
    texts = [json.dumps(_pref(i)) for i in range(200)] + ["sort the words, system user assistant"] * 20
    tok = train_bpe_from_iterator(texts, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                      intermediate_size=48, block_size=96, eos_token_id=tok.eos_token_id)
    Transformer(cfg).save_pretrained(str(d / "base"))
    tok.save(d / "base")
    (d / "prefs.jsonl").write_text("".join(json.dumps(_pref(i)) + "\n" for i in range(24)))
    (d / "val_prefs.jsonl").write_text("".join(json.dumps(_pref(i)) + "\n" for i in range(100, 108)))
    (d / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": "sort: " + " ".join(_words(i)), "answer": " ".join(sorted(_words(i)))}) + "\n"
        for i in range(16)))
    (d / "rew.py").write_text(REWARD_PY)
    return d


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# ---------------------------------------------------------------------------- hand-computed math


def test_gae_whiten_group_advantages_and_k3_by_hand():
    r = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.0, 0.5, 2.0, 0.0]])
    v = torch.tensor([[0.5, 0.4, 0.3, 9.0], [9.0, 1.0, 0.5, 9.0]])
    m = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])  # row 2: the response sits at positions 1-2
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    # row 1: d2 = 1 - .3 = .7; d1 = -.2 + .9*.3 - .4 = -.33; d0 = .1 + .9*.4 - .5 = -.04; A = d + .72 A'
    a2, a1 = 0.7, -0.33 + 0.72 * 0.7
    a0 = -0.04 + 0.72 * a1
    # row 2: d2 = 2 - .5 = 1.5; d1 = .5 + .9*.5 - 1 = -.05
    b2, b1 = 1.5, -0.05 + 0.72 * 1.5
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0], [0, b1, b2, 0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + .5, a1 + .4, a2 + .3, 0], [0, b1 + 1, b2 + .5, 0]]))
    w = whiten(adv, m)
    vals = torch.tensor([a0, a1, a2, b1, b2])
    torch.testing.assert_close(w[m.bool()], (vals - vals.mean()) / vals.std(), atol=1e-5, rtol=1e-5)

    a, std = group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1]), 4)
    s = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    torch.testing.assert_close(a, torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]) / (s + 1e-4))
    torch.testing.assert_close(std, torch.tensor([s, 0.0]))

    kl = k3_kl(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0]))
    torch.testing.assert_close(kl, torch.tensor([math.exp(-0.5) + 0.5 - 1, 0.0]))

    per_tok, m = torch.tensor([[1.0, 2, 3, 7], [4, 9, 9, 9]]), torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert float(grpo_reduce(per_tok, m, "grpo", 4)) == pytest.approx((2 + 4) / 2)  # per answer, then answers
    assert float(grpo_reduce(per_tok, m, "dapo", 4)) == pytest.approx(10 / 4)  # per token over the batch
    assert float(grpo_reduce(per_tok, m, "dr_grpo", 4)) == pytest.approx(10 / (2 * 4))  # over N x max_new_tokens


# ---------------------------------------------------------------------------- DPO against transformers


def _hf_logps(model, ex) -> float:
    """Summed log-probs of the labelled tokens, from a transformers forward."""
    ids = torch.tensor([ex.input_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logp[i - 1, ex.input_ids[i]]) for i in range(1, len(ex.input_ids)) if ex.labels[i] != -100)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_and_rewards_match_transformers_logprobs(base, tmp_path, loss_type):
    """Policy = base + a random LoRA, reference = the same weights with adapters off; both recomputed with
    transformers (the merged policy and the base) and the loss formula written out by hand."""
    from transformers import AutoModelForCausalLM

    from llmkit.model.lora import merge_lora
    from llmkit.train.config import OptimConfig
    from llmkit.train.preference import DPOTrainer, PrefConfig

    beta = 0.3
    rpo = 0.5 if loss_type == "sigmoid" else 0.0  # RPO: + alpha x the chosen answers' mean token NLL
    ft = PrefConfig(model=str(base / "base"), data=[str(base / "prefs.jsonl")], method="lora", beta=beta,
                    loss_type=loss_type, lora_r=4, lora_dropout=0.0, rpo_alpha=rpo)
    tr = DPOTrainer(ft, OptimConfig(batch_size=4, max_iters=1, progress=False, device="cpu"), tmp_path / "o",
                    max_steps=1)
    tr._setup()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in tr.raw_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pairs = tr.train_examples[:5]
    losses, stats = tr._pair_losses(pairs)
    losses = losses.detach()

    merge_lora(copy.deepcopy(tr.raw_model)).save_pretrained(str(tmp_path / "merged"))
    pol = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(base / "base", dtype=torch.float32).eval()
    n_chosen = [sum(lab != -100 for lab in p.chosen.labels[1:]) for p in pairs]
    nll = -sum(_hf_logps(pol, p.chosen) for p in pairs) / sum(n_chosen)
    assert float(stats["nll_loss"][0]) == pytest.approx(nll, abs=1e-4)
    for k, p in enumerate(pairs):
        pc, pr, rc, rr = (_hf_logps(m, e) for m, e in ((pol, p.chosen), (pol, p.rejected), (ref, p.chosen),
                                                        (ref, p.rejected)))
        if loss_type == "ipo":  # IPO uses length-normalised log-probs (as trl)
            nc, nr = n_chosen[k], sum(lab != -100 for lab in p.rejected.labels[1:])
            pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
        h = (pc - pr) - (rc - rr)
        want = {"sigmoid": -math.log(1 / (1 + math.exp(-beta * h))), "ipo": (h - 1 / (2 * beta)) ** 2,
                "hinge": max(0.0, 1 - beta * h)}[loss_type] + rpo * nll
        assert float(losses[k]) == pytest.approx(want, abs=1e-4, rel=1e-4)
        assert float(stats["rewards/chosen"][k]) == pytest.approx(beta * (pc - rc), abs=1e-4)
        assert float(stats["rewards/rejected"][k]) == pytest.approx(beta * (pr - rr), abs=1e-4)
        assert float(stats["rewards/margins"][k]) == pytest.approx(beta * h, abs=1e-4)


def test_dpo_cli_lora_and_precompute_ref(base, tmp_path):
    """Adapters-off reference and precomputed reference give the same run; trl's metric names are logged."""
    from llmkit.train.preference import dpo

    runs = []
    for pre in (False, True):
        r = dpo(str(base / "base"), str(base / "prefs.jsonl"), str(tmp_path / f"d{pre}"), method="lora", lr=1e-2,
                max_steps=3, batch_size=8, eval_interval=3, val_data=str(base / "val_prefs.jsonl"),
                precompute_ref=pre, progress=False, lora_dropout=0.0)
        runs.append(r.metrics[-1])
    a, b = runs
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "eval_rewards/margins", "eval_rewards/accuracies"):
        assert a[k] == pytest.approx(b[k], abs=1e-5), k
    assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    assert a["eval_rewards/margins"] > 0  # 3 steps at a high rate already prefer the chosen side
    assert (tmp_path / "dFalse" / "adapter_model.safetensors").is_file()
    assert llmkit.load_model(base / "base", adapter=tmp_path / "dFalse") is not None


# ---------------------------------------------------------------------------- reward model


def test_rm_train_and_score_match_transformers(base, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm = tmp_path / "rm"
    p = _cli("rm", "train", "--model", str(base / "base"), "--data", str(base / "prefs.jsonl"), "--val-data",
             str(base / "val_prefs.jsonl"), "--out", str(rm), "--max-steps", "4", "--lr", "3e-3", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "held-out pairwise accuracy" in p.stdout
    cfg = json.loads((rm / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    recs = read_metrics(rm / "metrics.jsonl")
    assert 0.0 <= recs[-1]["val_accuracy"] <= 1.0 and recs[-1]["train_loss"] > 0

    hf = AutoModelForSequenceClassification.from_pretrained(rm, dtype=torch.float32).eval()
    tok = llmkit.load_tokenizer(rm)
    text = "sort: owl cat\nassistant: cat owl"
    p = _cli("rm", "score", "--model", str(rm), "--text", text)
    assert p.returncode == 0, p.stderr
    with torch.no_grad():
        want = float(hf(torch.tensor([tok.encode(text)])).logits[0, 0])
    assert float(p.stdout.strip()) == pytest.approx(want, abs=1e-4)

    from llmkit.cli import main as cli_main

    out = tmp_path / "scores.jsonl"
    assert cli_main(["rm", "score", "--model", str(rm), "--data", str(base / "val_prefs.jsonl"),
                     "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 8
    from llmkit.data.prefs import load_prefs

    pairs, _ = load_prefs(base / "val_prefs.jsonl", tok, 96)
    with torch.no_grad():  # a batch of two, right-padded: transformers finds the last token by pad_token_id
        for row, pair in zip(rows[:3], pairs):
            a, b = pair.chosen.input_ids, pair.rejected.input_ids
            n = max(len(a), len(b))
            ids = torch.tensor([a + [cfg["pad_token_id"]] * (n - len(a)), b + [cfg["pad_token_id"]] * (n - len(b))])
            logits = hf(ids).logits[:, 0]
            assert row["chosen"] == pytest.approx(float(logits[0]), abs=1e-4)
            assert row["rejected"] == pytest.approx(float(logits[1]), abs=1e-4)


# ---------------------------------------------------------------------------- RL runs


def test_grpo_run_metrics_plot_fast_path_and_exact_resume(base, tmp_path):
    from llmkit.train.rl import grpo

    kw = dict(method="full", group_size=4, max_steps=2, batch_size=2, lr=1e-3, eval_interval=1, max_new_tokens=8,
              progress=False, eval_prompts=4)
    reward = f"{base / 'rew.py'}:reward"
    full = grpo(str(base / "base"), reward, str(base / "prompts.jsonl"), str(tmp_path / "a"), **kw)
    grpo(str(base / "base"), reward, str(base / "prompts.jsonl"), str(tmp_path / "b"), stop_after=1, **kw)
    resumed = grpo(str(base / "base"), reward, str(base / "prompts.jsonl"), str(tmp_path / "b"), resume=True, **kw)
    steps = [r for r in full.metrics if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for k in ("reward_mean", "reward_min", "reward_max", "kl", "entropy", "clipfrac", "response_length",
              "rollout_tokens_per_sec", "update_tokens_per_sec", "truncated"):
        assert k in steps[-1], k
    assert (tmp_path / "a" / "rl.png").stat().st_size > 1000
    assert [r["reward_mean"] for r in resumed.metrics if "reward_mean" in r] == [r["reward_mean"] for r in steps]
    a, b = llmkit.load_model(tmp_path / "a"), llmkit.load_model(tmp_path / "b")
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=n)
    assert full.val_reward is not None


def test_lora_policy_trains_through_the_packed_frozen_layers(base, tmp_path):
    """After a rollout the frozen base projections are the packed-for-decode kind, whose CPU kernel has no
    backward: the input gradient must still equal F.linear's, and one GRPO step under LoRA must move the
    adapters of the first block (the gradient crosses every frozen layer above it)."""
    from llmkit.model.linear import PackedLinear
    from llmkit.train import rl

    lin = torch.nn.Linear(8, 16).requires_grad_(False)
    x = torch.randn(4, 3, 8, requires_grad=True)
    (g_packed,) = torch.autograd.grad(PackedLinear(lin)(x).square().sum(), x)
    (g_dense,) = torch.autograd.grad(F.linear(x, lin.weight, lin.bias).square().sum(), x)
    torch.testing.assert_close(g_packed, g_dense)

    seen = {}
    real = rl.RLTrainer.minibatch_loss

    def spy(self, ro, idx):
        out = real(self, ro, idx)
        seen["model"] = self.raw_model
        return out

    (tmp_path / "length.py").write_text("def reward(prompt, completion, **row):\n    return float(len(completion))\n")
    rl.RLTrainer.minibatch_loss = spy
    try:  # a reward that differs between samples, so the advantages are not all 0
        res = rl.grpo(str(base / "base"), f"{tmp_path / 'length.py'}:reward", str(base / "prompts.jsonl"),
                str(tmp_path / "l"),
                method="lora", lora_r=4, lora_dropout=0.0, max_steps=1, batch_size=2, lr=1e-2, max_new_tokens=6,
                progress=False, eval_prompts=2, beta=0.1)
    finally:
        rl.RLTrainer.minibatch_loss = real
    first = [p for n, p in seen["model"].named_parameters() if "blocks.0." in n and "lora_B" in n]
    assert first and any(float(p.abs().sum()) > 0 for p in first)  # B starts at 0: it moved
    assert [r["val_kl"] for r in res.metrics if "val_kl" in r][-1] > 1e-6  # the adapters-off reference differs


def test_shared_prompt_logits_match_transformers_and_full_rows(base):
    """`answer_logits` (each prompt run once, its answers on its keys/values) gives the answer tokens'
    log-probs of a transformers forward of each prompt + answer, and the gradients of full rows."""
    from transformers import AutoModelForCausalLM

    from llmkit.train.align_losses import token_logps
    from llmkit.train.rl import answer_logits

    prompts = [[5, 9, 12, 7, 30], [8, 3]]  # different lengths: left-padded
    answers = [[11, 4, 6], [2], [7, 7, 9, 1], [40, 41]]  # rows 0-1 answer prompt 0, rows 2-3 prompt 1
    rows = torch.tensor([0, 0, 1, 1])
    Lp, K = 5, 4
    pid, pm = torch.zeros(2, Lp, dtype=torch.long), torch.zeros(2, Lp, dtype=torch.long)
    for i, p in enumerate(prompts):
        pid[i, Lp - len(p):], pm[i, Lp - len(p):] = torch.tensor(p), 1
    y = torch.full((4, K), -100)
    for i, a in enumerate(answers):
        y[i, : len(a)] = torch.tensor(a)
    model = llmkit.load_model(base / "base").train()
    logp = token_logps(answer_logits(model, pid, pm, rows, y), y)  # [4, K]
    logp.sum().backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters()}

    hf = AutoModelForCausalLM.from_pretrained(base / "base", dtype=torch.float32)
    model.zero_grad()
    full = 0.0
    for i, a in enumerate(answers):
        ids = torch.tensor([prompts[int(rows[i])] + a])
        with torch.no_grad():
            ref = F.log_softmax(hf(ids).logits[0].double(), -1)
        n = len(prompts[int(rows[i])])
        want = [float(ref[n - 1 + t, a[t]]) for t in range(len(a))]
        torch.testing.assert_close(logp[i, : len(a)].double(), torch.tensor(want, dtype=torch.float64),
                                   atol=1e-4, rtol=1e-4)
        assert float(logp[i, len(a):].detach().abs().sum()) == 0
        lp = F.log_softmax(model(ids)[0], -1)  # a plain llmkit forward of the full row
        full = full + sum(lp[n - 1 + t, a[t]] for t in range(len(a)))
    full.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(shared[n], p.grad, atol=1e-4, rtol=1e-3, msg=n)


def test_rollouts_use_the_decode_fast_path(base, tmp_path):
    """Rollouts go through `llmkit.generate` with the KV cache and the decode fast path (the
    packed-for-decode Linear kind), never the slow recompute-everything path."""
    from llmkit.infer import generate as gen_mod
    from llmkit.model.linear import PackedLinear
    from llmkit.train import rl

    def fast_path(m):
        return any(isinstance(x, PackedLinear) for x in m.modules())

    seen = []
    real = gen_mod.Generator.__init__

    def spy(self, model, prompts, params, eos_ids, use_cache=True, fast=True, **kw):
        seen.append((len(prompts), use_cache, fast))
        real(self, model, prompts, params, eos_ids, use_cache=use_cache, fast=fast, **kw)
        seen[-1] += (fast_path(model),)

    gen_mod.Generator.__init__ = spy
    try:
        rl.grpo(str(base / "base"), f"{base / 'rew.py'}:reward", str(base / "prompts.jsonl"), str(tmp_path / "g"),
                max_steps=1, batch_size=2, max_new_tokens=4, progress=False, eval_prompts=2)
    finally:
        gen_mod.Generator.__init__ = real
    assert seen[0] == (8, True, True, True)  # one batch: 2 prompts x G=4, cached, packed for decode


def test_ppo_with_reward_model_folder(base, tmp_path):
    from llmkit.train.preference import train_reward_model
    from llmkit.train.rl import ppo

    train_reward_model(str(base / "base"), str(base / "prefs.jsonl"), str(tmp_path / "rm"), max_steps=1,
                       progress=False)
    r = ppo(str(base / "base"), str(tmp_path / "rm"), str(base / "prompts.jsonl"), str(tmp_path / "p"),
            max_steps=2, batch_size=4, max_new_tokens=6, eval_interval=2, progress=False, eval_prompts=4,
            kl_target=0.1, ppo_epochs=2, num_minibatches=2, truncation_penalty=-1.0, ent_coef=0.01)
    steps = [m for m in r.metrics if "reward_mean" in m]
    assert len(steps) == 2
    for k in ("value_loss", "value_clipfrac", "kl", "kl_coef", "clipfrac", "entropy", "truncated"):
        assert k in steps[-1], k
    assert steps[0]["kl_coef"] != steps[1]["kl_coef"]  # adaptive
    assert (tmp_path / "p" / "rl.png").is_file()
    m = llmkit.load_model(tmp_path / "p")
    assert not any("v_head" in n for n in m.state_dict())  # the value head is not exported


def test_ppo_critic_copied_from_the_reward_model(base, tmp_path):
    """`value_model="reward"` (trl's critic): before any update the values at each answer position are the
    reward model's scores of the prompt + the answer so far (transformers' trunk and score head); the critic
    trains with the policy and is not exported. `value_model="policy"` starts from a zero head; during
    `value_warmup_steps` only the critic moves."""
    from transformers import AutoModelForSequenceClassification

    from llmkit.train import rl
    from llmkit.train.preference import train_reward_model

    train_reward_model(str(base / "base"), str(base / "prefs.jsonl"), str(tmp_path / "rm"), max_steps=2, lr=1e-2,
                       progress=False)
    seen = []
    real = rl.RLTrainer.advantages

    def spy(self, ro, stats):
        seen.append((ro, {n: p.detach().clone() for n, p in self.critic.named_parameters()}, self.critic))
        return real(self, ro, stats)

    rl.RLTrainer.advantages = spy
    try:
        for value_model in ("reward", "policy"):
            rl.ppo(str(base / "base"), str(tmp_path / "rm"), str(base / "prompts.jsonl"), str(tmp_path / value_model),
                   max_steps=2, batch_size=2, group_size=2, max_new_tokens=5, progress=False, eval_prompts=2,
                   lr=1e-3, value_model=value_model, whiten_rewards=True,
                   value_warmup_steps=2 if value_model == "policy" else 0, group_baseline=value_model == "reward")
    finally:
        rl.RLTrainer.advantages = real
    ro, before, critic = seen[0]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    for i in range(len(ro.group)):
        p = ro.prompt_ids[ro.group[i]][ro.prompt_mask[ro.group[i]].bool()].tolist()
        a = ro.targets[i][ro.targets[i] != -100].tolist()
        with torch.no_grad():
            s = hf.score(hf.model(torch.tensor([p + a])).last_hidden_state)[0, :, 0]  # [T] the score per position
        torch.testing.assert_close(ro.values[i, : len(a)], s[len(p) - 1 : len(p) - 1 + len(a)], atol=1e-4, rtol=1e-4)
    after = dict(critic.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the critic trained
    zero = seen[2][0].values  # value_model="policy": a zero head, so every value starts at 0
    assert float(zero.abs().max()) == 0
    assert any(not torch.equal(seen[2][1][n], p) for n, p in seen[3][2].named_parameters())  # its critic trained
    start, warm = llmkit.load_model(base / "base"), llmkit.load_model(tmp_path / "policy")
    for (n, x), y in zip(start.state_dict().items(), warm.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=n)  # value warm-up: the policy did not move
    m = llmkit.load_model(tmp_path / "reward")
    assert not any("critic" in n for n in m.state_dict())
    with pytest.raises(ConfigError, match="group-size >= 2"):
        rl.ppo(str(base / "base"), str(tmp_path / "rm"), str(base / "prompts.jsonl"), str(tmp_path / "x"),
               max_steps=1, batch_size=2, max_new_tokens=4, progress=False, group_baseline=True)
    with pytest.raises(ConfigError, match="value-model reward"):
        rl.ppo(str(base / "base"), f"{base / 'rew.py'}:reward", str(base / "prompts.jsonl"), str(tmp_path / "x"),
               max_steps=1, batch_size=2, max_new_tokens=4, progress=False, value_model="reward")


# ---------------------------------------------------------------------------- guards


def test_guards(base, tmp_path, capsys):
    from llmkit.data.prefs import load_prefs
    from llmkit.train.rl import grpo

    tok = llmkit.load_tokenizer(base / "base")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_pref(1)) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2: missing 'rejected'"):
        load_prefs(bad, tok, 96)
    common = dict(max_steps=1, batch_size=2, max_new_tokens=4, progress=False, eval_prompts=2)
    with pytest.raises(ConfigError, match="at least 2"):
        grpo(str(base / "base"), f"{base / 'rew.py'}:reward", str(base / "prompts.jsonl"), str(tmp_path / "x"),
             group_size=1, **common)
    with pytest.raises(ConfigError, match="loss-type 'token'"):
        grpo(str(base / "base"), f"{base / 'rew.py'}:reward", str(base / "prompts.jsonl"), str(tmp_path / "x"),
             loss_type="token", **common)
    with pytest.raises(ConfigError, match="module:function"):
        grpo(str(base / "base"), "nonsense", str(base / "prompts.jsonl"), str(tmp_path / "x"), **common)
    with pytest.raises(LlmkitError, match="nan"):
        grpo(str(base / "base"), f"{base / 'rew.py'}:nan_reward", str(base / "prompts.jsonl"), str(tmp_path / "y"),
             **common)
    from llmkit.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["grpo", "--model", str(base / "base"), "--reward", f"{base / 'rew.py'}:flat_reward", "--prompts",
                     str(base / "prompts.jsonl"), "--out", str(tmp_path / "z"), "--max-steps", "50", "--batch-size",
                     "2", "--max-new-tokens", "4", "--eval-prompts", "2", "--no-progress", "--loss-type", "dr_grpo",
                     "--beta", "0", "--max-minutes", "0.0001"]) == 0
    out = capsys.readouterr()
    assert "reward groups of step 1 are flat" in out.out + out.err
    records = read_metrics(tmp_path / "z" / "metrics.jsonl")
    rec = [r for r in records if "flat_groups" in r][0]
    assert rec["flat_groups"] == 2 and rec["truncated"] >= 0
    assert len([r for r in records if "flat_groups" in r]) == 1  # the time budget (6 ms) ends the run at step 1
    # beta 0 keeps no reference in the loss, but the evaluations measure the KL to it: 0 here (flat rewards
    # give no update)
    assert abs([r["val_kl"] for r in records if "val_kl" in r][-1]) < 1e-6
