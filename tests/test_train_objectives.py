"""Pretraining objectives mlm and span: the corruption against hand-computed expectations, BertForMaskedLM
parity with transformers, embeddings from the same folder, exact resume, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmkit.errors import ConfigError
from llmkit.train.config import TrainConfig
from llmkit.train.metrics import read_metrics
from llmkit.train.objectives import mask_tokens, span_corrupt, span_noise_mask, span_restore, word_starts
from llmkit.train.trainer import pretrain

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare/input.txt"
MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "intermediate_size": 64}
TRAIN = {"batch_size": 4, "seq_len": 32, "max_iters": 6, "lr": 3e-3, "warmup_iters": 1, "eval_interval": 3,
         "eval_iters": 1, "log_interval": 3, "progress": False, "num_threads": 1}


def _cfg(tmp_path, objective, out="out", **train):
    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_text(SHAKESPEARE.read_text()[:20000])
    return TrainConfig.from_dict({"model": dict(MODEL), "data": {"path": str(text)},
                                  "train": {**TRAIN, "objective": objective, **train},
                                  "out_dir": str(tmp_path / out)})


def test_mask_statistics_match_bert_spec():
    # 15% selected; of those 80% [MASK], 10% random, 10% kept. Hand-computed expectations over N tokens:
    # selected ~ 0.15 N, [MASK] ~ 0.12 N, random ~ 0.015 N (+ 1/V of them land on the same id), kept ~ 0.015 N.
    N, V, MASK = 200_000, 50, 50
    ids = torch.randint(V, (100, N // 100), generator=torch.Generator().manual_seed(0))
    inputs, labels = mask_tokens(ids, MASK, V, generator=torch.Generator().manual_seed(1))
    sel = labels != -100
    assert torch.equal(labels[sel], ids[sel])  # labels are the original tokens
    assert torch.equal(inputs[~sel], ids[~sel])  # unselected tokens untouched
    n = sel.sum().item()
    masked = (inputs == MASK).sum().item()
    changed = (sel & (inputs != MASK) & (inputs != ids)).sum().item()
    same = (sel & (inputs == ids)).sum().item()
    sd = (N * 0.15 * 0.85) ** 0.5  # binomial standard deviation of the selected count
    assert abs(n - 0.15 * N) < 5 * sd
    assert abs(masked / n - 0.8) < 0.01
    assert abs(changed / n - 0.1 * (1 - 1 / V)) < 0.01  # a random draw equals the original 1/V of the time
    assert abs(same / n - (0.1 + 0.1 / V)) < 0.01


def test_whole_word_masking_selects_whole_words():
    texts = [" the", " cat", "s", "at", " on", "!"]  # id 2 and 3 continue a word
    starts = word_starts(texts)
    assert starts.tolist() == [True, True, False, False, True, True]
    ids = torch.tensor([[1, 2, 3, 0, 4, 1, 2, 5]] * 4000)
    _, labels = mask_tokens(ids, 6, 6, starts=starts, generator=torch.Generator().manual_seed(0))
    sel = labels != -100
    assert torch.equal(sel[:, 0], sel[:, 1]) and torch.equal(sel[:, 1], sel[:, 2])  # " cat"+"s"+"at" together
    assert torch.equal(sel[:, 5], sel[:, 6])
    assert abs(sel[:, 0].float().mean().item() - 0.15) < 0.03  # a word is chosen with probability 0.15


def test_span_corruption_hand_built_example():
    ids = torch.arange(10, 20)  # 10 .. 19
    mask = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    inputs, targets = span_corrupt(ids, mask, sentinel0=99)
    assert inputs.tolist() == [10, 11, 99, 14, 15, 16, 98, 18, 19]
    assert targets.tolist() == [99, 12, 13, 98, 17]
    assert span_restore(inputs.tolist(), targets.tolist(), 99, n_sentinels=2) == ids.tolist()


def test_span_noise_mask_density_and_round_trip():
    g = torch.Generator().manual_seed(0)
    for L in (20, 64, 512):
        m = span_noise_mask(L, 0.15, 3.0, g)
        assert len(m) == L and not m[0]  # starts with a kept span
        assert m.sum().item() == round(0.15 * L)
        spans = int((m[1:] & ~m[:-1]).sum())
        assert spans == max(round(round(0.15 * L) / 3), 1)  # mean span length 3
        ids = torch.randint(1000, (L,), generator=g)
        inp, tgt = span_corrupt(ids, m, 1099)
        assert span_restore(inp.tolist(), tgt.tolist(), 1099) == ids.tolist()


def test_unknown_objective_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="expected one of clm, mlm, span"):
        pretrain(_cfg(tmp_path, "bogus"))
    with pytest.raises(ConfigError, match="without qat"):
        pretrain(_cfg(tmp_path, "mlm", qat="int8"))


def test_mlm_folder_loads_in_transformers_and_embeds(tmp_path):
    from transformers import AutoTokenizer, BertForMaskedLM

    import llmkit
    from llmkit.model.embed import embed

    res = pretrain(_cfg(tmp_path, "mlm", whole_word_mask=True))
    assert res.val_loss is not None and res.val_loss < 5.0  # from ~ln(V) = 4.2 at init; finite and learning
    out = res.out_dir
    ref = BertForMaskedLM.from_pretrained(out).eval()
    ours = llmkit.load_model(out)
    from llmkit.model.bert import BertForMaskedLM as Ours

    full = Ours(ours.config)
    full.bert.load_state_dict(ours.state_dict())
    from safetensors.torch import load_file

    sd = load_file(out / "model.safetensors")
    full.transform.weight.data = sd["cls.predictions.transform.dense.weight"]
    full.transform.bias.data = sd["cls.predictions.transform.dense.bias"]
    full.ln.weight.data, full.ln.bias.data = sd["cls.predictions.transform.LayerNorm.weight"], sd[
        "cls.predictions.transform.LayerNorm.bias"]
    full.bias.data = sd["cls.predictions.bias"]
    x = torch.randint(ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(full.eval()(x), ref(x).logits, atol=1e-4, rtol=1e-4)
    hf_tok = AutoTokenizer.from_pretrained(out)  # [MASK] was added to the char tokenizer and saved with it
    assert hf_tok.mask_token == "[MASK]" and hf_tok.mask_token_id == ours.config.vocab_size - 1
    assert hf_tok("ab[MASK]c")["input_ids"] == [hf_tok.convert_tokens_to_ids(c) for c in "ab"] + [
        hf_tok.mask_token_id, hf_tok.convert_tokens_to_ids("c")]
    vecs = embed(str(out), ["To be, or not to be", "the king"])
    assert vecs.shape == (2, 32) and torch.isfinite(torch.as_tensor(vecs)).all()


def test_span_pretrain_and_exact_resume(tmp_path):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    import llmkit

    full = pretrain(_cfg(tmp_path, "span", out="full"))
    pretrain(_cfg(tmp_path, "span", out="resumed"), stop_after=3)
    resumed = pretrain(_cfg(tmp_path, "span", out="resumed"), resume=True)
    a, b = read_metrics(full.out_dir / "metrics.jsonl"), read_metrics(resumed.out_dir / "metrics.jsonl")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # resume is exact
    assert (full.out_dir / "loss.png").exists()
    tok = AutoTokenizer.from_pretrained(full.out_dir)  # sentinels added after the vocabulary, T5's order
    assert tok.convert_tokens_to_ids("<extra_id_0>") == tok.convert_tokens_to_ids("<extra_id_99>") + 99
    assert tok.convert_tokens_to_ids("<extra_id_0>") == llmkit.load_model(full.out_dir).config.vocab_size - 1
    ours, ref = llmkit.load_model(full.out_dir), T5ForConditionalGeneration.from_pretrained(full.out_dir).eval()
    x = torch.randint(ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    d = torch.randint(ours.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, decoder_input_ids=d), ref(input_ids=x, decoder_input_ids=d).logits,
                                   atol=1e-4, rtol=1e-4)


def test_cli_objective_flag(tmp_path):
    import json
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": MODEL, "train": {**TRAIN, "max_iters": 2, "eval_interval": 2}}))
    text = tmp_path / "t.txt"
    text.write_text(SHAKESPEARE.read_text()[:5000])
    base = [sys.executable, "-m", "llmkit", "pretrain", "--config", str(cfg), "--data", str(text)]
    bad = subprocess.run(base + ["--objective", "nsp", "--out_dir", str(tmp_path / "bad")], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    ok = subprocess.run(base + ["--objective", "mlm", "--out_dir", str(tmp_path / "o")], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "o/config.json").read_text())["architectures"] == ["BertForMaskedLM"]


def test_nsp_batch_layout_and_bert_for_pretraining_parity(tmp_path):
    from safetensors.torch import load_file
    from transformers import BertForPreTraining

    from llmkit.model.bert import BertForMaskedLM as Ours
    from llmkit.tokenizer import load_tokenizer
    from llmkit.train.objectives import MaskedLM

    res = pretrain(_cfg(tmp_path, "mlm", nsp=True, max_iters=2, eval_interval=2))
    out = res.out_dir
    obj = MaskedLM(load_tokenizer(out), nsp=True)  # the saved tokenizer already holds the 3 added tokens
    x = torch.randint(obj.n_random, (400, 21), generator=torch.Generator().manual_seed(0))
    (ids, _, types), (labels, is_random) = obj.batch(x, torch.Generator().manual_seed(1))
    a = 9  # (21 - 3) // 2
    assert (ids[:, 0] == obj.cls_id).all() and (ids[:, a + 1] == obj.sep_id).all() and (ids[:, -1] == obj.sep_id).all()
    assert (types[:, : a + 2] == 0).all() and (types[:, a + 2 :] == 1).all()
    assert (labels[:, [0, a + 1, 20]] == -100).all()
    orig = torch.cat([x[:, :a], torch.where(is_random[:, None].bool(), x.roll(1, 0)[:, a:18], x[:, a:18])], 1)
    sel = labels[:, [*range(1, a + 1), *range(a + 2, 20)]]
    assert torch.equal(sel[sel != -100], orig[sel != -100])  # labels are the framed originals
    assert abs(is_random.float().mean().item() - 0.5) < 0.1

    ref = BertForPreTraining.from_pretrained(out).eval()
    import llmkit

    enc = llmkit.load_model(out)
    full = Ours(enc.config, nsp=True)
    full.bert.load_state_dict(enc.state_dict())
    sd = load_file(out / "model.safetensors")
    for mine, theirs in ((full.transform, "transform.dense"), (full.ln, "transform.LayerNorm")):
        mine.weight.data, mine.bias.data = sd[f"cls.predictions.{theirs}.weight"], sd[f"cls.predictions.{theirs}.bias"]
    full.bias.data = sd["cls.predictions.bias"]
    full.seq_relationship.weight.data = sd["cls.seq_relationship.weight"]
    full.seq_relationship.bias.data = sd["cls.seq_relationship.bias"]
    with torch.no_grad():
        mlm, nsp = full.eval()(ids[:2], None, types[:2], return_nsp=True)
        r = ref(input_ids=ids[:2], token_type_ids=types[:2])
    torch.testing.assert_close(mlm, r.prediction_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(nsp, r.seq_relationship_logits, atol=1e-4, rtol=1e-4)
