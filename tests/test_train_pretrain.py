"""Pretraining end to end on tiny configs: metrics, the HF output folder, exact resume, bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from llmkit.errors import CheckpointError, ConfigError, InputError
from llmkit.train.config import TrainConfig
from llmkit.train.metrics import METRIC_KEYS, read_metrics
from llmkit.train.trainer import lm_loss, pretrain

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare/input.txt"

TINY_MODEL = {
    "model_type": "llama",
    "n_layer": 2,
    "n_head": 2,
    "n_kv_head": 1,
    "n_embd": 32,
    "intermediate_size": 64,
    "block_size": 32,
    "tie_embeddings": True,
}
TINY_TRAIN = {
    "batch_size": 4,
    "seq_len": 16,
    "max_iters": 20,
    "lr_decay_iters": 20,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_iters": 3,
    "eval_interval": 5,
    "eval_iters": 2,
    "log_interval": 5,
    "progress": False,
    "num_threads": 1,
}


def tiny_config(data, out, model=None, **train) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": model or dict(TINY_MODEL),
            "data": {"path": str(data)},
            "train": {**TINY_TRAIN, **train},
            "out_dir": str(out),
        }
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The first 30k characters of tinyshakespeare (or a generated text when it is absent)."""
    p = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    if SHAKESPEARE.is_file():
        p.write_text(SHAKESPEARE.read_text()[:30_000])
    else:
        p.write_text(
            "".join(
                f"The {w} of the king is {v}.\n"
                for w in ("crown", "sword", "horse")
                for v in ("gold", "iron", "gone", "near")
                for _ in range(200)
            )
        )
    return p


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    """A char-level prepared token folder (what `llmkit data prepare` writes)."""
    from llmkit.train.prepare import prepare_text

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_text(corpus, out, tokenizer="char", val_fraction=0.1, progress=False)
    return out


@pytest.fixture(scope="module")
def reference_run(prepared, tmp_path_factory):
    """20 uninterrupted steps with dropout (so the RNG state matters for resume)."""
    out = tmp_path_factory.mktemp("ref")
    model = {**TINY_MODEL, "dropout": 0.1}
    result = pretrain(tiny_config(prepared, out, model=model))
    return out, model, result


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def test_metrics_plot_and_learning(reference_run, prepared):
    out, _, result = reference_run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for r in records:
        assert set(METRIC_KEYS) <= set(r) and r["tokens"] == r["step"] * 4 * 16
        assert r["tokens_per_sec"] > 0 and math.isfinite(r["train_loss"])
    vocab = json.loads((prepared / "manifest.json").read_text())["vocab_size"]
    assert records[-1]["val_loss"] < records[0]["val_loss"] < math.log(vocab) + 0.1  # learns, beats uniform
    assert records[-1]["lr"] == pytest.approx(3e-4 + 0.5 * (1 + math.cos(math.pi * 16 / 17)) * 2.7e-3)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.step == 20 and result.val_loss == records[-1]["val_loss"]


def test_output_folder_loads_and_val_loss_is_whole_split(reference_run, prepared):
    """The HF folder loads with llmkit and transformers (same logits); the final val loss equals
    an independent computation over every seq_len window of val.bin."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit import load_model

    out, _, result = reference_run
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file()
    model = load_model(out)
    manifest = json.loads((prepared / "manifest.json").read_text())
    val = np.fromfile(prepared / "val.bin", dtype=manifest["dtype"]).astype(np.int64)
    T = 16
    n = (len(val) - 1) // T
    x = torch.from_numpy(np.stack([val[i * T : i * T + T] for i in range(n)]))
    y = torch.from_numpy(np.stack([val[i * T + 1 : i * T + T + 1] for i in range(n)]))
    with torch.no_grad():
        logits = model(x)
        ref = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    assert ref == pytest.approx(result.val_loss, abs=1e-5)

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf(x[:4]).logits, logits[:4], atol=1e-4, rtol=1e-4)
    from llmkit import load_tokenizer

    text = "First Citizen:\nSpeak."
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == load_tokenizer(out).encode(text)


def test_gpt2_style_recipe_loads_in_transformers(prepared, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmkit import load_model

    model = {"preset": "gpt2-small", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
    pretrain(tiny_config(prepared, tmp_path, model=model, max_iters=5, eval_interval=5))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    x = torch.randint(0, hf.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, load_model(tmp_path)(x), atol=1e-4, rtol=1e-4)


def test_nanogpt_style_llmkit_family_folder_loads(prepared, tmp_path):
    """nanoGPT's GPT (LayerNorm, GELU, learned positions, no biases, tied) has no HF family: the
    folder is `model_type: llmkit` and still loads with llmkit.load_model, same logits."""
    from llmkit import load_model
    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer
    from llmkit.train.checkpoint import load_checkpoint

    model = {
        "model_type": "llmkit",
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 32,
        "norm": "layernorm",
        "mlp": "gelu",
        "activation": "gelu",
        "pos": "learned",
        "tie_embeddings": True,
    }
    pretrain(tiny_config(prepared, tmp_path, model=model, max_iters=5, eval_interval=5))
    state = load_checkpoint(tmp_path)
    trained = Transformer(ModelConfig.from_dict(state["model_config"]))
    trained.load_state_dict(state["model"])
    x = torch.randint(0, trained.config.vocab_size, (2, 16))
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.wte.weight  # still tied after loading
    torch.testing.assert_close(loaded(x), trained.eval()(x))


def test_resume_after_injected_stop_is_exact(reference_run, prepared, tmp_path):
    ref_out, model, _ = reference_run
    first = pretrain(tiny_config(prepared, tmp_path, model=model), stop_after=10)
    assert first.step == 10 and [r["step"] for r in first.metrics] == [5, 10]
    second = pretrain(tiny_config(prepared, tmp_path, model=model), resume=True)
    assert second.step == 20
    ref = read_metrics(ref_out / "metrics.jsonl")
    got = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [5, 10, 15, 20]
    for a, b in zip(ref, got):
        for k in ("train_loss", "val_loss", "lr", "tokens"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), (a["step"], k)
    assert _same_weights(ref_out, tmp_path)


def _same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_resume_after_sigkill_matches_uninterrupted_run(reference_run, prepared, tmp_path):
    """A real `llmkit pretrain` process is SIGKILLed after its first checkpoint; resuming it gives
    the loss curve of the uninterrupted run (the schedule is pinned by lr_decay_iters=20)."""
    ref_out, model, _ = reference_run
    cfg = tiny_config(prepared, tmp_path, model=model, max_iters=100_000)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmkit", "pretrain", "--config", str(tmp_path / "cfg.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    latest = tmp_path / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert alive, f"the training process ended before it could be killed: {err.decode()[-2000:]}"
    killed_at = int(latest.read_text().strip().split("_")[1])
    assert 5 <= killed_at < 20
    resumed = pretrain(tiny_config(prepared, tmp_path, model=model, max_iters=20), resume=True)
    ref = read_metrics(ref_out / "metrics.jsonl")
    got = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [5, 10, 15, 20] and resumed.step == 20
    for a, b in zip(ref, got):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    assert _same_weights(ref_out, tmp_path)


def test_corrupt_checkpoint_is_reported_and_nothing_is_overwritten(prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path, max_iters=10, keep_checkpoints=1)
    pretrain(cfg)
    ckpts = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_000005", "step_000010"]  # the previous one is kept
    before = _tree_digest(tmp_path)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):  # fresh run, no --resume
        pretrain(cfg)
    assert _tree_digest(tmp_path) == before
    state = ckpts[-1] / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    before = _tree_digest(tmp_path)
    with pytest.raises(CheckpointError, match="corrupt"):
        pretrain(cfg, resume=True)
    assert _tree_digest(tmp_path) == before
    resumed = pretrain(tiny_config(prepared, tmp_path, max_iters=12), resume=str(ckpts[0]))  # older one
    assert resumed.step == 12


def test_bad_inputs_give_clear_errors(tmp_path, prepared):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        pretrain(tiny_config(empty, tmp_path / "o1"))
    with pytest.raises(InputError, match="does not exist"):
        pretrain(tiny_config(tmp_path / "nope.txt", tmp_path / "o2"))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00 not utf-8 \xff" * 10)
    with pytest.raises(InputError, match="UTF-8"):
        pretrain(tiny_config(binary, tmp_path / "o3"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pretrain(tiny_config(prepared, tmp_path / "o4"), resume=True)
    with pytest.raises(ConfigError, match="block_size"):
        pretrain(tiny_config(prepared, tmp_path / "o5", seq_len=64))  # model.block_size is 32


def test_label_smoothing_loss_matches_formula():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, y[..., None]).mean()
    smooth = -logp.mean(-1).mean()
    assert lm_loss(logits, y, 0.1).item() == pytest.approx((0.9 * nll + 0.1 * smooth).item(), rel=1e-6)
    assert lm_loss(logits, y).item() == pytest.approx(nll.item(), rel=1e-6)


def test_cli_pretrain_from_raw_text_with_overrides(corpus, tmp_path, capsys):
    from llmkit.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": TINY_MODEL, "train": {**TINY_TRAIN, "max_iters": 50}}))
    rc = main(
        [
            "pretrain",
            "--config",
            str(cfg),
            "--data",
            str(corpus),
            "--out_dir",
            str(tmp_path / "o"),
            "--train.max_iters",
            "6",
            "--train.eval_interval=3",
            "--model.n_layer",
            "1",
            "--data.tokenizer",
            "bpe",
            "--data.vocab_size",
            "300",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "done: step 6" in out and "perplexity" in out
    conf = json.loads((tmp_path / "o" / "config.json").read_text())
    assert conf["num_hidden_layers"] == 1 and conf["vocab_size"] == 300
    assert json.loads((tmp_path / "o" / "data" / "manifest.json").read_text())["vocab_size"] == 300
    rc = main(
        [
            "pretrain",
            "--config",
            str(cfg),
            "--data",
            str(corpus),
            "--out_dir",
            str(tmp_path / "p"),
            "--train.learning_rate",
            "1",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.learning_rate'" in err and "train.lr" in err and "Traceback" not in err


def test_moe_load_balancing_loss_is_added(prepared, tmp_path):
    from llmkit.train.trainer import Trainer

    trainer = Trainer(tiny_config(prepared, tmp_path, model="moe-tiny", max_iters=1))
    trainer._setup()
    sampler_state = trainer.sampler.state_dict()
    x, y = trainer.sampler.next_batch()
    trainer.sampler.load_state_dict(sampler_state)  # train_step draws the same batch again
    with torch.no_grad():
        ce = lm_loss(trainer.model(x), y).item()
        aux = trainer.raw_model.aux_loss.item()
    coef = trainer.model_config.router_aux_loss_coef
    assert aux > 0.5 and coef > 0  # Switch loss is ~1 for balanced routing
    assert trainer.train_step().item() == pytest.approx(ce + coef * aux, rel=1e-5)
