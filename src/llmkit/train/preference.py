"""Training on preference pairs: the reward model (Bradley-Terry) and DPO / IPO / hinge.

Both are the fine-tuning trainer with pairs instead of SFT examples: the same data rendering and
masking, `--method full|lora`, schedule, checkpoints with exact resume, metrics.jsonl and loss.png.
DPO's reference is the frozen starting model: under LoRA the same weights with the adapters off
(no second copy), else a frozen copy; `precompute_ref` computes its log-probs once up front instead.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from llmkit.data.prefs import PrefPair
from llmkit.data.sft import SFTBatches, collate
from llmkit.errors import ConfigError
from llmkit.train.align_losses import DPO_LOSSES, bradley_terry_loss, dpo_loss, token_logps
from llmkit.train.config import OptimConfig
from llmkit.train.finetune import DEFAULT_LR, FinetuneConfig, Finetuner
from llmkit.train.trainer import TrainResult

DPO_PANELS = [
    ("reward margin", ["rewards/margins", "eval_rewards/margins"]),
    ("reward accuracy", ["rewards/accuracies", "eval_rewards/accuracies"]),
    ("implicit rewards", ["rewards/chosen", "rewards/rejected"]),
]


class ListBatches(SFTBatches):
    """`SFTBatches` over any items (pairs, prompts): shuffled, resumable, a list of items per batch."""

    def next_batch(self) -> list[Any]:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        units = self._batches[self.index]
        self.index += 1
        return [u[0] for u in (units[self.rank :: self.world_size] or units[:1])]


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Run a LoRA model as its base (the reference policy); the active adapter comes back after."""
    from llmkit.model.lora import lora_modules

    mods = list(lora_modules(model).values())
    saved = [m.active for m in mods]
    for m in mods:
        m.active = None
    try:
        yield model
    finally:
        for m, a in zip(mods, saved):
            m.active = a


@dataclass
class PrefConfig(FinetuneConfig):
    """Fine-tuning settings plus the preference objective's."""

    beta: float = 0.1
    loss_type: str = "sigmoid"  # DPO: sigmoid | ipo | hinge
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only)
    precompute_ref: bool = False

    def check(self) -> None:
        super().check()
        if self.method not in ("full", "lora"):
            raise ConfigError(f"--method {self.method} is not supported here; expected full or lora")
        if self.loss_type not in DPO_LOSSES:
            raise ConfigError(f"unknown --loss {self.loss_type!r}; expected one of {', '.join(DPO_LOSSES)}")
        if not self.beta > 0:
            raise ConfigError(f"--beta={self.beta} must be positive")


class PairTrainer(Finetuner):
    """What the reward model and DPO share: pair data, the pair sampler, pair-aware token checks."""

    ft: PrefConfig

    def _setup_data(self) -> None:
        from llmkit.data.prefs import load_prefs
        from llmkit.model.hf import config_from_hf, read_config
        from llmkit.tokenizer import load_tokenizer

        ft, t = self.ft, self.t
        ctx = config_from_hf(read_config(ft.model)).block_size
        if ft.max_seq_len is None:
            ft.max_seq_len = min(1024, ctx)
        self.tokenizer = load_tokenizer(ft.model)
        pairs, self.truncated = load_prefs(ft.data, self.tokenizer, ft.max_seq_len)
        self.dropped = 0
        if ft.val_data:
            val, n = load_prefs(ft.val_data, self.tokenizer, ft.max_seq_len)
            self.truncated += n
            for p in val:
                p.index += len(pairs)
        elif ft.val_fraction > 0:
            g = torch.Generator().manual_seed(t.seed)
            order = torch.randperm(len(pairs), generator=g).tolist()
            n_val = max(1, round(len(pairs) * ft.val_fraction))
            val = [pairs[i] for i in order[:n_val]]
            pairs = [pairs[i] for i in sorted(order[n_val:])]
        else:
            val = pairs
        self.train_examples, self.val_examples = pairs, val
        t.seq_len = ft.max_seq_len
        self.pad_id = self.tokenizer.pad_token_id or 0

    def _max_token_id(self) -> int:
        return max(max(max(p.chosen.input_ids), max(p.rejected.input_ids))
                   for p in self.train_examples + self.val_examples)

    def _build_sampler(self):
        t, info, ft = self.t, self.dist, self.ft
        return ListBatches(self.train_examples, t.batch_size, ft.max_seq_len, False, t.seed, self.pad_id,
                           info.rank, info.world_size)

    def _batches_per_epoch(self) -> int:
        t, ft = self.t, self.ft
        return ListBatches(self.train_examples, t.batch_size, ft.max_seq_len, False, t.seed, self.pad_id,
                           0, self.dist.world_size).batches_per_epoch()

    def describe(self) -> str:
        total = sum(p.numel() for p in self.raw_model.parameters())
        trainable = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        msg = (f"{self.ft.method}: {trainable:,} trainable of {total:,} parameters; {len(self.train_examples):,} "
               f"train / {len(self.val_examples):,} val pairs ({self._pairs_tokens(self.train_examples):,} tokens); "
               f"{self.t.max_iters} steps")
        return msg + (f"\n{self.truncated} side(s) truncated to --max-seq-len {self.ft.max_seq_len}"
                      if self.truncated else "")

    def _pairs_tokens(self, pairs: list[PrefPair]) -> int:
        return sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)

    def _accumulate(self, **values: torch.Tensor) -> None:
        """Sum per-pair statistics until the next eval record."""
        acc = self.__dict__.setdefault("_acc", {})
        for k, v in values.items():
            acc[k] = acc.get(k, 0.0) + float(v.detach().float().sum())
        acc["_n"] = acc.get("_n", 0) + int(next(iter(values.values())).numel())

    def _take_means(self, prefix: str = "") -> dict[str, float]:
        acc = self.__dict__.pop("_acc", {})
        n = acc.pop("_n", 0)
        return {prefix + k: v / n for k, v in acc.items()} if n else {}

    def extra_metrics(self) -> dict[str, Any]:
        out = self._take_means()
        out.update(self.__dict__.pop("_eval_stats", {}))
        return out


# ---------------------------------------------------------------------------- reward model


def collate_full(examples: list, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole sequences right-padded: ids [B, T] and lengths [B] (the score is read at length - 1)."""
    T = max(len(e.input_ids) for e in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        x[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
    return x, torch.tensor([len(e.input_ids) for e in examples])


class RewardModelTrainer(PairTrainer):
    """`llmkit rm train`: a scalar head on the last token, Bradley-Terry loss, held-out pairwise accuracy."""

    name = "rm train"

    def _load_base(self) -> nn.Module:
        from llmkit.model.reward import add_score_head

        return add_score_head(super()._load_base())  # the head exists before LoRA wraps the projections

    def _build_model(self) -> nn.Module:
        model = super()._build_model()
        model.lm_head.weight.requires_grad_(True)  # the head always trains (PEFT's modules_to_save)
        return model

    def pair_scores(self, pairs: list[PrefPair]) -> tuple[torch.Tensor, torch.Tensor]:
        from llmkit.model.reward import last_token_scores

        x, lengths = collate_full([p.chosen for p in pairs] + [p.rejected for p in pairs], self.pad_id)
        with self._autocast():
            r = last_token_scores(self.model(x.to(self.dist.device)), lengths)
        return r[: len(pairs)], r[len(pairs) :]

    def batch_loss(self, pairs: list[PrefPair]) -> torch.Tensor:
        self.step_tokens += self._pairs_tokens(pairs) * self.dist.world_size
        rc, rr = self.pair_scores(pairs)
        margin = torch.tensor([p.margin for p in pairs], device=rc.device)
        loss = bradley_terry_loss(rc, rr, margin)
        self._accumulate(accuracy=(rc > rr).float(), reward_chosen=rc, reward_rejected=rr, margin=rc - rr)
        return loss.mean()

    @torch.no_grad()
    def evaluate(self, split: str = "val", full: bool = False) -> float:
        """Bradley-Terry loss over the held-out pairs; their pairwise accuracy goes in the record."""
        pairs = self.val_examples if split == "val" else self.train_examples
        self.model.eval()
        losses, accs, margins = [], [], []
        for i in range(0, len(pairs), 2 * self.t.batch_size):
            chunk = pairs[i : i + 2 * self.t.batch_size]
            rc, rr = self.pair_scores(chunk)
            m = torch.tensor([p.margin for p in chunk], device=rc.device)
            losses.append(bradley_terry_loss(rc, rr, m))
            accs.append((rc > rr).float())
            margins.append(rc - rr)
        self.model.train()
        self._eval_stats = {"val_accuracy": float(torch.cat(accs).mean()),
                            "val_margin": float(torch.cat(margins).mean())}
        self.val_accuracy = self._eval_stats["val_accuracy"]
        return float(torch.cat(losses).mean())

    def _export(self, model_sd: dict[str, torch.Tensor]) -> None:
        from llmkit.model.lora import merge_lora
        from llmkit.model.reward import save_reward_model

        model = self.raw_model
        if self.ft.method == "lora":
            model = merge_lora(copy.deepcopy(model))
        tmp = self.out_dir / ".export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_reward_model(model, tmp, pad_token_id=self.pad_id)
        self.tokenizer.save(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, self.out_dir / f.name)
        shutil.rmtree(tmp, ignore_errors=True)

    def fit(self) -> TrainResult:
        result = super().fit()
        result.val_accuracy = getattr(self, "val_accuracy", None)
        return result


# ---------------------------------------------------------------------------- DPO


class DPOTrainer(PairTrainer):
    """`llmkit dpo`: direct preference optimisation against a frozen reference (Rafailov et al., 2023)."""

    name = "dpo"

    def _build_model(self) -> nn.Module:
        model = super()._build_model()
        self.ref_model = None
        if self.ft.method == "full" and not self.ft.precompute_ref:
            self.ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        self.ref_logps: dict[int, tuple[float, float]] | None = None
        if self.ft.precompute_ref:  # from the starting weights, before any checkpoint is restored
            from llmkit.train.trainer import autocast_dtype

            self.amp_dtype = autocast_dtype(self.t.dtype, self.dist.device)
            self.ref_logps = self._precompute(model.to(self.dist.device))
        return model

    def _reference(self, model: nn.Module):
        """A context giving the reference policy: adapters off, or the frozen copy."""
        if self.ref_model is not None:
            return contextlib.nullcontext(self.ref_model)
        return adapters_off(model)

    def pair_logps(self, model: nn.Module, pairs: list[PrefPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed (IPO: mean) completion log-probs of the chosen and rejected sides, [B] each."""
        b = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], self.pad_id)
        dev = next(model.parameters()).device
        x, y = b["input_ids"].to(dev), b["targets"].to(dev)
        with self._autocast():
            logits = model(x)
        lp = token_logps(logits, y).sum(-1)
        if self.ft.loss_type == "ipo":
            lp = lp / (y != -100).sum(-1).clamp(min=1)
        return lp[: len(pairs)], lp[len(pairs) :]

    @torch.no_grad()
    def _precompute(self, model: nn.Module) -> dict[int, tuple[float, float]]:
        from tqdm import tqdm

        out: dict[int, tuple[float, float]] = {}
        seen = {p.index for p in self.train_examples}
        pairs = self.train_examples + [p for p in self.val_examples if p.index not in seen]
        was = model.training
        model.eval()
        bs = 2 * self.t.batch_size
        with self._reference(model) as ref:
            for i in tqdm(range(0, len(pairs), bs), desc="reference log-probs", disable=not self.t.progress,
                          leave=False):
                chunk = pairs[i : i + bs]
                c, r = self.pair_logps(ref, chunk)
                out.update({p.index: (float(a), float(b)) for p, a, b in zip(chunk, c, r)})
        model.train(was)
        return out

    def ref_pair_logps(self, pairs: list[PrefPair]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.dist.device
        if self.ref_logps is not None:
            c = torch.tensor([self.ref_logps[p.index][0] for p in pairs], device=dev)
            r = torch.tensor([self.ref_logps[p.index][1] for p in pairs], device=dev)
            return c, r
        with torch.no_grad(), self._reference(self.raw_model) as ref:
            if ref is not self.raw_model:
                ref.to(dev)
            return self.pair_logps(ref, pairs)

    def _pair_losses(self, pairs: list[PrefPair]):
        ft = self.ft
        pc, pr = self.pair_logps(self.model, pairs)
        rc, rr = self.ref_pair_logps(pairs)
        losses, cr, rj = dpo_loss(pc, pr, rc, rr, ft.beta, ft.loss_type, ft.label_smoothing)
        stats = {"rewards/chosen": cr, "rewards/rejected": rj, "rewards/margins": cr - rj,
                 "rewards/accuracies": (cr > rj).float(), "logps/chosen": pc.detach(), "logps/rejected": pr.detach()}
        return losses, stats

    def batch_loss(self, pairs: list[PrefPair]) -> torch.Tensor:
        self.step_tokens += self._pairs_tokens(pairs) * self.dist.world_size
        losses, stats = self._pair_losses(pairs)
        self._accumulate(**stats)
        return losses.mean()

    def extra_metrics(self) -> dict[str, Any]:
        from llmkit.train.metrics import plot_panels

        out = super().extra_metrics()
        if self.metrics is not None:
            plot_panels(self.metrics.records + [{"step": self.step, **out}], DPO_PANELS, self.out_dir / "dpo.png")
        return out

    @torch.no_grad()
    def evaluate(self, split: str = "val", full: bool = False) -> float:
        """Mean DPO loss over the held-out pairs; their rewards/accuracies go in the record as eval_*."""
        pairs = self.val_examples if split == "val" else self.train_examples
        saved = self.__dict__.pop("_acc", None)
        self.model.eval()
        losses = []
        for i in range(0, len(pairs), 2 * self.t.batch_size):
            loss, stats = self._pair_losses(pairs[i : i + 2 * self.t.batch_size])
            losses.append(loss)
            self._accumulate(**stats)
        self.model.train()
        self._eval_stats = self._take_means("eval_")
        if saved is not None:
            self._acc = saved
        return float(torch.cat(losses).mean())


# ---------------------------------------------------------------------------- one-call forms


def as_list(v: Any) -> list[str]:
    """None, one path or several -> a list of path strings."""
    return [] if v is None else [str(v)] if isinstance(v, str | os.PathLike) else [str(x) for x in v]


def _configs(model, data, out, method, val_data, max_steps, epochs, lr, batch_size, grad_accum, eval_interval,
             warmup_steps, weight_decay, seed, device, dtype, num_threads, progress, options, default_lr):
    names = set(PrefConfig.__dataclass_fields__)
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}")
    ft = PrefConfig(model=str(model), data=as_list(data), val_data=as_list(val_data), method=method, epochs=epochs,
                    **options)
    if max_steps is not None and epochs is not None:
        raise ConfigError("give --max-steps or --epochs, not both")
    rate = lr if lr is not None else default_lr
    opt = OptimConfig(batch_size=batch_size, grad_accum=grad_accum, max_iters=max_steps or 1, lr=rate,
                      min_lr=rate / 10, warmup_iters=warmup_steps or 0, weight_decay=weight_decay,
                      eval_interval=eval_interval or 1, seed=seed, device=device, dtype=dtype,
                      num_threads=num_threads, progress=progress, strategy="auto", beta2=0.999)
    return ft, opt


def train_reward_model(model: str, data: str | list[str], out: str, method: str = "full",
                       val_data: str | list[str] | None = None, max_steps: int | None = None,
                       epochs: float | None = None, lr: float | None = None, batch_size: int = 8,
                       grad_accum: int = 1, resume: str | bool | None = None, overwrite: bool = False,
                       stop_after: int | None = None, eval_interval: int | None = None,
                       warmup_steps: int | None = None, weight_decay: float = 0.0, seed: int = 1337,
                       device: str = "auto", dtype: str = "auto", num_threads: int | None = None,
                       progress: bool = True, **options: Any) -> TrainResult:
    """Train a reward model from causal LM `model` on preference JSONL `data`; `out` becomes a Hugging Face
    `*ForSequenceClassification` folder (num_labels=1). `result.val_accuracy` is the held-out pairwise accuracy."""
    ft, opt = _configs(model, data, out, method, val_data, max_steps, epochs, lr, batch_size, grad_accum,
                       eval_interval, warmup_steps, weight_decay, seed, device, dtype, num_threads, progress,
                       options, {"full": 1e-4, "lora": 1e-3}.get(method, 1e-4))
    return RewardModelTrainer(ft, opt, out, resume=resume, overwrite=overwrite, stop_after=stop_after,
                              max_steps=max_steps, eval_interval=eval_interval, warmup_steps=warmup_steps).fit()


def dpo(model: str, data: str | list[str], out: str, method: str = "full", beta: float = 0.1,
        loss_type: str = "sigmoid", val_data: str | list[str] | None = None, max_steps: int | None = None,
        epochs: float | None = None, lr: float | None = None, batch_size: int = 8, grad_accum: int = 1,
        resume: str | bool | None = None, overwrite: bool = False, stop_after: int | None = None,
        eval_interval: int | None = None, warmup_steps: int | None = None, weight_decay: float = 0.0,
        seed: int = 1337, device: str = "auto", dtype: str = "auto", num_threads: int | None = None,
        progress: bool = True, **options: Any) -> TrainResult:
    """DPO (`loss_type` sigmoid | ipo | hinge) from SFT model `model` on preference JSONL `data`; `out` is a model
    folder (full) or a PEFT LoRA folder (lora). Options: precompute_ref, label_smoothing, max_seq_len, lora_*."""
    ft, opt = _configs(model, data, out, method, val_data, max_steps, epochs, lr, batch_size, grad_accum,
                       eval_interval, warmup_steps, weight_decay, seed, device, dtype, num_threads, progress,
                       dict(options, beta=beta, loss_type=loss_type),
                       {"full": 1e-5, "lora": 1e-4}.get(method, DEFAULT_LR["full"]))
    return DPOTrainer(ft, opt, out, resume=resume, overwrite=overwrite, stop_after=stop_after, max_steps=max_steps,
                      eval_interval=eval_interval, warmup_steps=warmup_steps).fit()


def rm_score_texts(model_dir: str, texts: list[str], add_special_tokens: bool = True) -> list[float]:
    """Scores of plain texts, tokenized as the reward model's tokenizer does."""
    from llmkit.model.reward import load_reward_model, score_ids
    from llmkit.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    return score_ids(load_reward_model(model_dir), [tok.encode(t, add_special_tokens=add_special_tokens)
                                                    for t in texts])


def rm_score_file(model_dir: str, data: str, out: str | None = None, max_seq_len: int = 1024) -> list[dict]:
    """{"chosen": s, "rejected": s} per preference pair of `data` (rendered as training renders them);
    written as JSONL to `out` when given."""
    import json

    from llmkit.data.prefs import load_prefs
    from llmkit.fsutil import atomic_write_text
    from llmkit.model.reward import load_reward_model, score_ids
    from llmkit.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    pairs, _ = load_prefs(data, tok, max_seq_len)
    model = load_reward_model(model_dir)
    s = score_ids(model, [p.chosen.input_ids for p in pairs] + [p.rejected.input_ids for p in pairs])
    rows = [{"chosen": s[i], "rejected": s[len(pairs) + i]} for i in range(len(pairs))]
    if out:
        atomic_write_text(Path(out), "".join(json.dumps(r) + "\n" for r in rows))
    return rows
