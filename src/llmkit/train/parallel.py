"""N-D parallel training on PyTorch's own stack, as torchtitan does it.

One DeviceMesh with dimensions (pp, dp_replicate, dp_shard, tp) and, applied in this order:
  1. pipeline parallel: the model split by blocks into stages (`torch.distributed.pipelining`),
     GPipe / 1F1B / interleaved 1F1B schedules over micro-batches;
  2. tensor parallel: `parallelize_module` plans (Megatron-LM, Shoeybi et al. 2019) - attention heads
     and SwiGLU gate/up column-wise, output projections row-wise, sequence-parallel norms
     (Korthikanti et al. 2022), a vocabulary-parallel embedding and loss (`loss_parallel`);
  3. activation checkpointing per block (full, or selective: keep matmul/attention outputs);
  4. FSDP2 (`fully_shard`) over dp_shard, replicated over dp_replicate (HSDP), with ZeRO-1/2/3 reshard
     settings and CPU offload.
Checkpoints go through `torch.distributed.checkpoint` in the canonical (1-process) layout, so a run
saved under one layout resumes under another.

The fused projections (`attn.qkv` = [q; k; v], SwiGLU `mlp.fc` = [gate; up]) cannot be split
column-wise as one block: rank r must get heads r of q, k and v. Their rows are therefore
interleaved per rank before sharding ([q_0; k_0; v_0; q_1; k_1; v_1]) and put back in canonical order
for checkpoints and exports (`FusedRows`).
"""

from __future__ import annotations

import functools
import logging
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from llmkit.errors import CheckpointError, ConfigError
from llmkit.fsutil import write_dir
from llmkit.model.config import ModelConfig
from llmkit.model.positions import rope_cos_sin
from llmkit.model.transformer import Transformer
from llmkit.train.checkpoint import CKPT_DIR, latest_checkpoint, load_checkpoint
from llmkit.train.config import ParallelConfig

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
AC_MODES = ("none", "full", "selective")
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


# ---------------------------------------------------------------------------------------- layout
@dataclass
class Layout:
    """Resolved degrees of each mesh dimension; their product is the world size."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.tp


def resolve_layout(pc: ParallelConfig, world: int) -> Layout:
    """Fill dp_shard = -1 with the processes left, and check that the degrees multiply to `world`."""
    for name in ("dp_replicate", "tp", "pp"):
        if getattr(pc, name) < 1:
            raise ConfigError(f"train.parallel.{name}={getattr(pc, name)} must be >= 1")
    rest = pc.dp_replicate * pc.tp * pc.pp
    shard = pc.dp_shard
    if shard == -1:
        if world % rest:
            raise ConfigError(
                f"{world} processes cannot be split into dp_replicate={pc.dp_replicate} x tp={pc.tp} x "
                f"pp={pc.pp} x dp_shard; expected a world size that is a multiple of {rest}"
            )
        shard = world // rest
    if shard < 1 or shard * rest != world:
        raise ConfigError(
            f"train.parallel: dp_replicate={pc.dp_replicate} x dp_shard={shard} x tp={pc.tp} x pp={pc.pp} = "
            f"{shard * rest}, but {world} processes were launched; expected the product to equal the world size"
        )
    if pc.pp_schedule not in SCHEDULES:
        raise ConfigError(f"train.parallel.pp_schedule={pc.pp_schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if pc.zero not in (None, 1, 2, 3):
        raise ConfigError(f"train.parallel.zero={pc.zero}; expected 1, 2 or 3")
    if pc.activation_checkpoint not in AC_MODES:
        raise ConfigError(
            f"train.parallel.activation_checkpoint={pc.activation_checkpoint!r}; expected one of {', '.join(AC_MODES)}"
        )
    return Layout(pc.pp, pc.dp_replicate, shard, pc.tp)


def check_model(cfg: Any, layout: Layout, pc: ParallelConfig, batch_size: int, seq_len: int) -> None:
    """Raise ConfigError when the model cannot be split as asked (before any collective runs)."""
    if layout.tp > 1:
        if seq_len % layout.tp:
            raise ConfigError(f"train.seq_len={seq_len} must be a multiple of train.parallel.tp={layout.tp} "
                              "(sequence parallel shards the sequence)")
        for name in ("n_head", "n_kv_head", "intermediate_size", "vocab_size"):
            n = getattr(cfg, name)
            if n % layout.tp:
                raise ConfigError(f"train.parallel.tp={layout.tp} must divide model.{name}={n}")
        if cfg.pos not in ("rope", "none"):
            raise ConfigError(f"tensor parallel supports pos rope or none, got model.pos={cfg.pos!r}")
        if cfg.n_expert > 0:
            raise ConfigError("tensor parallel of Mixture-of-Experts layers is not supported; use dp/pp")
    if layout.pp > 1:
        n_stages = layout.pp * (2 if pc.pp_schedule == "interleaved_1f1b" else 1)
        if cfg.n_layer < n_stages:
            raise ConfigError(f"model.n_layer={cfg.n_layer} is fewer than the {n_stages} pipeline stages")
        if cfg.tie_embeddings:
            raise ConfigError("pipeline parallel needs untied embeddings (model.tie_embeddings: false)")
        if cfg.pos not in ("rope", "none") or cfg.rope_type == "dynamic" or cfg.sliding_window is not None \
                or cfg.n_expert > 0:
            raise ConfigError("pipeline parallel supports dense RoPE models without sliding windows")
        n_mb = pc.pp_microbatches or n_stages
        if batch_size % n_mb:
            raise ConfigError(f"train.batch_size={batch_size} must be a multiple of the {n_mb} pipeline micro-batches")


def build_mesh(layout: Layout, device_type: str):
    """The DeviceMesh (pp, dp_replicate, dp_shard, tp) over every process."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = tuple(getattr(layout, d) for d in MESH_DIMS)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


# ------------------------------------------------------------------------------- fused row order
class FusedRows:
    """Row order of the fused projections under tensor parallelism.

    Canonical: [seg_0; seg_1; ...] (e.g. [q; k; v]). Interleaved for tp ranks:
    [seg_0 part 0; seg_1 part 0; ...; seg_0 part 1; ...], so that an even Shard(0) gives rank r
    part r of every segment: whole heads of q, k and v.
    """

    def __init__(self, sizes: list[int], tp: int) -> None:
        self.sizes, self.tp = sizes, tp

    def interleave(self, t: torch.Tensor) -> torch.Tensor:
        parts = [s.chunk(self.tp, 0) for s in t.split(self.sizes, 0)]
        return torch.cat([p[r] for r in range(self.tp) for p in parts], 0)

    def canonical(self, t: torch.Tensor) -> torch.Tensor:
        local = [s // self.tp for s in self.sizes]
        ranks = [blk.split(local, 0) for blk in t.chunk(self.tp, 0)]
        return torch.cat([ranks[r][j] for j in range(len(self.sizes)) for r in range(self.tp)], 0)


def fused_params(model: nn.Module, cfg: Any, tp: int) -> dict[str, FusedRows]:
    """Canonical names of the fused parameters (weights and biases) and their row layouts."""
    out: dict[str, FusedRows] = {}
    qkv = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    for name, _ in model.named_parameters():
        if ".attn.qkv." in name:
            out[name] = FusedRows(qkv, tp)
        elif ".mlp.fc." in name and cfg.mlp == "swiglu":
            out[name] = FusedRows([cfg.intermediate_size] * 2, tp)
    return out


# ---------------------------------------------------------------------------------- tensor parallel
def apply_tp(model: nn.Module, tp_mesh, loss_parallel: bool, fused: dict[str, FusedRows]) -> None:
    """Megatron-style plans with sequence parallel norms; the residual stream stays sharded on T."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    with torch.no_grad():  # heads of q, k, v (gate/up) contiguous per rank, see FusedRows
        params = dict(model.named_parameters())
        for name, rows in fused.items():
            if name in params:
                params[name].copy_(rows.interleave(params[name]))
    top: dict[str, Any] = {}
    if getattr(model, "wte", None) is not None:  # vocabulary-parallel embedding, output sharded on T
        top["wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if getattr(model, "ln_f", None) is not None:
        top["ln_f"] = SequenceParallel()
        top["lm_head"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,  # a DTensor sharded on V for loss_parallel
        )
    tied = getattr(model, "wte", None) is not None and getattr(model, "lm_head", None) is not None and (
        model.lm_head.weight is model.wte.weight
    )
    parallelize_module(model, tp_mesh, top)
    if tied:  # both plans shard the [V, C] matrix on dim 0: share the one DTensor again
        model.lm_head.weight = model.wte.weight
    for block in _blocks(model):
        parallelize_module(block, tp_mesh, {
            "ln_1": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                       desired_input_layouts=(Replicate(), None, None, None)),
            "attn.qkv": ColwiseParallel(),
            "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
            "ln_2": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.fc": ColwiseParallel(),
            "mlp.proj": RowwiseParallel(output_layouts=Shard(1)),
        })
        block.attn.n_head //= tp  # local heads: [B, T, nh/tp * hd] out of the column-parallel qkv
        block.attn.n_kv_head //= tp


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = model.blocks
    return list(blocks.values()) if isinstance(blocks, nn.ModuleDict) else list(blocks)


# ------------------------------------------------------------------------- activation checkpoint
def _selective_policy(ctx, op, *args, **kwargs):
    """Keep the outputs of matmuls and attention; recompute the cheap pointwise ops and norms."""
    from torch.utils.checkpoint import CheckpointPolicy

    keep = {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    }
    return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str) -> None:
    """Recompute each block's activations in backward (composable API: module names unchanged)."""
    if mode == "none":
        return
    from torch.distributed._composable import checkpoint
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    for block in _blocks(model):
        if mode == "selective":
            checkpoint(block, context_fn=functools.partial(create_selective_checkpoint_contexts, _selective_policy))
        else:
            checkpoint(block)


# ------------------------------------------------------------------------------------------ FSDP2
def apply_fsdp(model: nn.Module, dp_mesh, zero: int, offload: bool, device: torch.device) -> None:
    """fully_shard each block, then the root. ZeRO-3 reshards parameters after forward; ZeRO-1/2
    keep them gathered from forward to backward (gradients and optimizer state stay sharded)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    for block in _blocks(model):
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=zero == 3, offload_policy=policy)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, offload_policy=policy)


# -------------------------------------------------------------------------------------- pipeline
class StageModule(nn.Module):
    """The blocks one pipeline stage runs (embedding on the first, norm + head on the last).

    Blocks keep their canonical names (`blocks.5.attn.qkv.weight`) so that checkpoints of any
    layout load into any other.
    """

    def __init__(self, model: nn.Module, layers: list[int], first: bool, last: bool) -> None:
        super().__init__()
        self.config = model.config
        self.wte = model.wte if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.ln_f = model.ln_f if last else None
        self.lm_head = model.lm_head if last else None
        self.register_buffer("inv_freq", model.inv_freq, persistent=False)
        self.seq_shards = 1  # tp under sequence parallelism

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.wte is not None:
            h = self.wte(h)  # token ids [B, T] -> [B, T, C]
        B, T = h.shape[0], h.shape[1] * self.seq_shards  # under sequence parallelism h holds T / tp
        pos = torch.arange(T, device=h.device).expand(B, T)
        cos_sin = rope_cos_sin(self.inv_freq, pos, h.dtype) if self.inv_freq is not None else None
        for block in self.blocks.values():
            h = block(h, cos_sin, None)
        if self.lm_head is not None:
            h = self.lm_head(self.ln_f(h))
        return h


def stage_layers(n_layer: int, n_stages: int) -> list[list[int]]:
    """Blocks of each stage, as even as possible (earlier stages take the remainder)."""
    per, extra = divmod(n_layer, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = per + (1 if s < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


class PartsView(nn.Module):
    """This rank's modules under their canonical names: what the optimizer and checkpoints see."""

    def __init__(self, model: nn.Module, parts: list[nn.Module]) -> None:
        super().__init__()
        self.config = model.config
        self.wte = next((p.wte for p in parts if getattr(p, "wte", None) is not None), None)
        self.blocks = nn.ModuleDict({k: b for p in parts for k, b in p.blocks.items()})
        self.ln_f = next((p.ln_f for p in parts if getattr(p, "ln_f", None) is not None), None)
        self.lm_head = next((p.lm_head for p in parts if getattr(p, "lm_head", None) is not None), None)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------------------------ the runner
class Parallel:
    """A Transformer spread over a DeviceMesh: forward/backward, eval, clipping and checkpoints."""

    def __init__(self, model: nn.Module, pc: ParallelConfig, device: torch.device, batch_size: int,
                 seq_len: int, loss_fn: Callable[..., torch.Tensor], grad_accum: int = 1,
                 label_smoothing: float = 0.0) -> None:
        """`loss_fn(logits, targets, label_smoothing=0.0, reduction="mean")`: the trainer's `lm_loss`."""
        world = dist.get_world_size()
        # DTensor warns at every step that a 2-D (dp x tp) norm reduction runs as two collectives: expected here
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
        self.pc, self.device, self.cfg = pc, device, model.config
        self.layout = lay = resolve_layout(pc, world)
        check_model(self.cfg, lay, pc, batch_size, seq_len)
        self.mesh = build_mesh(lay, device.type)
        coord = self.mesh.get_coordinate()
        self.pp_rank, self.tp_rank = coord[0], coord[3]
        self.dp_rank = coord[1] * lay.dp_shard + coord[2]
        self.grad_accum, self.label_smoothing, self.batch_size = grad_accum, label_smoothing, batch_size
        self.zero = pc.zero or 3
        self.use_fsdp = lay.dp > 1 or pc.zero is not None or pc.offload
        self.loss_parallel = lay.tp > 1 and lay.pp == 1
        self.fused = fused_params(model, self.cfg, lay.tp) if lay.tp > 1 else {}
        self._lm_loss = loss_fn

        # 1. pipeline: this rank's stages (the others' blocks are dropped here)
        self.schedule = None
        if lay.pp > 1:
            v = 2 if pc.pp_schedule == "interleaved_1f1b" else 1
            layers = stage_layers(self.cfg.n_layer, lay.pp * v)
            ids = [self.pp_rank + lay.pp * i for i in range(v)]
            n = lay.pp * v
            self.parts = [StageModule(model, layers[s], s == 0, s == n - 1) for s in ids]
            self.stage_ids, self.n_stages = ids, n
        else:
            self.parts = [model]
        for part in self.parts:
            part.to(device)
            if lay.tp > 1:  # 2. tensor parallel
                apply_tp(part, self.mesh["tp"], self.loss_parallel, self.fused)
                if isinstance(part, StageModule):
                    part.seq_shards = lay.tp
            apply_ac(part, pc.activation_checkpoint)  # 3. activation checkpointing
            if self.use_fsdp:  # 4. FSDP2 / HSDP
                dp_mesh = self.mesh["dp_replicate", "dp_shard"] if lay.dp_replicate > 1 else self.mesh["dp_shard"]
                apply_fsdp(part, dp_mesh, self.zero, pc.offload, device)
        self.view = PartsView(model, self.parts) if lay.pp > 1 else model
        if lay.pp > 1:
            self._build_schedule(batch_size)

    # ---------------------------------------------------------------- pipeline schedule
    def _build_schedule(self, batch_size: int) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        self.n_microbatches = self.pc.pp_microbatches or self.n_stages
        group = self.mesh["pp"].get_group()
        stages = [PipelineStage(p, s, self.n_stages, self.device, group=group)
                  for p, s in zip(self.parts, self.stage_ids)]
        self._loss_mode = "train"
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
        kind = cls[self.pc.pp_schedule]
        arg = stages if kind is ScheduleInterleaved1F1B else stages[0]
        # scale_grads=False: the loss is already divided by micro-batches x accumulation steps
        self.schedule = kind(arg, n_microbatches=self.n_microbatches, loss_fn=self._pp_loss, scale_grads=False)
        self.is_last = self.n_stages - 1 in self.stage_ids
        self.is_first = 0 in self.stage_ids

    def _pp_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._loss_mode == "eval":
            return self._lm_loss(logits, y, reduction="sum")
        return self._lm_loss(logits, y, self.label_smoothing) / (self.n_microbatches * self.grad_accum)

    # ---------------------------------------------------------------- steps
    def loss_context(self):
        from contextlib import nullcontext

        if self.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return nullcontext()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last_micro: bool) -> torch.Tensor:
        """One micro-batch: loss (detached, the same on every rank of the data-parallel replica) and grads."""
        if self.use_fsdp:
            for part in self.parts:
                part.set_requires_gradient_sync(last_micro or self.zero > 1)
                if self.zero == 1:  # ZeRO-1: keep unsharded gradients across the accumulation
                    part.set_reshard_after_backward(last_micro)
        if self.schedule is not None:
            losses: list[torch.Tensor] = []
            self._loss_mode = "train"
            kwargs = {"target": y, "losses": losses} if self.is_last else {}
            if self.is_first:
                self.schedule.step(x, **kwargs)
            else:
                self.schedule.step(**kwargs)
            loss = torch.zeros((), device=self.device)
            if losses:  # each is loss / (micro-batches x grad_accum): their sum x grad_accum is the mean
                loss = torch.stack([lo.detach() for lo in losses]).sum() * self.grad_accum
            dist.all_reduce(loss, group=self.mesh["pp"].get_group())  # only the last stage had it
            return loss
        with self.loss_context():
            logits = self.parts[0](x)
            loss = self._lm_loss(logits, y, self.label_smoothing)
            (loss / self.grad_accum).backward()
        return _local(loss).detach()

    @torch.no_grad()
    def eval_sums(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """Summed next-token loss and target count of a batch (0, 0 on ranks without the loss)."""
        if self.schedule is not None:
            pad = self.batch_size - x.shape[0]
            if pad > 0:  # pad with ignored rows: the stages were built for one micro-batch shape
                x = torch.cat([x, x[:1].expand(pad, -1)])
                y = torch.cat([y, torch.full_like(y[:1], -100).expand(pad, -1)])
            losses: list[torch.Tensor] = []
            self._loss_mode = "eval"
            kwargs = {"target": y, "losses": losses} if self.is_last else {}
            if self.is_first:
                self.schedule.eval(x, **kwargs)
            else:
                self.schedule.eval(**kwargs)
            if not losses:
                return 0.0, 0
            # (the tp ranks of the last stage all count it: the trainer's sum / count ratio is unchanged)
            return float(sum(float(lo) for lo in losses)), int((y != -100).sum())
        self.parts[0].eval()
        with self.loss_context():
            total = _local(self._lm_loss(self.parts[0](x), y, reduction="sum"))
        self.parts[0].train()
        if self.tp_rank != 0:  # every tp rank has the same sum: count it once
            return 0.0, 0
        return float(total), y.numel()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global gradient-norm clipping over every shard and every pipeline stage."""
        from torch.distributed.tensor import DTensor

        params = [p for p in self.view.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.layout.pp > 1:
            sq = norm.pow(2)
            dist.all_reduce(sq, group=self.mesh["pp"].get_group())
            norm = sq.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Model and optimizer state in the canonical layout (DTensors where sharded)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(flatten_optimizer_state_dict=True)
        model_sd, optim_sd = get_state_dict(self.view, optimizer, options=opts)
        return {"model": self._canonical(model_sd, ""), "optimizer": self._canonical(optim_sd, "state.")}

    def _canonical(self, sd: dict[str, Any], prefix: str) -> dict[str, Any]:
        """Fused tensors back to [q; k; v] row order (as full tensors, saved once)."""
        if not self.fused:
            return sd
        out = dict(sd)
        for key, val in sd.items():
            rows = self._fused_rows(key, prefix)
            if rows is not None and isinstance(val, torch.Tensor) and val.dim() > 0:
                out[key] = rows.canonical(_full(val))
        return out

    def _fused_rows(self, key: str, prefix: str) -> FusedRows | None:
        if not key.startswith(prefix):
            return None
        name = key[len(prefix):]
        if prefix:  # optimizer keys: state.<param>.<exp_avg|exp_avg_sq|step>
            name = name.rsplit(".", 1)[0]
        return self.fused.get(name)

    def load_state_dict(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        """Load a DCP checkpoint written under any layout into this one (resharding on load)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        sd = self.state_dict(optimizer)  # templates: DTensors load their own shards, fused tensors in full
        try:
            dcp.load(sd, checkpoint_id=str(path))
        except Exception as e:  # noqa: BLE001 - a missing key or shape: the wrong model
            raise CheckpointError(
                f"the distributed checkpoint {str(path)!r} does not match this model: {str(e)[:500]}"
            ) from None
        for prefix, part in (("", sd["model"]), ("state.", sd["optimizer"])):
            for key in list(part):
                rows = self._fused_rows(key, prefix)
                if rows is not None and isinstance(part[key], torch.Tensor) and part[key].dim() > 0:
                    part[key] = rows.interleave(part[key])
        opts = StateDictOptions(flatten_optimizer_state_dict=True, full_state_dict=False)
        self._set_fused(sd)
        set_state_dict(self.view, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"],
                       options=opts)

    def _set_fused(self, sd: dict[str, Any]) -> None:
        """Full (interleaved) fused tensors -> DTensors with the live parameters' placements."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = dict(self.view.named_parameters())
        for prefix, part in (("", sd["model"]), ("state.", sd["optimizer"])):
            for key, val in list(part.items()):
                rows = self._fused_rows(key, prefix)
                if rows is None or not isinstance(val, torch.Tensor) or val.dim() == 0:
                    continue
                name = key if not prefix else key[len(prefix):].rsplit(".", 1)[0]
                ref = params[name]
                if isinstance(ref, DTensor) and not isinstance(val, DTensor):
                    part[key] = distribute_tensor(val.to(ref.to_local().device), ref.device_mesh, ref.placements)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor().cpu() if isinstance(t, DTensor) else t.cpu()


def save_dcp(state: dict[str, Any], path: Path) -> None:
    """Collective: every rank writes its shards of `state` into the folder `path`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(path))


def load_dcp_model(path: str | Path, model: nn.Module) -> None:
    """Load the model weights of a DCP checkpoint into a plain (1-process) model, no process group."""
    import torch.distributed.checkpoint as dcp

    sd = {"model": model.state_dict()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{str(path)!r} is not a distributed checkpoint of this model: {str(e)[:500]}") from None
    model.load_state_dict(sd["model"])


def checkpoint_folder(src: str | Path) -> Path | None:
    """The checkpoint folder `src` names: itself, or the latest one of an out_dir or checkpoints/ folder."""
    src = Path(src)
    if (src / "state.pt").is_file():
        return src
    return latest_checkpoint(src.parent if src.name == CKPT_DIR else src)


def dcp_to_hf(src: str | Path, out: str | Path) -> nn.Module:
    """A training checkpoint written under train.parallel (any layout) -> one Hugging Face folder
    (config.json, model.safetensors and, when the run's out_dir has them, the tokenizer files)."""
    folder = checkpoint_folder(src)
    state = load_checkpoint(src)
    if state.get("format") != "dcp" or folder is None or not (folder / "dcp").is_dir():
        raise CheckpointError(
            f"{str(src)!r} is not a distributed checkpoint (expected checkpoints/step_N with dcp/ inside, "
            "written by a run with train.parallel settings)"
        )
    model = Transformer(ModelConfig.from_dict(state["model_config"]))
    load_dcp_model(folder / "dcp", model)
    run_dir = folder.parent.parent

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)

    write_dir(out, write)
    return model
