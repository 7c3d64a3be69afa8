"""Supervised fine-tuning: the pretraining `Trainer` with SFT data, a base model and a method.

Methods: `full` (every weight; writes a model folder), `freeze` (only the parameters named by
`trainable` globs, or all but the bottom `freeze_layers` blocks), `lora` (low-rank adapters on the
chosen projections; writes a PEFT LoRA folder) and `prompt-tuning` (N virtual-token embeddings;
writes a PEFT prompt-tuning folder). The loop, schedule, optimizer, checkpoints with exact
resume, metrics.jsonl and loss.png are the pretraining trainer's.

Data: chat / instruction JSONL (loss on the assistant tokens), or plain text (`data_format="text"`:
one text file, folder of text files or `llmkit data prepare` folder; continued pretraining, the
causal loss on every token of random windows, exactly the pretraining trainer's data path).
"""

from __future__ import annotations

import fnmatch
import functools
import math
import os
import resource
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from llmkit.data.sft import SFTBatches, collate, load_sft_data
from llmkit.errors import CheckpointError, ConfigError
from llmkit.model.adapters import save_lora, save_prompt_tuning
from llmkit.model.attention import AttnMeta
from llmkit.model.hf import config_from_hf, load_model, read_config
from llmkit.model.linear import PackedLinear, set_decode_packing
from llmkit.model.lora import LoRAConfig, add_lora
from llmkit.model.prompt_tuning import PromptTuningModel
from llmkit.model.prune import keep_zeros, zero_masks
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import load_tokenizer
from llmkit.train import distributed as D
from llmkit.train.config import DataConfig, OptimConfig, TrainConfig
from llmkit.train.linear_ce import linear_cross_entropy
from llmkit.train.trainer import Trainer, TrainResult, lm_loss

METHODS = ("full", "lora", "prompt-tuning", "freeze")
SEQ2SEQ_METHODS = ("full", "freeze")  # what an encoder-decoder (T5) base supports
DATA_FORMATS = ("auto", "sft", "text")  # auto: one folder or a non-.jsonl/.json file is text
DEFAULT_LR = {"full": 1e-4, "freeze": 1e-4, "lora": 1e-3, "prompt-tuning": 3e-2}


@dataclass
class FinetuneConfig:
    """What `llmkit finetune` does besides the optimisation settings (those are an OptimConfig)."""

    model: str = ""  # base model folder
    data: list[str] = field(default_factory=list)  # train JSONL file(s)
    val_data: list[str] = field(default_factory=list)
    val_fraction: float = 0.0  # held out from `data` when no val_data; 0 = evaluate on the train set
    method: str = "lora"
    max_seq_len: int | None = None  # None: the model's context, at most 1024
    packing: bool = False
    train_on_prompt: bool = False
    epochs: float | None = None  # default 1 when max_steps is not given either
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    use_rslora: bool = False
    loraplus_lr_ratio: float = 1.0  # LoRA+ (Hayou et al., 2024): B's learning rate = ratio x A's
    num_virtual_tokens: int = 20
    prompt_tuning_init_text: str | None = None
    trainable: list[str] = field(default_factory=list)
    freeze_layers: int | None = None
    activation_checkpointing: bool = False
    qat: str | None = None  # int8 | int4: fake-quantized training (STE); full/freeze export the quantized model
    qat_group_size: int = 64  # inputs per scale (0 = per channel, int8 only)
    quantize: str | None = None  # int8 | int4: LoRA on the base quantized on load and frozen (QLoRA)
    data_format: str = "auto"  # sft (JSONL) | text (continued pretraining on plain text) | auto
    keep_zeros: bool = False  # zero block weights stay zero (recovery of an unstructured-pruned model)

    def is_text(self) -> bool:
        """Plain-text continued pretraining (not SFT JSONL)?"""
        if self.data_format != "auto":
            return self.data_format == "text"
        p = Path(self.data[0]) if len(self.data) == 1 else None
        return p is not None and (p.is_dir() or p.suffix.lower() not in (".jsonl", ".json"))

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}; expected one of {', '.join(METHODS)}")
        if not self.model:
            raise ConfigError("no base model given; expected --model FOLDER (a model folder llmkit loads)")
        if not self.data:
            raise ConfigError("no training data given; expected --data train.jsonl")
        if self.method == "freeze" and not self.trainable and self.freeze_layers is None:
            raise ConfigError("--method freeze needs --trainable GLOB ... or --freeze-layers N")
        if self.method == "prompt-tuning" and self.packing:
            raise ConfigError("--packing is not supported with --method prompt-tuning (each example needs the prompt)")
        if self.qat is not None:
            if self.qat not in ("int8", "int4"):
                raise ConfigError(f"--qat {self.qat!r}: expected int8 or int4")
            if self.method not in ("full", "freeze"):
                raise ConfigError(f"--qat trains the model's own weights: use it with --method full or freeze, "
                                  f"not {self.method}")
        if self.quantize is not None:
            if self.quantize not in ("int8", "int4"):
                raise ConfigError(f"--quantize {self.quantize!r}: expected int8 or int4")
            if self.method != "lora":
                raise ConfigError(f"--quantize (a frozen quantized base) needs --method lora, not {self.method}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ConfigError(f"--max-seq-len={self.max_seq_len} must be at least 2")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction={self.val_fraction} must be in [0, 1)")
        if self.data_format not in DATA_FORMATS:
            raise ConfigError(f"--data-format {self.data_format!r}: expected one of {', '.join(DATA_FORMATS)}")


def split_val(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded random `fraction` held out; with 0, the train items serve as both."""
    if fraction <= 0:
        return items, items
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(items) * fraction))
    return [items[i] for i in sorted(order[n_val:])], [items[i] for i in order[:n_val]]


def lora_config(ft: FinetuneConfig):
    return LoRAConfig(r=ft.lora_r, alpha=ft.lora_alpha, dropout=ft.lora_dropout, targets=ft.lora_targets,
                      use_rslora=ft.use_rslora)


def apply_method(model: nn.Module, ft: FinetuneConfig, tokenizer: Any = None) -> nn.Module:
    """Make `model` trainable as `ft.method` says (adapters added, the rest frozen); returns the model to train."""
    if ft.method == "full":
        return model.requires_grad_(True)
    model.requires_grad_(False)
    if ft.method in ("lora", "prompt-tuning"):  # the whole base is frozen: its dense projections take the
        set_decode_packing(model)  # CPU-kernel Linear kind (oneDNN forward and input gradient, model/linear.py)
    if ft.method == "lora":
        add_lora(model, lora_config(ft))
        for n, p in model.named_parameters():
            p.requires_grad_(".adapters." in n)
        return model
    if ft.method == "prompt-tuning":
        pt = PromptTuningModel(model, ft.num_virtual_tokens)
        if ft.prompt_tuning_init_text:
            pt.init_from_text(tokenizer.encode(ft.prompt_tuning_init_text, add_special_tokens=False))
        else:  # random rows of the vocabulary (embedding-scale values; N(0, 1) swamps a small model)
            ids = torch.randint(0, model.config.vocab_size, (ft.num_virtual_tokens,))
            pt.init_from_text(ids.tolist())
        pt.prompt.requires_grad_(True)
        return pt
    names = [n for n, _ in model.named_parameters()]
    if ft.trainable:
        chosen = {n for n in names if any(fnmatch.fnmatchcase(n, g) for g in ft.trainable)}
        if not chosen:
            raise ConfigError(f"--trainable {' '.join(ft.trainable)} matches no parameter; names look like "
                              f"{', '.join(names[:4])} ...")
    else:
        k = ft.freeze_layers
        if not 0 <= k <= model.config.n_layer:
            raise ConfigError(f"--freeze-layers {k} must be between 0 and n_layer={model.config.n_layer}")
        frozen = ("wte.", "wpe.") + tuple(f"blocks.{i}." for i in range(k))
        chosen = {n for n in names if not n.startswith(frozen)}
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("no parameter is left trainable; freeze fewer layers")
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    blocks = model.blocks
    for blk in blocks:
        inner = blk.forward
        blk.forward = functools.partial(checkpoint, inner, use_reentrant=False)


class Finetuner(Trainer):
    """One fine-tuning run (`finetune` is the one-call form)."""

    name = "finetune"
    text = False  # plain-text continued pretraining (set from the config in _setup_data)
    masks: dict = {}  # keep_zeros: {parameter: W != 0}

    def __init__(self, ft: FinetuneConfig, opt: OptimConfig, out_dir: str, resume: str | bool | None = None,
                 overwrite: bool = False, stop_after: int | None = None, max_steps: int | None = None,
                 eval_interval: int | None = None, warmup_steps: int | None = None) -> None:
        """`max_steps`, `eval_interval`, `warmup_steps` left None are derived from the data size."""
        ft.check()
        if opt.strategy == "fsdp":
            raise ConfigError("finetune runs single-process or DDP (torchrun); FSDP is for pretraining")
        self.ft = ft
        self.t_max_steps, self.t_eval_interval, self.t_warmup = max_steps, eval_interval, warmup_steps
        cfg = TrainConfig(model={"preset": None}, train=opt, out_dir=str(out_dir))
        super().__init__(cfg, resume=resume, overwrite=overwrite, stop_after=stop_after)

    # ------------------------------------------------------------------ set-up
    def _setup_data(self) -> None:

        ft, t = self.ft, self.t
        hf_cfg = read_config(ft.model)  # also: a clear error for a missing model
        ctx = config_from_hf(hf_cfg).block_size
        # encoder-decoder (T5): prompt -> encoder, completion + EOS -> decoder targets (`Seq2SeqExample`)
        self.seq2seq = bool(hf_cfg.get("is_encoder_decoder"))
        if self.seq2seq and (ft.method not in SEQ2SEQ_METHODS or ft.packing or ft.qat or ft.quantize
                             or ft.freeze_layers is not None or ft.activation_checkpointing):
            raise ConfigError(f"{ft.model} is an encoder-decoder: finetune supports --method full, or freeze with "
                              "--trainable GLOB, for it (no --packing, --qat, --quantize, --freeze-layers or "
                              "--activation-checkpointing)")
        if ft.max_seq_len is None:
            ft.max_seq_len = min(1024, ctx - (ft.num_virtual_tokens if ft.method == "prompt-tuning" else 0))
        self.text = ft.is_text()  # subclasses (preference, RL) read their own data: text stays False
        if self.text:
            return self._setup_text()
        self.tokenizer = load_tokenizer(ft.model)
        train = load_sft_data(ft.data, self.tokenizer, ft.max_seq_len, ft.train_on_prompt, self.seq2seq)
        self.truncated, self.dropped = train.truncated, train.dropped
        examples = train.examples
        if ft.val_data:
            val = load_sft_data(ft.val_data, self.tokenizer, ft.max_seq_len, ft.train_on_prompt, self.seq2seq)
            self.val_examples = val.examples
            self.truncated, self.dropped = self.truncated + val.truncated, self.dropped + val.dropped
        else:
            examples, self.val_examples = split_val(examples, ft.val_fraction, t.seed)
        self.train_examples = examples
        t.seq_len = ft.max_seq_len
        self.pad_id = self.tokenizer.pad_token_id or 0

    def _build_sampler(self):
        t, info, ft = self.t, self.dist, self.ft
        if self.text:
            return super()._build_sampler()
        return SFTBatches(self.train_examples, t.batch_size, ft.max_seq_len, ft.packing, t.seed, self.pad_id,
                          info.rank, info.world_size)

    def _build_model(self) -> nn.Module:
        ft = self.ft
        base = self._load_base()
        if base.config.model_type == "bert":
            raise ConfigError(f"{ft.model} is an encoder (bert); finetune trains causal language models")
        self.model_config = base.config
        V = base.config.vocab_size
        hi = self._max_token_id()
        if hi >= V:
            raise ConfigError(f"the tokenized data uses id {hi} but the model's vocabulary has {V} entries; "
                              "expected the tokenizer saved with the base model")
        if ft.max_seq_len + (ft.num_virtual_tokens if ft.method == "prompt-tuning" else 0) > base.config.block_size:
            raise ConfigError(f"--max-seq-len {ft.max_seq_len} exceeds the model's context of "
                              f"{base.config.block_size} tokens")
        if ft.qat:  # fake-quantized projections (straight-through estimator); the same parameters
            base.prepare_qat(ft.qat, ft.qat_group_size)
        model = apply_method(base, ft, self.tokenizer)
        self.masks = zero_masks(base) if ft.keep_zeros else {}
        getattr(model, "model", model).check_inputs = False  # ids were checked above
        if ft.activation_checkpointing:
            enable_activation_checkpointing(model)
        # the schedule needs the run length, known once the data is batched
        t = self.t
        if self.t_max_steps is None:
            per_epoch = -(-self._batches_per_epoch() // t.grad_accum)
            t.max_iters = max(1, math.ceil((ft.epochs or 1.0) * per_epoch))
        if self.t_eval_interval is None:
            t.eval_interval = max(1, t.max_iters // 10)
        if self.t_warmup is None:
            t.warmup_iters = max(1, t.max_iters // 20)
        return model.train()

    def _load_base(self) -> nn.Module:

        return load_model(self.ft.model, quantize=self.ft.quantize)

    def _max_token_id(self) -> int:
        if self.text:
            return max(int(np.max(a[: 1 << 24])) if len(a) else 0 for a in (self.data.train, self.data.val))
        return max(max(e.input_ids + e.labels) for e in self.train_examples + self.val_examples)

    def _batches_per_epoch(self) -> int:
        t, ft = self.t, self.ft
        if self.text:
            return max(1, len(self.data.train) // (t.batch_size * t.seq_len * self.dist.world_size))
        return SFTBatches(self.train_examples, t.batch_size, ft.max_seq_len, ft.packing, t.seed, self.pad_id,
                          0, self.dist.world_size).batches_per_epoch()

    def describe(self) -> str:
        total = sum(p.numel() for p in self.raw_model.parameters())
        trainable = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        if self.text:
            return (f"{self.ft.method} on text: {trainable:,} trainable of {total:,} parameters; "
                    f"{len(self.data.train):,} train / {len(self.data.val):,} val tokens in {self.t.seq_len}-token "
                    f"windows; {self.t.max_iters} steps" + (", pruned zeros kept" if self.masks else ""))
        n_train = sum(len(e.input_ids) for e in self.train_examples)
        msg = (f"{self.ft.method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
               f"{len(self.train_examples):,} train / {len(self.val_examples):,} val examples ({n_train:,} tokens)"
               f"; {self.t.max_iters} steps")
        if self.truncated:
            msg += f"\n{self.truncated} example(s) longer than --max-seq-len {self.ft.max_seq_len} were truncated"
        if self.dropped:
            msg += f"; {self.dropped} dropped (no assistant token left after truncation)"
        return msg

    def _build_optimizer(self, raw: nn.Module) -> torch.optim.Optimizer:
        opt = super()._build_optimizer(raw)
        ratio = self.ft.loraplus_lr_ratio
        if self.ft.method != "lora" or ratio == 1.0:
            return opt
        b_ids = {id(p) for n, p in raw.named_parameters() if ".lora_B." in n}
        groups = []
        for g in opt.param_groups:  # split each group into A (and others) and B (lr x ratio)
            rest = [p for p in g["params"] if id(p) not in b_ids]
            bs = [p for p in g["params"] if id(p) in b_ids]
            groups += [{**g, "params": rest}, {**g, "params": bs, "lr_scale": ratio}]
        opt.param_groups[:] = [g for g in groups if g["params"]]  # before any step: no state to move
        return opt

    # ------------------------------------------------------------------ loss
    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss over the trained (assistant) tokens of one micro-batch."""
        if self.text:  # (x, y) windows: every token
            return super().batch_loss(batch)
        dev = self.dist.device
        b = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        y = b.pop("targets")
        self.step_tokens += int((b["input_ids"] != self.pad_id).sum()) * self.dist.world_size
        return sft_loss(self.model, b, y, self.t.label_smoothing)

    @torch.no_grad()
    def evaluate(self, split: str = "val", full: bool = False) -> float:
        """Mean loss per trained token over every validation example (padding never counts)."""
        if self.text:  # periodic: eval_iters batches of windows; final: the whole split
            return super().evaluate(split, full)
        examples = self.val_examples if split == "val" else self.train_examples
        mine = examples[self.dist.rank :: self.dist.world_size]
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        bs = 2 * self.t.batch_size
        for i in range(0, len(mine), bs):
            b = collate(mine[i : i + bs], self.pad_id)
            y = b.pop("targets").to(self.dist.device)
            with self._autocast():
                logits = sft_forward(self.model, {k: v.to(self.dist.device) for k, v in b.items()}, y)
            total[0] += lm_loss(logits, y, reduction="sum").double().cpu()
            total[1] += int((y != -100).sum())
        self.model.train()
        total = D.all_reduce_sum(total, self.dist)
        return float(total[0] / max(total[1], 1))

    def train_step(self) -> torch.Tensor:
        loss = super().train_step()
        keep_zeros(self.raw_model, self.masks)  # pruned weights stay pruned (no-op without masks)
        return loss

    # ------------------------------------------------------------------ plain text
    def _setup_text(self) -> None:
        """Continued pretraining data: the pretraining trainer's token splits of one text path,
        tokenized with the base model's tokenizer (a prepared folder is used as it is)."""
        ft, t = self.ft, self.t
        if len(ft.data) != 1:
            raise ConfigError(f"--data-format text takes one text file, folder or prepared data folder, "
                              f"got {len(ft.data)} paths")
        if ft.val_data or ft.packing:
            raise ConfigError("--val-data and --packing are for JSONL; plain text is cut into full windows "
                              "and its last --val-fraction (default 0.1; a prepared folder: its val split) "
                              "is held out")
        self.cfg.data = DataConfig(path=ft.data[0], tokenizer=ft.model, val_fraction=ft.val_fraction or 0.1)
        super()._setup_data()
        self.tokenizer = load_tokenizer(ft.model)  # what the out folder gets
        self.train_examples, self.val_examples, self.truncated, self.dropped = [], [], 0, 0
        t.seq_len = ft.max_seq_len
        t.eval_iters = t.eval_iters or 20
        self.pad_id = self.tokenizer.pad_token_id or 0

    # ------------------------------------------------------------------ checkpoints
    def _model_state(self) -> dict[str, torch.Tensor]:
        """Only what training changes; the frozen base is reloaded from --model on resume."""
        return {n: p.detach().cpu().clone() for n, p in self.raw_model.named_parameters() if p.requires_grad}

    def _load_model_state(self, sd: dict[str, torch.Tensor]) -> None:
        mine = {n for n, p in self.raw_model.named_parameters() if p.requires_grad}
        if set(sd) != mine:
            raise CheckpointError(f"the checkpoint's trainable tensors differ from this run's "
                                  f"({len(sd)} vs {len(mine)}); was --method or a LoRA setting changed?")
        self.raw_model.load_state_dict(sd, strict=False)

    def _export(self, model_sd: dict[str, torch.Tensor]) -> None:
        ft = self.ft
        if ft.method in ("full", "freeze"):
            if not ft.qat:
                return super()._export(model_sd)
            model = Transformer(self.model_config).prepare_qat(ft.qat, ft.qat_group_size)
            model.load_state_dict(self.raw_model.state_dict())
            # the real int8/int4 kinds, on the grid the training saw
            return self._export_model(model.quantize(ft.qat, ft.qat_group_size, skip=("embeddings",)))
        base = str(Path(ft.model).resolve())
        if ft.method == "lora":
            self._export_with(lambda tmp: save_lora(self.raw_model, tmp, lora_config(ft), base_model_name_or_path=base))
        else:
            self._export_with(lambda tmp: save_prompt_tuning(self.raw_model, tmp, ft.prompt_tuning_init_text,
                                                             base_model_name_or_path=base))

    def _export_with(self, save: Callable[[Path], None]) -> None:
        """`save(tmp)` writes a folder beside the run's files; with the tokenizer, its files then move into out."""
        tmp = self.out_dir / ".export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save(tmp)
        self.tokenizer.save(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, self.out_dir / f.name)
        shutil.rmtree(tmp, ignore_errors=True)

    def fit(self) -> TrainResult:
        result = super().fit()
        result.peak_memory = peak_memory_bytes(self.dist.device)
        result.trainable_params = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        result.total_params = sum(p.numel() for p in self.raw_model.parameters())
        result.truncated = self.truncated
        return result


def sft_forward(
    model: nn.Module, batch: dict[str, torch.Tensor], targets: torch.Tensor | None = None, **kw: Any
) -> torch.Tensor:
    """Logits [B, T, V] of a collated SFT batch; a packed one (segment_ids) attends within each example.
    An encoder-decoder batch (attention_mask) runs the decoder on `targets` shifted right (teacher forcing).
    `kw` go to the model (e.g. `return_hidden=True`)."""
    if "attention_mask" in batch:
        raw = getattr(model, "module", model)  # DDP
        return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=raw.shift_right(targets), **kw)
    if "segment_ids" not in batch:
        return model(batch["input_ids"], **kw)
    pos, seg = batch["position_ids"], batch["segment_ids"]
    meta = AttnMeta(pos, pos.shape[1], segment_ids=seg)
    return model(batch["input_ids"], position_ids=pos, attn_meta=meta, **kw)


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor], targets: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the trained tokens (targets != -100) of a collated SFT batch. With a frozen
    dense LM head (LoRA, freeze) the head and the loss run fused and chunked (train/linear_ce.py): the
    [B, T, vocab] logits are never materialised."""
    raw = getattr(model, "module", model)  # DDP
    head = getattr(raw, "lm_head", None)
    if (isinstance(raw, Transformer) and raw.config.final_softcap is None and type(head) in (nn.Linear, PackedLinear)
            and not head.weight.requires_grad and head.bias is None):
        return linear_cross_entropy(sft_forward(model, batch, return_hidden=True), head.weight, targets,
                                    label_smoothing)
    return lm_loss(sft_forward(model, batch, targets), targets, label_smoothing)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this run: CUDA's max allocated, else the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def report(r: TrainResult) -> str:
    """The closing line of a fine-tuning run."""
    val = f"val loss {r.val_loss:.4f}, " if r.val_loss is not None else ""
    return (f"done: step {r.step}, {val}{r.trainable_params:,} trainable / {r.total_params:,} total parameters, "
            f"peak memory {r.peak_memory / 2**20:,.0f} MiB, {r.truncated} truncated example(s), "
            f"{r.wall_time:.1f} s wall; saved to {r.out_dir}")


def finetune(
    model: str,
    data: str | list[str],
    out: str,
    method: str = "lora",
    val_data: str | list[str] | None = None,
    max_steps: int | None = None,
    epochs: float | None = None,
    lr: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    resume: str | bool | None = None,
    overwrite: bool = False,
    stop_after: int | None = None,
    eval_interval: int | None = None,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    seed: int = 1337,
    device: str = "auto",
    dtype: str = "auto",
    num_threads: int | None = None,
    progress: bool = True,
    max_minutes: float | None = None,
    **options: Any,
) -> TrainResult:
    """Fine-tune base `model` on SFT JSONL `data` (or plain text: `data_format="text"`, auto-detected for
    one folder or non-JSONL file; `keep_zeros=True` keeps pruned zeros at zero); `out` becomes a model
    folder (full, freeze) or a PEFT adapter folder (lora, prompt-tuning). `options` are FinetuneConfig
    fields (max_seq_len, packing, lora_r, lora_alpha, lora_dropout, lora_targets, num_virtual_tokens,
    trainable, freeze_layers, data_format, keep_zeros, ...).

    `max_minutes` is a time budget: training stops (the schedule finished) once it is spent.
    `resume=True` continues exactly from out's latest checkpoint; `stop_after=k` stops after step k
    as if killed (the checkpoint at k written).
    """
    names = set(FinetuneConfig.__dataclass_fields__)
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"unknown finetune option(s) {', '.join(unknown)}; expected some of "
                          f"{', '.join(sorted(names))}")

    def as_list(v: Any) -> list[str]:
        return [] if v is None else [str(v)] if isinstance(v, str | os.PathLike) else [str(x) for x in v]
    ft = FinetuneConfig(model=str(model), data=as_list(data), val_data=as_list(val_data), method=method,
                        epochs=epochs, **options)
    if max_steps is not None and epochs is not None:
        raise ConfigError("give --max-steps or --epochs, not both")
    rate = lr if lr is not None else DEFAULT_LR.get(method, 1e-4)
    opt = OptimConfig(batch_size=batch_size, grad_accum=grad_accum, max_iters=max_steps or 1, lr=rate,
                      min_lr=rate / 10, warmup_iters=warmup_steps or 0, weight_decay=weight_decay,
                      eval_interval=eval_interval or 1, seed=seed, device=device, dtype=dtype,
                      num_threads=num_threads, progress=progress, strategy="auto", beta2=0.999,
                      max_minutes=max_minutes)
    return Finetuner(ft, opt, out, resume=resume, overwrite=overwrite, stop_after=stop_after, max_steps=max_steps,
                     eval_interval=eval_interval, warmup_steps=warmup_steps).fit()



