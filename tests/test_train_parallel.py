"""N-D parallel training on CPU with gloo: every layout follows the 1-process loss curve.

Two launches (`tests/parallel_worker.py` runs several layouts per launch): 8 processes for the 3D
composition (dp_shard 2 x tp 2 x pp 2), 4 processes for the others. Tolerance: rel 2e-5 on losses
(float32). The layouts compute the same sums in another order - gloo's all-reduce adds the ranks'
partial gradients, row-parallel matmuls add partial products, micro-batches add their gradients -
and float32 addition is not associative: each reordering changes the last bits (~1e-7 relative),
and 20 AdamW steps carry them forward. Measured gaps are ~1e-7; a bug (a missing gradient
reduction, a wrong head split) moves the loss by > 1e-3 after a few steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.train.config import TrainConfig
from llmkit.train.metrics import read_metrics
from llmkit.train.trainer import pretrain

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare/input.txt"
WORKER = Path(__file__).with_name("parallel_worker.py")
MODEL = {
    "model_type": "llama",
    "n_layer": 4,
    "n_head": 4,
    "n_kv_head": 2,  # GQA: tp 2 splits 2 q heads + 1 kv head per rank
    "n_embd": 32,
    "intermediate_size": 64,
    "block_size": 16,
    "tie_embeddings": False,
}
TRAIN = {
    "batch_size": 8,  # the global batch: 8 sequences per step in every layout
    "seq_len": 16,
    "max_iters": 20,
    "lr_decay_iters": 20,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_iters": 2,
    "eval_interval": 10,
    "eval_iters": None,  # every eval covers the whole val split (eval_iters counts per-rank batches)
    "log_interval": 10,
    "checkpoint": False,
    "progress": False,
    "num_threads": 1,
}
REL = 2e-5


def P(**kw) -> list[str]:
    """Overrides for train.parallel.* and train.* keys."""
    out = []
    for k, v in kw.items():
        key = k if k in ("batch_size", "grad_accum", "checkpoint") else f"parallel.{k}"
        out += [f"--train.{key}", json.dumps(v) if not isinstance(v, str) else v]
    return out


RUNS_8 = [  # 3D: FSDP + TP + PP, 1F1B over 2 micro-batches; its step-10 checkpoint resumes below
    {"name": "3d", "overrides": P(dp_shard=2, tp=2, pp=2, pp_microbatches=2, batch_size=4, checkpoint=True)},
]
RUNS_4 = [
    {"name": "fsdp_tp", "measure": True, "overrides": P(dp_shard=2, tp=2, batch_size=4)},  # 2D, ZeRO-3
    {"name": "pp_gpipe_zero2", "measure": True,
     "overrides": P(pp=2, dp_shard=2, pp_schedule="gpipe", zero=2, batch_size=4)},
    {"name": "pp_interleaved_tp", "overrides": P(pp=2, tp=2, pp_schedule="interleaved_1f1b", pp_microbatches=2,
                                                 activation_checkpoint="selective")},
    {"name": "hsdp_zero3_offload", "measure": True,  # ZeRO-3 + CPU offload + full checkpointing, accumulation
     "overrides": P(dp_replicate=2, dp_shard=2, zero=3, offload=True, activation_checkpoint="full",
                    batch_size=1, grad_accum=2)},
    {"name": "tp_zero1", "overrides": P(dp_shard=2, tp=2, zero=1, batch_size=2, grad_accum=2, checkpoint=True)},
]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from llmkit.train.prepare import prepare_text

    root = tmp_path_factory.mktemp("parallel")
    text = root / "corpus.txt"
    if SHAKESPEARE.is_file():
        text.write_text(SHAKESPEARE.read_text()[:8_000])
    else:
        text.write_text("".join(f"line {i % 37} of the play, act {i % 5}.\n" for i in range(500)))
    prepare_text(text, root / "data", tokenizer="char", progress=False)
    return root


def _base(root: Path) -> dict:
    return {"model": MODEL, "data": {"path": str(root / "data")}, "train": dict(TRAIN)}


@pytest.fixture(scope="module")
def reference(root) -> Path:
    out = root / "single"
    cfg = TrainConfig.from_dict({**_base(root), "out_dir": str(out)})
    cfg.train.strategy = "single"
    pretrain(cfg)
    return out


def _launch(root: Path, nproc: int, runs: list[dict]) -> None:
    spec = root / f"spec{nproc}.json"
    spec.write_text(json.dumps({"root": str(root), "base": _base(root), "runs": runs}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           str(WORKER), str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def launched(root, reference) -> Path:
    _launch(root, 8, RUNS_8)
    resume = {"name": "resumed_tp_dp", "resume": str(root / "3d/checkpoints/step_000010"),
              "overrides": P(dp_shard=2, tp=2, batch_size=4)}  # saved 2 x 2 x 2, resumed 2 x 2 (no pp)
    _launch(root, 4, RUNS_4 + [resume])
    return root


def _same_curve(ref: Path, run: Path, steps=(10, 20)) -> None:
    ra = {r["step"]: r for r in read_metrics(ref / "metrics.jsonl")}
    rb = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert sorted(rb) == list(steps), run.name
    for s in steps:
        assert rb[s]["tokens"] == ra[s]["tokens"]
        for key in ("train_loss", "val_loss"):
            assert rb[s][key] == pytest.approx(ra[s][key], rel=REL), (run.name, s, key)


@pytest.mark.parametrize("name", [r["name"] for r in RUNS_8 + RUNS_4])
def test_layout_matches_one_process(launched, reference, name):
    _same_curve(reference, launched / name)
    from safetensors.torch import load_file  # the exported HF folder: canonical weights

    wa, wb = load_file(reference / "model.safetensors"), load_file(launched / name / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=2e-5)


def test_resume_under_another_layout(launched, reference):
    """3D checkpoint at step 10 -> dp_shard 2 x tp 2: steps 11-20 follow the same curve."""
    _same_curve(reference, launched / "resumed_tp_dp", steps=(20,))


def test_resume_tp_checkpoint_in_one_process(launched, reference, tmp_path):
    """Save 2 x TP (with FSDP), resume 1 process: the distributed checkpoint is resharded on load."""
    cfg = TrainConfig.from_dict({**_base(launched), "out_dir": str(tmp_path / "one")})
    cfg.train.strategy = "parallel"
    pretrain(cfg, resume=str(launched / "tp_zero1/checkpoints/step_000010"))
    _same_curve(reference, tmp_path / "one", steps=(20,))


def test_measured_memory_per_rank_matches_plan(launched):
    """`llmkit plan`'s formulas against the bytes each rank held (max over ranks), within 15%."""
    from llmkit.model.config import ModelConfig
    from llmkit.train.plan import Layout, ModelShape, memory

    vocab = json.loads((launched / "fsdp_tp" / "config.json").read_text())["vocab_size"]
    shape = ModelShape.from_config(ModelConfig(**MODEL, vocab_size=vocab))
    checks = {  # run: (layout, {measured key: formula key})
        "fsdp_tp": (Layout(dp_shard=2, tp=2, micro_batch=4, seq_len=16),
                    {"params": "weights", "grads": "grads", "optimizer": "optimizer", "activations": "activations"}),
        # ZeRO-2: parameters are whole from forward to backward only, sharded at rest (what is measured)
        "pp_gpipe_zero2": (Layout(dp_shard=2, pp=2, pp_schedule="gpipe", zero=2, micro_batch=4, seq_len=16),
                           {"grads": "grads", "optimizer": "optimizer", "activations": "activations"}),
        # offload: all state in host memory (on a CPU-only machine the host is the device)
        "hsdp_zero3_offload": (Layout(dp_replicate=2, dp_shard=2, offload=True, micro_batch=1, seq_len=16),
                               {"state": "host"}),
    }
    state = {}
    for name, (lay, keys) in checks.items():
        measured = json.loads((launched / name / "memory.json").read_text())
        for m in measured:
            m["state"] = m["params"] + m["grads"] + m["optimizer"]
        state[name] = max(m["state"] for m in measured)
        plan = memory(shape, lay, act_bytes=4)
        for key, formula in keys.items():
            got = max(m[key] for m in measured)
            assert got == pytest.approx(plan[formula], rel=0.15), (name, key, got, plan[formula])
    # the memory limit: AdamW training of this model needs 16 bytes per parameter in one process;
    # under ZeRO-3 over dp_shard 2 each rank holds half, and shows it
    full = 16 * shape.params()["total"]
    assert state["hsdp_zero3_offload"] < 0.55 * full


def test_plan_cli_prints_the_table():
    from llmkit.cli import main

    proc = subprocess.run([sys.executable, "-m", "llmkit", "plan", "--params", "70e9", "--gpus", "512",
                           "--tp", "8", "--pp", "4", "--dp", "16"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "69B parameters" in proc.stdout and "dp1x16 tp8 pp4 z3" in proc.stdout
    assert main(["plan", "--params", "7e9", "--gpus", "8", "--tp", "3"]) == 2  # 3 x 1 x 1 != 8: a clear error


def test_bad_layouts_are_config_errors():
    from llmkit.errors import ConfigError
    from llmkit.model.config import ModelConfig
    from llmkit.train.config import ParallelConfig
    from llmkit.train.parallel import check_model, resolve_layout

    with pytest.raises(ConfigError, match="multiple of 6"):
        resolve_layout(ParallelConfig(tp=2, pp=3), world=8)
    with pytest.raises(ConfigError, match="pp_schedule"):
        resolve_layout(ParallelConfig(pp_schedule="zigzag"), world=1)
    cfg = ModelConfig(**{**MODEL, "n_kv_head": 1}, vocab_size=64)
    with pytest.raises(ConfigError, match="n_kv_head=1"):
        check_model(cfg, resolve_layout(ParallelConfig(tp=2), 2), ParallelConfig(tp=2), 8, 16)
    with pytest.raises(ConfigError, match="unknown config key 'train.parallel.tpp'"):
        TrainConfig().apply_overrides(["--train.parallel.tpp", "2"])


def test_convert_dcp_checkpoint_to_one_hf_folder(launched, tmp_path):
    """`llmkit convert dcp` (the 3-D run's latest checkpoint) = the folder the run exported; transformers loads it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llmkit.cli import main

    assert main(["convert", "dcp", str(launched / "3d"), str(tmp_path / "hf")]) == 0
    wa, wb = load_file(launched / "3d" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.num_hidden_layers == MODEL["n_layer"] and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert main(["convert", "dcp", str(tmp_path / "hf"), str(tmp_path / "x")]) == 2  # not a checkpoint: an error
