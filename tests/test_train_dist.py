"""Distributed pretraining on CPU: 2 gloo processes (DDP, FSDP2) match 1 process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llmkit.train.config import TrainConfig
from llmkit.train.metrics import read_metrics
from llmkit.train.trainer import pretrain

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare/input.txt"
MODEL = {
    "model_type": "llama",
    "n_layer": 2,
    "n_head": 2,
    "n_kv_head": 1,
    "n_embd": 32,
    "intermediate_size": 64,
    "block_size": 16,
    "tie_embeddings": True,
}
TRAIN = {
    "batch_size": 4,
    "seq_len": 16,
    "max_iters": 8,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_iters": 2,
    "eval_interval": 4,
    "eval_iters": None,
    "log_interval": 4,
    "progress": False,
    "num_threads": 1,
}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from llmkit.train.prepare import prepare_text

    root = tmp_path_factory.mktemp("dist")
    text = root / "corpus.txt"
    if SHAKESPEARE.is_file():
        text.write_text(SHAKESPEARE.read_text()[:20_000])
    else:
        text.write_text("".join(f"line {i % 37} of the play, act {i % 5}.\n" for i in range(800)))
    prepare_text(text, root / "data", tokenizer="char", progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def single_process(prepared, tmp_path_factory):
    """1 process, grad_accum 2: the same 8 sequences per step as 2 processes x 1 micro-batch."""
    out = tmp_path_factory.mktemp("single")
    cfg = TrainConfig.from_dict(
        {"model": MODEL, "data": {"path": str(prepared)}, "train": {**TRAIN, "grad_accum": 2}, "out_dir": str(out)}
    )
    pretrain(cfg)
    return out


def _torchrun(prepared: Path, out: Path, strategy: str) -> None:
    cfg = {"model": MODEL, "data": {"path": str(prepared)}, "train": {**TRAIN, "grad_accum": 1}, "out_dir": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{strategy}.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "llmkit",
        "pretrain",
        "--config",
        str(out.parent / f"{strategy}.yaml"),
        "--strategy",
        strategy,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _assert_same_curve(a: Path, b: Path) -> None:
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [4, 8]
    for x, y in zip(ra, rb):
        assert x["tokens"] == y["tokens"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5, abs=1e-5)
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5, abs=1e-5)
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_ddp_two_gloo_processes_match_one(single_process, prepared, tmp_path):
    _torchrun(prepared, tmp_path / "ddp", "ddp")
    _assert_same_curve(single_process, tmp_path / "ddp")


def test_fsdp_two_gloo_processes_match_one(single_process, prepared, tmp_path):
    _torchrun(prepared, tmp_path / "fsdp", "fsdp")
    _assert_same_curve(single_process, tmp_path / "fsdp")
    assert len(list((tmp_path / "fsdp" / "checkpoints").glob("step_*"))) >= 1  # full-state checkpoint
