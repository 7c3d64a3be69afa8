"""The pretraining loop: causal-LM loss, AdamW, warmup + cosine, accumulation, clipping, eval,
atomic checkpoints with exact resume, metrics.jsonl + loss.png, DDP / FSDP2, and N-D layouts
(tensor / pipeline / HSDP / ZeRO, `parallel.py`) with distributed checkpoints."""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from llmkit.errors import CheckpointError, ConfigError
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import load_tokenizer
from llmkit.train import distributed as D
from llmkit.train.batches import RandomWindowSampler, eval_starts, windows
from llmkit.train.checkpoint import (
    CKPT_DIR,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from llmkit.train.config import TrainConfig
from llmkit.train.metrics import MetricsLog
from llmkit.train.objectives import get_objective, objective_loss
from llmkit.train.optim import build_adamw
from llmkit.train.parallel import Parallel, checkpoint_folder, load_dcp_model, save_dcp
from llmkit.train.prepare import TokenData, resolve_data
from llmkit.train.schedule import cosine_lr, cosine_lr_fraction

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    out_dir: Path
    step: int
    val_loss: float | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    wall_time: float = 0.0
    train_time: float = 0.0
    tokens: int = 0
    peak_memory: int = 0  # bytes (fine-tuning runs fill these in)
    trainable_params: int = 0
    total_params: int = 0
    truncated: int = 0  # examples cut to the maximum sequence length


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy; logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs that support it, fp32 elsewhere (CPUs here have no fast bf16)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"train.dtype={name!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _set_threads(cfg_threads: int | None, local_world: int) -> None:
    """CPU threads: the config's, else OMP_NUM_THREADS, else the cores shared among local ranks."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    default = int(env) if env.isdigit() and int(env) > 0 else max(1, (os.cpu_count() or 1) // max(1, local_world))
    n = cfg_threads or default
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def autotune_threads(model: nn.Module, batch_size: int, seq_len: int, steps: int = 2) -> int:
    """Time forward+backward of a copy of `model` with 1 thread and with all cores; keep the faster.

    On a CPU shared with other jobs, idle OpenMP workers spin and N threads can be many times
    slower than 1. RNG states are restored, so training is unaffected.
    """
    import copy

    cores = os.cpu_count() or 1
    if cores == 1:
        return 1
    rng = torch.get_rng_state()
    probe = copy.deepcopy(model).train()
    x = torch.randint(0, probe.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    timings = {}
    for n in (cores, 1, cores):  # cores twice: the first round also warms up the allocator
        torch.set_num_threads(n)
        t0 = time.perf_counter()
        for _ in range(steps):
            lm_loss(probe(x), x).backward()
        timings[n] = min(timings.get(n, float("inf")), time.perf_counter() - t0)
    torch.set_rng_state(rng)
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One pretraining run. `Trainer(cfg).fit()`; see `pretrain` for the one-call form."""

    objective = None  # train.objective's object (objectives.py); None = the causal LM

    def __init__(
        self, cfg: TrainConfig, resume: str | bool | None = None, overwrite: bool = False, stop_after: int | None = None
    ):
        self.cfg, self.t = cfg, cfg.train
        self.out_dir = Path(cfg.out_dir)
        self.resume, self.overwrite, self.stop_after = resume, overwrite, stop_after
        t = self.t
        for name in ("batch_size", "seq_len", "grad_accum", "max_iters", "eval_interval", "log_interval"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name}={getattr(t, name)} must be a positive integer")
        if not 0.0 <= t.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing={t.label_smoothing} must be in [0, 1)")
        if hasattr(cfg, "validate"):
            cfg.validate()

    # ------------------------------------------------------------------ set-up
    def _check_out_dir(self) -> dict[str, Any] | None:
        """Load the checkpoint to resume from, or make sure a fresh run overwrites nothing."""
        if self.resume:
            src = self.out_dir if self.resume is True else Path(self.resume)
            if self.resume is True and latest_checkpoint(self.out_dir) is None:
                raise CheckpointError(
                    f"--resume: {str(self.out_dir)!r} has no checkpoint "
                    f"({CKPT_DIR}/latest); run without --resume to start"
                )
            state = load_checkpoint(src)
            if state.get("format") == "dcp":  # the shards sit beside state.pt
                state["path"] = str(checkpoint_folder(src))
            return state
        existing = latest_checkpoint(self.out_dir)
        if existing is not None and not self.overwrite:
            raise CheckpointError(
                f"{str(self.out_dir)!r} already holds a checkpoint ({existing.name}); pass --resume to "
                "continue it, --overwrite to start over, or choose another --out_dir"
            )
        return None

    name = "pretrain"  # the progress bar's label

    def _setup(self) -> None:
        t = self.t
        self.dist = D.setup(t.strategy, t.device, parallel=t.parallel.active())
        info = self.dist
        _set_threads(t.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
        self.state = self._check_out_dir()  # every rank reads it (single node, shared disk)
        if self.state is None and info.is_main and self.overwrite:
            shutil.rmtree(self.out_dir / CKPT_DIR, ignore_errors=True)
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        D.barrier(info)

        self._setup_data()
        # model: every rank initialises identically from `seed`, then gets its own dropout stream
        _seed_all(t.seed)
        raw = self._build_model()
        self.n_params = raw.num_params()
        self.par = None
        if info.strategy == "parallel":  # the mesh, the stages and the shards: parallel.py
            if t.compile or t.dtype == "float16":
                raise ConfigError(
                    "train.parallel layouts run without torch.compile and without float16 loss scaling; "
                    "expected train.compile false and train.dtype auto, float32 or bfloat16"
                )
            self.par = Parallel(raw, t.parallel, info.device, t.batch_size, t.seq_len, lm_loss, t.grad_accum,
                                t.label_smoothing)
            info.dp_rank, info.dp_size = self.par.dp_rank, self.par.layout.dp
            raw = self.par.view  # this rank's modules (a pipeline stage holds only its blocks)
        raw.to(info.device)
        self.raw_model = raw
        if t.num_threads == 0 and info.device.type == "cpu" and info.world_size == 1 and self.objective is None:
            n = autotune_threads(raw, t.batch_size, t.seq_len)
            if info.is_main and t.progress:
                tqdm.write(f"threads: {n} (the faster of 1 and {os.cpu_count()} on this machine right now)")
        self.model: nn.Module = raw if self.par else D.wrap_model(raw, info)
        if t.compile:
            self.model = torch.compile(self.model)
        self.optimizer = self._build_optimizer(raw)
        self.amp_dtype = autocast_dtype(t.dtype, info.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.sampler = self._build_sampler()
        _seed_all(t.seed + info.rank)
        self.step, self.tokens = 0, 0
        self.metrics = MetricsLog(self.out_dir, plot=info.is_main) if info.is_main else None
        if self.state is not None:
            self._restore(self.state)
        elif self.metrics is not None and self.metrics.records:
            self.metrics.truncate(-1)

    def _build_optimizer(self, raw: nn.Module) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (a param group's `lr_scale` multiplies the schedule's lr)."""
        t = self.t
        return build_adamw(raw, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, self.dist.device.type)

    def _setup_data(self) -> None:
        """Token data and tokenizer (rank 0 prepares raw text; the others then open what it wrote)."""
        t, info, d = self.t, self.dist, self.cfg.data
        if info.is_main:
            self.data = resolve_data(
                d.path, self.out_dir, d.tokenizer, d.vocab_size, d.val_fraction, progress=t.progress
            )
        D.barrier(info)
        if not info.is_main:
            self.data = resolve_data(d.path, self.out_dir, d.tokenizer, d.vocab_size, d.val_fraction, progress=False)
        self.tokenizer = load_tokenizer(self.data.tokenizer_dir)

    def _build_model(self) -> nn.Module:
        """The model to train (built after seeding, so every rank builds the same one)."""
        t = self.t
        self.model_config = self.cfg.model_config(self.tokenizer.vocab_size)
        self.objective = get_objective(t.objective, self.tokenizer, t.whole_word_mask, t.nsp)  # None = causal LM
        if self.objective is not None:  # BERT / T5 config built from the model section's sizes
            self.model_config = self.objective.model_config(self.model_config, t.seq_len)
        if self.model_config.block_size < t.seq_len:
            raise ConfigError(
                f"train.seq_len={t.seq_len} exceeds model.block_size={self.model_config.block_size}"
            )
        raw = Transformer(self.model_config) if self.objective is None else self.objective.build(self.model_config)
        if t.qat:  # fake-quantized projections (straight-through estimator); same parameters
            raw.prepare_qat(t.qat, t.qat_group_size)
        raw.check_inputs = False  # token ids were checked once against the vocabulary below
        self._check_tokens(self.data)
        return raw

    def _build_sampler(self):
        t, info = self.t, self.dist
        return RandomWindowSampler(self.data.train, t.seq_len, t.batch_size, t.seed, info.dp_rank, info.dp_size)

    def describe(self) -> str:
        """The line printed before the first step."""
        t, info = self.t, self.dist
        tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * info.dp_size
        return (
            f"model: {self.n_params / 1e6:.2f}M parameters, {self.model_config.model_type}; "
            f"{len(self.data.train):,} train / {len(self.data.val):,} val tokens; "
            f"{tokens_per_step:,} tokens per step; {info.world_size} process(es), {info.strategy}"
            + (f" {self.par.layout}" if self.par else "")
        )

    def _check_tokens(self, data: TokenData) -> None:
        V = self.model_config.vocab_size
        for name, arr in (("train", data.train), ("val", data.val)):
            hi = int(np.max(arr[: 1 << 24])) if len(arr) else 0
            if hi >= V:
                raise ConfigError(
                    f"the {name} tokens go up to id {hi} but model.vocab_size is {V}; "
                    "expected the tokenizer the data was prepared with"
                )

    def _autocast(self):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ checkpoints
    def _model_state(self) -> dict[str, torch.Tensor]:
        if self.dist.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.raw_model, options=opts)
        return {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}

    def _optim_state(self) -> dict[str, Any]:
        if self.dist.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.raw_model, self.optimizer, options=opts)
        return self.optimizer.state_dict()

    def _save(self) -> None:
        """Collective: gather states (FSDP), then rank 0 writes checkpoint + HF folder atomically."""
        info = self.dist
        dcp_dir = None
        if self.par is not None:  # every rank writes its shards (DCP), rank 0 the rest
            dcp_dir = self.out_dir / CKPT_DIR / f".dcp-{self.step:06d}"
            save_dcp(self.par.state_dict(self.optimizer), dcp_dir)
            model_sd, optim_sd = None, None
        else:
            model_sd, optim_sd = self._model_state(), self._optim_state()
        rngs = [rng_state()]
        if info.strategy != "single":  # every rank's RNG streams, gathered as bytes
            buf = io.BytesIO()
            torch.save(rngs[0], buf)
            gathered: list[Any] = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, buf.getvalue())
            rngs = [torch.load(io.BytesIO(b), weights_only=False) for b in gathered]
        if info.is_main:
            state = {
                "step": self.step,
                "tokens": self.tokens,
                "model": model_sd,
                "optimizer": optim_sd,
                "sampler": self.sampler.state_dict(),
                "rng": rngs,
                "world_size": info.world_size,
                "format": "dcp" if dcp_dir else "full",
                "config": self.cfg.to_dict(),
                "model_config": self.model_config.to_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "extra": self.extra_state(),
            }
            if dcp_dir is not None:
                self._export_dcp(dcp_dir)
            if self.t.checkpoint:
                extra = {"dcp": dcp_dir} if dcp_dir else None
                save_checkpoint(self.out_dir, self.step, state, keep=self.t.keep_checkpoints, move_in=extra)
            elif dcp_dir is not None:
                shutil.rmtree(dcp_dir, ignore_errors=True)
            if model_sd is not None:
                self._export(model_sd)
        D.barrier(info)

    def _export_dcp(self, dcp_dir: Path) -> None:
        """Rank 0 turns the distributed checkpoint it just wrote into the Hugging Face folder."""
        model = Transformer(self.model_config)
        load_dcp_model(dcp_dir, model)
        self._export_model(model)

    def _export(self, model_sd: dict[str, torch.Tensor]) -> None:
        """Write the Hugging Face folder (config.json, model.safetensors, tokenizer files) in out_dir."""
        if self.dist.strategy == "fsdp" or self.t.qat:  # a plain copy (FSDP shards; QAT exports it quantized)
            model = Transformer(self.model_config)
            if self.t.qat:
                model.prepare_qat(self.t.qat, self.t.qat_group_size)
            model.load_state_dict(model_sd)
            if self.t.qat:  # the real int8/int4 kinds, on the grid the training saw
                model.quantize(self.t.qat, self.t.qat_group_size, skip=("embeddings",))
        else:
            model = self.raw_model
        self._export_model(model)

    def _export_model(self, model: nn.Module) -> None:
        tmp = self.out_dir / ".export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        self.tokenizer.save(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, self.out_dir / f.name)
        shutil.rmtree(tmp, ignore_errors=True)

    def _load_model_state(self, sd: dict[str, torch.Tensor]) -> None:
        self.raw_model.load_state_dict(sd)

    def _restore(self, state: dict[str, Any]) -> None:
        info = self.dist
        if state.get("format") == "dcp" or self.par is not None:
            return self._restore_dcp(state)
        if state.get("world_size", 1) != info.world_size:
            raise CheckpointError(
                f"the checkpoint was written by {state.get('world_size')} process(es) and this run has "
                f"{info.world_size}; exact resume needs the same number of processes"
            )
        try:
            if info.strategy == "fsdp":
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_model_state_dict,
                    set_optimizer_state_dict,
                )

                opts = StateDictOptions(full_state_dict=True)
                set_model_state_dict(self.raw_model, state["model"], options=opts)
                set_optimizer_state_dict(self.raw_model, self.optimizer, state["optimizer"], options=opts)
            else:
                self._load_model_state(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"the checkpoint does not match this model/optimizer (was the config changed?): {str(e)[:500]}"
            ) from None
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.load_extra_state(state.get("extra") or {})
        set_rng_state(state["rng"][info.rank])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        if self.metrics is not None:
            self.metrics.truncate(self.step)

    def _restore_dcp(self, state: dict[str, Any]) -> None:
        """Resume a distributed checkpoint under this run's layout (any layout: DCP reshards)."""
        if self.par is None or state.get("format") != "dcp":
            raise CheckpointError(
                "a distributed (DCP) checkpoint resumes under train.parallel settings (any layout), and a "
                "full checkpoint under strategy single/ddp/fsdp; expected matching kinds"
            )
        path = Path(state["path"]) / "dcp"
        self.par.load_state_dict(path, self.optimizer)
        self.sampler.load_state_dict(state["sampler"])
        if len(state["rng"]) == self.dist.world_size:  # same layout: every rank's own streams
            set_rng_state(state["rng"][self.dist.rank])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        if self.metrics is not None:
            self.metrics.truncate(self.step)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "val", full: bool = False) -> float:
        """Mean next-token loss over the whole split (or `eval_iters` batches of it unless `full`)."""
        t, info = self.t, self.dist
        tokens = self.data.val if split == "val" else self.data.train
        sample = t.eval_iters is not None and not full  # eval_iters batches of batch_size, as nanoGPT
        bs = t.batch_size if sample else 4 * t.batch_size
        if self.par is not None and self.par.schedule is not None:
            bs = t.batch_size  # pipeline stages run fixed micro-batch shapes
        max_windows = t.eval_iters * bs * info.dp_size if sample else None
        mine, per_rank = eval_starts(len(tokens), t.seq_len, max_windows, info.dp_rank, info.dp_size)
        if per_rank == 0:
            return float("nan")
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        eval_gen = torch.Generator().manual_seed(t.seed)
        for b in range(0, per_rank, bs):
            chunk = mine[b : b + bs]
            x, y = windows(tokens, chunk or [0], t.seq_len)  # [B, T]; [0] keeps FSDP ranks in step
            x, y = x.to(info.device), y.to(info.device)
            if self.par is not None:
                with self._autocast():
                    s, n = self.par.eval_sums(x, y)
                if chunk:
                    total += torch.tensor([s, n], dtype=torch.float64)
                continue
            if self.objective is not None:  # the same corruption every eval: a fixed generator
                with self._autocast():
                    s, n = objective_loss(self.objective, self.model, x, eval_gen, reduction="sum")
                if chunk:
                    total += torch.tensor([float(s), n], dtype=torch.float64)
                continue
            with self._autocast():
                logits = self.model(x)
            if chunk:
                total[0] += lm_loss(logits, y, reduction="sum").double().cpu()
                total[1] += y.numel()
        self.model.train()
        total = D.all_reduce_sum(total, info)
        return float(total[0] / total[1])

    def extra_state(self) -> dict[str, Any]:
        """More state for exact resume (subclasses: an adaptive KL coefficient, ...)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def extra_metrics(self) -> dict[str, Any]:
        """More fields for the eval record (subclasses: DPO rewards, reward-model accuracy, ...)."""
        return {}

    # ------------------------------------------------------------------ training
    def lr_at(self, step: int, elapsed: float) -> float:
        t = self.t
        if t.max_minutes:
            frac = max(step / t.max_iters, elapsed / (60.0 * t.max_minutes))
            return cosine_lr_fraction(frac, step, t.lr, t.min_lr, t.warmup_iters)
        return cosine_lr(step, t.lr, t.min_lr, t.warmup_iters, t.lr_decay_iters or t.max_iters)

    def batch_loss(self, batch) -> torch.Tensor:
        """Mean next-token loss of one micro-batch (x, y windows); adds its tokens (the global
        batch's) to `step_tokens`."""
        x, y = (b.to(self.dist.device, non_blocking=True) for b in batch)
        self.step_tokens += y.numel() * self.dist.dp_size
        if self.objective is not None:  # mlm / span: corrupt x, loss on the labels it makes
            return objective_loss(self.objective, self.model, x)[0]
        return lm_loss(self.model(x), y, self.t.label_smoothing)  # logits [B, T, V]

    def train_step(self) -> torch.Tensor:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss (detached)."""
        t, info, model = self.t, self.dist, self.model
        self.step_tokens = 0
        if self.par is not None:
            self.step_tokens = t.batch_size * t.seq_len * t.grad_accum * info.dp_size
            return self._parallel_step()
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(t.grad_accum):
            batch = self.sampler.next_batch()
            with D.no_grad_sync(model, info, sync=micro == t.grad_accum - 1), self._autocast():
                loss = self.batch_loss(batch)
                if self.model_config.n_expert > 0:
                    loss = loss + self.model_config.router_aux_loss_coef * self.raw_model.aux_loss
                scaled = loss / t.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach()
        self.optimizer_step()
        return loss_sum / t.grad_accum

    def optimizer_step(self) -> None:
        """Unscale (fp16), clip the gradient norm, step the optimizer, zero the gradients."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.t.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _parallel_step(self) -> torch.Tensor:
        """`train_step` under a DeviceMesh: the pipeline schedule or the TP/FSDP forward-backward."""
        t, par = self.t, self.par
        loss_sum = torch.zeros((), device=self.dist.device)
        for micro in range(t.grad_accum):
            x, y = self.sampler.next_batch()
            x, y = x.to(self.dist.device), y.to(self.dist.device)
            with self._autocast():
                loss_sum += par.forward_backward(x, y, last_micro=micro == t.grad_accum - 1)
        if t.grad_clip > 0:
            par.clip_grad_norm_(t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / t.grad_accum

    def fit(self) -> TrainResult:
        """Train to `max_iters` (or the time budget), evaluating and checkpointing on the way."""
        wall0 = time.perf_counter()
        self._setup()
        t, info = self.t, self.dist
        start = self.step
        bar = tqdm(
            total=t.max_iters,
            initial=start,
            desc=self.name,
            unit="step",
            dynamic_ncols=True,
            disable=not (t.progress and info.is_main),
            smoothing=0.1,
        )
        if info.is_main and start == 0:
            tqdm.write(self.describe())
        run_loss = torch.zeros((), dtype=torch.float64, device=info.device)  # no host sync per step
        run_steps, seg_tokens, seg_time = 0, 0, 0.0
        train_time, val_loss = 0.0, None
        t_budget0 = time.perf_counter()
        last_bar_loss = None
        while self.step < t.max_iters:
            elapsed = time.perf_counter() - t_budget0
            if t.max_minutes and elapsed >= 60.0 * t.max_minutes:
                break
            lr = self.lr_at(self.step, elapsed)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            t0 = time.perf_counter()
            loss = self.train_step()
            self.step += 1
            self.tokens += self.step_tokens
            run_loss += loss.double()
            run_steps += 1
            dt = time.perf_counter() - t0
            seg_time, seg_tokens, train_time = seg_time + dt, seg_tokens + self.step_tokens, train_time + dt
            if self.step % t.log_interval == 0 or self.step == t.max_iters:
                last_bar_loss = float(loss)
                if t.max_minutes and self.step > 5:  # a time budget: estimate the final step for the ETA
                    est = int(self.step / max(1e-9, time.perf_counter() - t_budget0) * 60.0 * t.max_minutes)
                    bar.total = max(self.step, min(t.max_iters, est))
                bar.set_postfix(
                    loss=f"{last_bar_loss:.4f}",
                    lr=f"{lr:.2e}",
                    tok_s=f"{seg_tokens / max(seg_time, 1e-9):,.0f}",
                    refresh=False,
                )
            bar.update(1)
            last = self.step >= t.max_iters or (self.stop_after is not None and self.step >= self.stop_after)
            budget_done = t.max_minutes and time.perf_counter() - t_budget0 >= 60.0 * t.max_minutes
            if self.step % t.eval_interval == 0 or last or budget_done:
                final = self.step >= t.max_iters or bool(budget_done)
                val_loss = self.evaluate("val", full=final)  # the final eval covers all of val
                train_loss = float(D.all_reduce_sum(run_loss.clone(), info)) / (run_steps * info.world_size)
                record = {
                    "step": self.step,
                    "tokens": self.tokens,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_ppl": math.exp(min(val_loss, 50.0)),
                    "lr": lr,
                    "tokens_per_sec": seg_tokens / max(seg_time, 1e-9),  # seg_tokens counts the global batch
                }
                record.update(self.extra_metrics())
                if self.metrics is not None:
                    self.metrics.log(record)
                    bar.write(
                        f"step {self.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f} "
                        f"(ppl {record['val_ppl']:.2f}), {record['tokens_per_sec']:,.0f} tok/s"
                    )
                run_loss.zero_()
                run_steps, seg_tokens, seg_time = 0, 0, 0.0
                self._save()
            if self.stop_after is not None and self.step >= self.stop_after:
                break
        bar.close()
        if val_loss is None and self.step > start:  # stopped by the time budget right after an eval
            val_loss = self.evaluate("val", full=True)
        result = TrainResult(
            self.out_dir,
            self.step,
            val_loss,
            list(self.metrics.records) if self.metrics else [],
            time.perf_counter() - wall0,
            train_time,
            self.tokens,
        )
        D.teardown(info)
        return result


def pretrain(
    cfg: TrainConfig, resume: str | bool | None = None, overwrite: bool = False, stop_after: int | None = None
) -> TrainResult:
    """Pretrain a causal LM as `cfg` says; the out_dir becomes a Hugging Face model folder.

    `resume=True` continues from out_dir's latest checkpoint (or pass a checkpoint path);
    `stop_after=k` stops after step k as if interrupted (checkpoint written at k).
    """
    return Trainer(cfg, resume=resume, overwrite=overwrite, stop_after=stop_after).fit()
