"""Resumable training checkpoints, written atomically.

Layout inside `out_dir/checkpoints/`:
    step_000500/state.pt   model, optimizer, step, sampler and RNG states (torch.save)
    step_000500/dcp/       under train.parallel: model + optimizer shards (torch.distributed.checkpoint)
    step_000500/meta.json  step and the sha256 of state.pt (detects truncated/corrupt files)
    latest                 name of the newest complete checkpoint

A checkpoint is written to a temporary folder and renamed into place with `os.replace`; `latest`
is switched (again with `os.replace`) only afterwards, and older checkpoints are pruned last, so
a crash at any moment leaves the previous good checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.errors import CheckpointError
from llmkit.fsutil import atomic_write_text, replace_dir, sha256_file

CKPT_DIR = "checkpoints"


def rng_state() -> dict[str, Any]:
    """Every RNG that can influence training: python, numpy, torch CPU and CUDA."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    out_dir: str | Path, step: int, state: dict[str, Any], keep: int = 1, move_in: dict[str, Path] | None = None
) -> Path:
    """Write `state` as checkpoint `step` atomically; keep `keep` older ones. Returns its folder.

    `move_in` {name: folder}: finished folders (a distributed checkpoint's shards) moved inside
    before the checkpoint is renamed into place."""
    root = Path(out_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-save; never a finished checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    for sub, folder in (move_in or {}).items():
        os.replace(folder, tmp / sub)
    meta = {"step": step, "sha256": sha256_file(tmp / "state.pt"), "format": 1}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _fsync_dir(tmp)
    replace_dir(tmp, final)  # re-saving a step (the final save after an eval save) swaps it
    atomic_write_text(root / "latest", name + "\n")
    _fsync_dir(root)
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p != final)
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder in `out_dir`, or None when there is none."""
    root = Path(out_dir) / CKPT_DIR
    pointer = root / "latest"
    if pointer.is_file():
        return root / pointer.read_text().strip()
    return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and verify a checkpoint folder (or an out_dir, meaning its latest checkpoint)."""
    path = Path(path)
    if not (path / "state.pt").exists():  # an out_dir (or its checkpoints/ folder): take the latest
        found = latest_checkpoint(path.parent if path.name == CKPT_DIR else path)
        if found is None:
            raise CheckpointError(
                f"{str(path)!r} holds no checkpoint to resume from "
                f"(expected a checkpoint folder with state.pt, or an out_dir with {CKPT_DIR}/latest)"
            )
        path = found
    state_file, meta_file = path / "state.pt", path / "meta.json"
    if not state_file.is_file() or not meta_file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: expected state.pt and meta.json in it")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unreadable meta.json: {e}") from None
    digest = sha256_file(state_file)
    if digest != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt: state.pt has sha256 {digest[:12]}..., "
            f"meta.json expects {str(meta.get('sha256'))[:12]}...; "
            f"resume from an older checkpoint with --resume {path.parent}/step_NNNNNN or start over"
        )
    try:
        return torch.load(state_file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"checkpoint {str(path)!r} could not be read: {e}") from None
