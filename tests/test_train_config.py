"""TrainConfig loading/overrides, the LR schedule and AdamW parameter groups (no training)."""

from __future__ import annotations

import math

import pytest
import torch

from llmkit.errors import ConfigError
from llmkit.train.config import TrainConfig
from llmkit.train.optim import build_adamw, param_groups
from llmkit.train.schedule import cosine_lr


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: tiny\ntrain:\n  lr: 3e-4\n  max_iters: 7\ndata:\n  tokenizer: bpe\n")
    cfg = TrainConfig.from_yaml(p)
    assert cfg.model == "tiny" and cfg.train.lr == 3e-4 and cfg.train.max_iters == 7  # 3e-4 read as a float
    cfg.apply_overrides(
        [
            "--train.lr",
            "1e-3",
            "--model.n_layer=3",
            "--train.compile",
            "true",
            "--data.vocab_size",
            "600",
            "--out_dir",
            "x/y",
            "--train.max_minutes",
            "2",
        ]
    )
    assert cfg.train.lr == 1e-3 and cfg.train.compile is True and cfg.data.vocab_size == 600
    assert cfg.model == {"preset": "tiny", "n_layer": 3} and cfg.out_dir == "x/y"
    assert cfg.train.max_minutes == 2.0
    mc = cfg.model_config(vocab_size=300)
    assert (mc.n_layer, mc.vocab_size, mc.n_embd) == (3, 300, 64)  # preset + override + tokenizer vocab


def test_unknown_key_suggests_close_match(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr_decay_iters"):
        TrainConfig.from_dict({"train": {"lr_decay_iter": 5}})
    with pytest.raises(ConfigError, match=r"model\.n_layer"):
        TrainConfig().apply_overrides(["--model.n_layers", "2"])
    with pytest.raises(ConfigError, match="unknown config key 'optim.lr'"):
        TrainConfig().apply_overrides(["--optim.lr", "2"])
    with pytest.raises(ConfigError, match="expects an integer"):
        TrainConfig().apply_overrides(["--train.batch_size", "big"])
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        TrainConfig.from_dict({"model": {"preset": "tiny", "vocab_size": 10}}).model_config(vocab_size=50)


def test_old_train_block_size_key_still_reads_as_seq_len():
    """`train.block_size` (the training window before the rename) sets train.seq_len, with a warning;
    `model.block_size` (the context length) keeps its name."""
    with pytest.warns(DeprecationWarning, match="train.seq_len"):
        cfg = TrainConfig.from_dict({"model": {"block_size": 128}, "train": {"block_size": 48}})
    assert cfg.train.seq_len == 48 and cfg.model["block_size"] == 128
    cfg = TrainConfig()
    with pytest.warns(DeprecationWarning):
        cfg.apply_overrides(["--train.block_size", "24"])
    assert cfg.train.seq_len == 24


def test_cosine_schedule_hand_computed():
    lr, lo, warm, decay = 1e-3, 1e-4, 10, 110
    assert cosine_lr(0, lr, lo, warm, decay) == pytest.approx(lr * 1 / 11)  # linear warmup
    assert cosine_lr(9, lr, lo, warm, decay) == pytest.approx(lr * 10 / 11)
    assert cosine_lr(10, lr, lo, warm, decay) == pytest.approx(lr)  # peak
    assert cosine_lr(60, lr, lo, warm, decay) == pytest.approx(lo + 0.5 * (lr - lo))  # half way: cos = 0
    assert cosine_lr(35, lr, lo, warm, decay) == pytest.approx(lo + 0.5 * (1 + math.cos(math.pi / 4)) * (lr - lo))
    assert cosine_lr(110, lr, lo, warm, decay) == lo and cosine_lr(500, lr, lo, warm, decay) == lo


def test_weight_decay_only_on_matrices():
    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer

    model = Transformer(ModelConfig.from_preset("tiny", norm="layernorm", qkv_bias=True))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique  # tied embedding counted once
    opt = build_adamw(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert isinstance(opt, torch.optim.AdamW)
