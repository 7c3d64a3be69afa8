"""Knowledge distillation (`llmkit distill`): the loss against torch's KL / cross-entropy written out, a
student that moves toward its teacher, exact resume, the top-K teacher cache, hidden-state matching,
vocabulary errors, and pruning recovery (`llmkit prune --recover-steps`) keeping zeros at zero."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_infer_fixtures import byte_level_bpe
from tokenizers import Tokenizer as RawTokenizer

import llmkit
from llmkit.cli import main
from llmkit.errors import ConfigError, InputError
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import Tokenizer
from llmkit.train.distill import distill, distill_loss, kd_kl, layer_map

STUDENT = {"n_layer": 1, "n_head": 2, "n_embd": 32, "intermediate_size": 64}
RUN = dict(seq_len=32, batch_size=8, num_threads=1, progress=False, lr=3e-3, eval_iters=4, eval_interval=12)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random llama whose head is scaled up, so that its next-token distributions are peaked."""
    folder = tmp_path_factory.mktemp("teacher")
    tok = Tokenizer(RawTokenizer.from_str(byte_level_bpe().to_str()), {"eos_token": "<|endoftext|>"})
    tok.save(folder)
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=128, block_size=64, tie_embeddings=False)
    m = Transformer(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(40)
    m.save_pretrained(folder)
    return folder



def test_loss_equals_torch_kl_div_and_cross_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11) * 3
    y = torch.randint(0, 11, (2, 5))
    tau, alpha = 2.0, 0.3
    ls, lt = F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1)
    fwd = F.kl_div(ls.reshape(-1, 11), lt.reshape(-1, 11), log_target=True, reduction="batchmean")  # KL(t || s)
    rev = F.kl_div(lt.reshape(-1, 11), ls.reshape(-1, 11), log_target=True, reduction="batchmean")  # KL(s || t)
    ce = F.cross_entropy(s.reshape(-1, 11), y.reshape(-1))
    loss, parts = distill_loss(s, t, y, alpha, tau)
    torch.testing.assert_close(loss, alpha * tau**2 * fwd + (1 - alpha) * ce)
    assert parts["ce"] == pytest.approx(float(ce), rel=1e-5)
    torch.testing.assert_close(kd_kl(s, t, tau, "reverse"), rev)
    # top-K: both distributions renormalised over the teacher's K best ids (written out in numpy-style loops)
    k = 4
    top = F.log_softmax(t, -1).topk(k, dim=-1)
    got = kd_kl(s, (top.values, top.indices), tau)
    total = 0.0
    for b in range(2):
        for i in range(5):
            ids = top.indices[b, i].tolist()
            pt = torch.softmax(t[b, i, ids] / tau, 0)
            ps = torch.softmax(s[b, i, ids] / tau, 0)
            total += float((pt * (pt.log() - ps.log())).sum())
    assert float(got) == pytest.approx(total / 10, rel=1e-5)
    h = [(torch.ones(2, 3), torch.zeros(2, 3))]
    loss_h, parts_h = distill_loss(s, t, y, alpha, tau, hidden=h, hidden_weight=0.5)
    torch.testing.assert_close(loss_h, loss + 0.5)
    assert parts_h["hidden_mse"] == 1.0 and layer_map(2, 4) == [1, 3] and layer_map(3, 2) == [0, 0, 1]


def _kl_to_teacher(student_dir, teacher_dir, text_ids):
    s, t = llmkit.load_model(student_dir), llmkit.load_model(teacher_dir)
    with torch.no_grad():
        return float(kd_kl(s(text_ids), t(text_ids), 1.0))


def test_student_moves_toward_the_teacher_and_resumes_exactly(teacher, text, tmp_path):
    ids = torch.tensor([llmkit.load_tokenizer(teacher).encode(text.read_text()[:400])[:48]])
    init = tmp_path / "init"
    distill(teacher, text, init, student_config=STUDENT, max_steps=1, lr=1e-9,
            **{k: v for k, v in RUN.items() if k != "lr"})
    r = distill(teacher, text, tmp_path / "full", student_config=STUDENT, max_steps=24, alpha=1.0, temperature=1.0,
                **RUN)
    before, after = _kl_to_teacher(init, teacher, ids), _kl_to_teacher(tmp_path / "full", teacher, ids)
    assert after < 0.85 * before, (before, after)
    recs = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 24 and "train_kl" in recs[-1] and (tmp_path / "full" / "loss.png").is_file()
    assert r.step == 24
    # interrupted at 12, resumed: the same weights as the uninterrupted run
    distill(teacher, text, tmp_path / "res", student_config=STUDENT, max_steps=24, alpha=1.0, temperature=1.0,
            stop_after=12, **RUN)
    distill(teacher, text, tmp_path / "res", student_config=STUDENT, max_steps=24, alpha=1.0, temperature=1.0,
            resume=True, **RUN)
    a, b = llmkit.load_model(tmp_path / "full"), llmkit.load_model(tmp_path / "res")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_topk_cache_and_hidden_matching_cli(teacher, text, tmp_path, capsys):
    out = tmp_path / "s"
    rc = main(["distill", "--teacher", str(teacher), "--student-preset", "tiny", "--data", str(text), "--out",
               str(out), "--max-steps", "4", "--seq-len", "32", "--batch-size", "4", "--cache-teacher-topk", "5",
               "--hidden-weight", "0.1", "--eval-interval", "2"])
    assert rc == 0 and "student val loss" in capsys.readouterr().out
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["train_hidden_mse"] > 0 and rec["train_kl"] > 0
    lp, ix = (torch.from_numpy(__import__("numpy").load(out / "teacher_topk" / f)) for f in ("logprobs.npy", "ids.npy"))
    data = __import__("numpy").fromfile(out / "data" / "train.bin", dtype="uint16")[:33]
    with torch.no_grad():  # window 1's cached top-5 are the teacher's own
        top = F.log_softmax(llmkit.load_model(teacher)(torch.tensor(data[:32].astype("int64"))[None]), -1).topk(5)
    assert torch.equal(ix[0].long(), top.indices[0])
    torch.testing.assert_close(lp[0].float(), top.values[0], atol=2e-3, rtol=1e-3)
    s = llmkit.load_model(out)  # the student alone: the projections are not in the folder
    assert s.config.vocab_size == llmkit.load_model(teacher).config.vocab_size and s.config.n_layer == 2
    assert not any("distill_proj" in k for k in s.state_dict())


def test_vocabulary_and_argument_errors(teacher, text, tmp_path, capsys):
    other = tmp_path / "other"
    tok = llmkit.tokenizer.train_char_from_iterator(iter(["abc"]), other)
    Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=64)).save_pretrained(
        other)
    with pytest.raises(InputError, match="vocabulary"):
        distill(teacher, text, tmp_path / "x", student=str(other), max_steps=1, **RUN)
    with pytest.raises(ConfigError, match="vocab_size"):
        distill(teacher, text, tmp_path / "y", student_config={**STUDENT, "vocab_size": 7}, max_steps=1, **RUN)
    with pytest.raises(ConfigError, match="exactly one"):
        distill(teacher, text, tmp_path / "z", max_steps=1)
    rc = main(["distill", "--teacher", str(tmp_path / "nope"), "--student-preset", "tiny", "--data", str(text),
               "--out", str(tmp_path / "w")])
    assert rc == 2 and "not a model folder" in capsys.readouterr().err


def test_prune_recover_steps_keeps_zeros_and_lowers_loss(teacher, text, tmp_path, capsys):
    out = tmp_path / "mag"
    rc = main(["prune", "--model", str(teacher), "--method", "magnitude", "--sparsity", "0.6", "--out",
               str(tmp_path / "plain")])
    assert rc == 0
    rc = main(["prune", "--model", str(teacher), "--method", "magnitude", "--sparsity", "0.6", "--recover-steps",
               "12", "--recover-data", str(text), "--recover-seq-len", "32", "--recover-alpha", "1.0",
               "--recover-lr", "1e-3", "--out", str(out)])
    assert rc == 0 and "recovered 12 steps" in capsys.readouterr().out
    plain, rec = llmkit.load_model(tmp_path / "plain"), llmkit.load_model(out)
    for n in ("blocks.0.attn.qkv", "blocks.1.mlp.proj"):
        z = plain.get_submodule(n).weight == 0
        assert torch.equal(rec.get_submodule(n).weight == 0, z)  # the mask held
    ids = torch.tensor([llmkit.load_tokenizer(teacher).encode(text.read_text()[:400])[:48]])
    assert _kl_to_teacher(out, teacher, ids) < _kl_to_teacher(tmp_path / "plain", teacher, ids)
