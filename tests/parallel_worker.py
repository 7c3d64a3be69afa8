"""Run under torchrun by tests/test_train_parallel.py: several parallel layouts, one process launch.

argv: a JSON file {"base": config dict, "runs": [{"name", "overrides", "resume"?}], "root": folder}.
Each run trains with `llmkit.train.Trainer` in the same process group (one launch instead of one per
layout), then writes what each rank holds: parameter / gradient / optimizer bytes and the bytes
autograd saved for backward on one more micro-batch, for the memory formulas of `llmkit plan`.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llmkit.train import distributed as D
from llmkit.train.config import TrainConfig
from llmkit.train.trainer import Trainer


def _nbytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def measure(tr: Trainer) -> dict:
    """Bytes this rank holds: parameters, gradients (after one more step's backward), AdamW state,
    and the storages autograd saved during that forward (the activations)."""
    params = {id(p): p for p in tr.raw_model.parameters()}.values()
    optim = sum(_nbytes(v) for st in tr.optimizer.state.values() for v in st.values() if v.dim() > 0)
    saved: dict[int, int] = {}

    def pack(t):
        # parameters (and FSDP's gathered copies, whose views share one buffer) are not activations
        pids = {_local(p).untyped_storage().data_ptr() for p in tr.raw_model.parameters()}
        st = _local(t).untyped_storage()
        if st.data_ptr() not in pids and st.nbytes() > 0:
            saved[st.data_ptr()] = max(saved.get(st.data_ptr(), 0), st.nbytes())
        return t

    x, y = tr.sampler.next_batch()
    tr.par.forward_backward(x, y, last_micro=True)  # after eval a pipeline re-plans its first train step
    tr.optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tr.par.forward_backward(x, y, last_micro=True)
    grads = sum(_nbytes(p.grad) for p in params if p.grad is not None)
    tr.optimizer.zero_grad(set_to_none=True)
    return {"params": sum(_nbytes(p) for p in params), "grads": grads, "optimizer": optim,
            "activations": sum(saved.values())}


def _local(t):
    """The plain tensor under a DTensor or an async-collective wrapper."""
    from torch.distributed.tensor import DTensor

    t = t._local_tensor if isinstance(t, DTensor) else t
    return getattr(t, "elem", t)  # AsyncCollectiveTensor keeps its result in .elem


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    root = Path(spec["root"])
    D.teardown = lambda info: None  # keep one process group for every run of this launch
    for run in spec["runs"]:
        cfg = TrainConfig.from_dict(copy.deepcopy(spec["base"]))
        cfg.out_dir = str(root / run["name"])
        cfg.apply_overrides(run["overrides"])
        tr = Trainer(cfg, resume=run.get("resume"), overwrite=True)
        tr.fit()
        mem = measure(tr) if run.get("measure") else None
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mem)
        if dist.get_rank() == 0 and mem is not None:
            (root / run["name"] / "memory.json").write_text(json.dumps(gathered))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
