"""Process-group set-up and model wrapping: single process, DDP, or FSDP2 (`fully_shard`);
N-D layouts (tp, pp, HSDP, ZeRO) are built by `parallel.py` under strategy `parallel`."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from llmkit.errors import ConfigError

STRATEGIES = ("auto", "single", "ddp", "fsdp", "parallel")


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    strategy: str = "single"  # single | ddp | fsdp | parallel
    device: torch.device = torch.device("cpu")
    dp_rank: int | None = None  # data-parallel rank and size (tp/pp ranks of one replica share the data)
    dp_size: int | None = None

    def __post_init__(self) -> None:
        self.dp_rank = self.rank if self.dp_rank is None else self.dp_rank
        self.dp_size = self.world_size if self.dp_size is None else self.dp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` means this rank's GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use cpu or auto")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup(strategy: str, device: str, parallel: bool = False) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE set); gloo on CPU, nccl on GPU.

    `parallel`: the config asks for an N-D layout (train.parallel), which strategy `parallel` builds.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"train.strategy={strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if parallel:
        if strategy in ("single", "ddp"):
            raise ConfigError(
                f"train.strategy={strategy} cannot combine with train.parallel settings; "
                "use strategy auto or parallel (dp_replicate is DDP)"
            )
        strategy = "parallel"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "single"
    if strategy == "single" and world > 1:
        raise ConfigError(f"train.strategy=single but {world} processes were launched; use ddp or fsdp")
    if strategy in ("ddp", "fsdp", "parallel") and "RANK" not in os.environ:
        if strategy == "ddp":  # DDP over one process is plain training
            strategy = "single"
        else:  # FSDP over a world of one still needs a process group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if strategy != "single" and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world, strategy, dev)


def teardown(info: DistInfo) -> None:
    if info.strategy != "single" and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP wraps the module; FSDP2 shards each Transformer block and then the root in place."""
    if info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if info.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def no_grad_sync(model: nn.Module, info: DistInfo, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if sync:
        return nullcontext()
    if info.strategy == "ddp":
        return model.no_sync()
    if info.strategy == "fsdp" and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)

        class _Resync:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                model.set_requires_gradient_sync(True)

        return _Resync()
    return nullcontext()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.strategy != "single" and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.strategy != "single" and dist.is_initialized():
        dist.barrier()
