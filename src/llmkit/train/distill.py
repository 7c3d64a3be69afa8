"""Knowledge distillation: a student learns a teacher's next-token distributions (Hinton et al., 2015).

loss = α·τ²·KL(teacher_τ ‖ student_τ) + (1-α)·CE(student, next token) [+ β·MSE(P_l h_student, h_teacher)]

- `kl="forward"` is KL(p_T ‖ p_S) (mean-seeking, Hinton's); `kl="reverse"` is KL(p_S ‖ p_T) (mode-seeking,
  as MiniLLM); τ softens both distributions and τ² keeps the gradient scale independent of τ.
- Hidden-state matching (`hidden_weight` β > 0, as TinyBERT / DistilBERT's cosine loss): student block l's
  output is mapped by a learned projection P_l [C_s -> C_t] onto teacher block round((l+1)·L_t/L_s)-1's.
- The teacher runs on the fly, or once: `cache_topk=K` stores its top-K log-probs of every fixed
  training window on disk (`out/teacher_topk/`) and the KL is then taken over those K ids (both
  distributions renormalised over them).
- The student is a model folder, a preset, or a config; it must share the teacher's vocabulary.
The loop (AdamW, schedule, resume, metrics.jsonl + loss.png, DDP/FSDP) is the pretraining `Trainer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from llmkit.errors import CheckpointError, ConfigError, InputError
from llmkit.model.config import ModelConfig
from llmkit.model.hf import load_model
from llmkit.model.prune import keep_zeros, zero_masks
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import load_tokenizer
from llmkit.train import distributed as D
from llmkit.train.batches import windows
from llmkit.train.config import DataConfig, OptimConfig, TrainConfig
from llmkit.train.trainer import Trainer, TrainResult, lm_loss

KL_DIRECTIONS = ("forward", "reverse")


# ---------------------------------------------------------------------------------------- the loss
def kd_kl(student_logits: torch.Tensor, teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
          temperature: float = 1.0, direction: str = "forward") -> torch.Tensor:
    """Mean per-token KL between teacher and student at temperature τ.

    student_logits [B, T, V]; teacher: logits [B, T, V], or (log-probs [B, T, K], ids [B, T, K]) of its
    top K tokens, in which case both distributions are renormalised over those K ids.
    forward: Σ p_T (log p_T - log p_S); reverse: Σ p_S (log p_S - log p_T).
    """
    if direction not in KL_DIRECTIONS:
        raise ConfigError(f"kl direction must be forward or reverse, got {direction!r}")
    s = student_logits.float() / temperature
    if isinstance(teacher, tuple):
        t_lp, ids = teacher
        log_t = torch.log_softmax(t_lp.float() / temperature, -1)  # softmax(logit/τ) restricted to the K ids
        log_s = torch.log_softmax(s.gather(-1, ids.long()), -1)
    else:
        log_t, log_s = torch.log_softmax(teacher.float() / temperature, -1), torch.log_softmax(s, -1)
    if direction == "forward":
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    else:
        kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    return kl.mean()


def distill_loss(student_logits: torch.Tensor, teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                 targets: torch.Tensor, alpha: float = 0.5, temperature: float = 2.0, direction: str = "forward",
                 hidden: list[tuple[torch.Tensor, torch.Tensor]] | None = None, hidden_weight: float = 0.0
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """α·τ²·KL + (1-α)·CE (+ hidden_weight · mean MSE over (projected student, teacher) hidden pairs)."""
    kl = kd_kl(student_logits, teacher, temperature, direction)
    ce = lm_loss(student_logits, targets)
    loss = alpha * temperature**2 * kl + (1 - alpha) * ce
    parts = {"kl": float(kl.detach()), "ce": float(ce.detach())}
    if hidden and hidden_weight > 0:
        mse = sum(F.mse_loss(hs.float(), ht.float()) for hs, ht in hidden) / len(hidden)
        loss = loss + hidden_weight * mse
        parts["hidden_mse"] = float(mse.detach())
    return loss, parts


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """The teacher block whose output student block l matches: round((l+1)·L_t/L_s) - 1."""
    return [max(0, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]


# ---------------------------------------------------------------------------------------- students
def same_vocabulary(a: str | Path, b: str | Path) -> bool:
    """Whether two tokenizer folders map every token to the same id."""
    ta, tb = load_tokenizer(a), load_tokenizer(b)
    if ta.vocab_size != tb.vocab_size:
        return False
    return all(ta.id_to_token(i) == tb.id_to_token(i) for i in range(ta.vocab_size))


def student_config(teacher: ModelConfig, preset: str | None = None, config: str | dict | None = None,
                   seq_len: int = 0) -> ModelConfig:
    """A preset or config (YAML file, or a pretrain config with a `model:` section) given the teacher's
    vocabulary (and special ids)."""
    import yaml

    spec: dict[str, Any] = {}
    if config is not None:
        if isinstance(config, dict):
            spec = dict(config)
        else:
            p = Path(config)
            if not p.is_file():
                raise ConfigError(f"--student-config {str(p)!r} does not exist (expected a YAML file of model fields)")
            spec = yaml.safe_load(p.read_text()) or {}
        if isinstance(spec.get("model"), dict | str):
            spec = spec["model"] if isinstance(spec["model"], dict) else {"preset": spec["model"]}
        preset = spec.pop("preset", preset)
    v = spec.get("vocab_size")
    if v is not None and v != teacher.vocab_size:
        raise ConfigError(f"the student config says vocab_size={v}, the teacher has {teacher.vocab_size}; "
                          "distillation needs the same vocabulary (leave vocab_size out)")
    spec.update(vocab_size=teacher.vocab_size, bos_token_id=teacher.bos_token_id,
                eos_token_id=teacher.eos_token_id, pad_token_id=teacher.pad_token_id)
    spec.setdefault("block_size", max(seq_len, teacher.block_size))
    try:
        return ModelConfig.from_preset(preset, **spec) if preset else ModelConfig.from_dict(spec)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"bad student preset/config: {e}") from None


# ---------------------------------------------------------------------------------------- the teacher cache
class TopKCache:
    """The teacher's top-K log-probs of every fixed window (starts 0, T, 2T, ...) of the train split."""

    def __init__(self, folder: Path) -> None:
        self.meta = json.loads((folder / "meta.json").read_text())
        self.logprobs = np.load(folder / "logprobs.npy", mmap_mode="r")  # [n, T, K] float16
        self.ids = np.load(folder / "ids.npy", mmap_mode="r")  # [n, T, K] int32

    @staticmethod
    @torch.no_grad()
    def build(teacher: nn.Module, tokens: np.ndarray, seq_len: int, k: int, folder: Path, key: dict,
              device: torch.device, batch_size: int = 32, progress: bool = True) -> TopKCache:
        """Run the teacher once over all windows (or reuse `folder` when it was built for `key`)."""
        from llmkit.fsutil import write_dir

        meta = folder / "meta.json"
        if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
            return TopKCache(folder)
        n = (len(tokens) - 1) // seq_len

        def write(tmp: Path) -> None:
            lp = np.lib.format.open_memmap(tmp / "logprobs.npy", "w+", np.float16, (n, seq_len, k))
            ids = np.lib.format.open_memmap(tmp / "ids.npy", "w+", np.int32, (n, seq_len, k))
            for i in tqdm(range(0, n, batch_size), desc="teacher top-k", unit="batch", disable=not progress):
                starts = [j * seq_len for j in range(i, min(n, i + batch_size))]
                x, _ = windows(tokens, starts, seq_len)
                top = torch.log_softmax(teacher(x.to(device)).float(), -1).topk(k, dim=-1)
                lp[i : i + len(starts)] = top.values.cpu().numpy().astype(np.float16)
                ids[i : i + len(starts)] = top.indices.cpu().numpy().astype(np.int32)
            lp.flush()
            ids.flush()
            (tmp / "meta.json").write_text(json.dumps({"key": key, "windows": n}))

        write_dir(folder, write)
        return TopKCache(folder)


class FixedWindowSampler:
    """Random fixed windows (with their index into the top-K cache), resumable; per-rank slices as
    `RandomWindowSampler`."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, cache: TopKCache,
                 rank: int = 0, world_size: int = 1) -> None:
        self.tokens, self.seq_len, self.batch_size, self.cache = tokens, seq_len, batch_size, cache
        self.rank, self.world_size = rank, world_size
        self.n = (len(tokens) - 1) // seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        mine = None
        for r in range(self.world_size):
            ix = torch.randint(self.n, (self.batch_size,), generator=self.generator)
            if r == self.rank:
                mine = ix.tolist()
        x, y = windows(self.tokens, [i * self.seq_len for i in mine], self.seq_len)
        lp = torch.from_numpy(np.stack([self.cache.logprobs[i] for i in mine]).astype(np.float32))
        ids = torch.from_numpy(np.stack([self.cache.ids[i] for i in mine]).astype(np.int64))
        return x, y, lp, ids

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# ---------------------------------------------------------------------------------------- the trainer
class Distiller(Trainer):
    """One distillation run (`distill` is the one-call form)."""

    name = "distill"

    def __init__(self, cfg: TrainConfig, teacher: str, student: str | None = None, alpha: float = 0.5,
                 temperature: float = 2.0, kl: str = "forward", hidden_weight: float = 0.0,
                 cache_topk: int | None = None, student_config: str | dict | None = None,
                 resume: str | bool | None = None, overwrite: bool = False, stop_after: int | None = None,
                 keep_zeros: bool = False) -> None:
        """`keep_zeros`: the student's zero block weights stay zero (recovery after unstructured pruning)."""
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha={alpha} must be in [0, 1]")
        if temperature <= 0:
            raise ConfigError(f"temperature={temperature} must be > 0")
        if kl not in KL_DIRECTIONS:
            raise ConfigError(f"kl={kl!r}; expected forward or reverse")
        if cache_topk is not None and cache_topk < 1:
            raise ConfigError(f"--cache-teacher-topk {cache_topk} must be >= 1")
        if not (Path(teacher) / "config.json").is_file():
            raise InputError(f"--teacher {teacher!r} is not a model folder (no config.json)")
        self.teacher_dir, self.student_dir, self.student_spec = str(teacher), student, student_config
        self.alpha, self.temperature, self.kl, self.hidden_weight = alpha, temperature, kl, hidden_weight
        self.cache_topk, self.keep_zeros = cache_topk, keep_zeros
        self.parts: dict[str, float] = {}
        cfg.data.tokenizer = str(teacher)  # raw text is tokenized with the teacher's tokenizer
        super().__init__(cfg, resume=resume, overwrite=overwrite, stop_after=stop_after)

    def _build_model(self) -> nn.Module:
        t = self.t
        self.teacher = load_model(self.teacher_dir).requires_grad_(False).to(self.dist.device).eval()
        tc = self.teacher.config
        if not isinstance(self.teacher, Transformer):
            raise InputError(f"--teacher {self.teacher_dir} is not a decoder; distill trains causal LMs")
        if self.student_dir is not None:
            if (Path(self.student_dir) / "tokenizer.json").is_file() and not same_vocabulary(
                    self.student_dir, self.teacher_dir):
                raise InputError(f"the student {self.student_dir} has another vocabulary than the teacher "
                                 f"{self.teacher_dir}; distillation needs the same tokenizer")
            student = load_model(self.student_dir)
            if student.config.vocab_size != tc.vocab_size:
                raise InputError(f"the student's vocab_size is {student.config.vocab_size}, the teacher's "
                                 f"{tc.vocab_size}; distillation needs the same vocabulary")
            if getattr(student, "quantization", None) or getattr(student, "lowrank", None):
                raise InputError("distill a float dense student (this one is quantized or low-rank)")
        else:
            spec = self.student_spec if self.student_spec is not None else self.cfg.model
            if isinstance(spec, str) and not Path(spec).is_file():
                student = Transformer(student_config(tc, preset=spec, seq_len=t.seq_len))
            else:
                student = Transformer(student_config(tc, config=spec, seq_len=t.seq_len))
        self.model_config = student.config
        if student.config.block_size < t.seq_len or tc.block_size < t.seq_len:
            raise ConfigError(f"seq_len {t.seq_len} exceeds the student's or teacher's context "
                              f"({student.config.block_size}, {tc.block_size})")
        self._check_tokens(self.data)
        student.check_inputs = self.teacher.check_inputs = False
        self._hooks(student)
        self.masks = zero_masks(student) if self.keep_zeros else {}
        return student.train().requires_grad_(True)

    def _hooks(self, student: Transformer) -> None:
        """Capture block outputs; add the learned projections (student.distill_proj) when matching them."""
        self.h_s: dict[int, torch.Tensor] = {}
        self.h_t: dict[int, torch.Tensor] = {}
        if self.hidden_weight <= 0:
            return
        Ls, Lt = len(student.blocks), len(self.teacher.blocks)
        self.pairs = layer_map(Ls, Lt)
        Cs, Ct = student.config.n_embd, self.teacher.config.n_embd
        student.distill_proj = nn.ModuleList(nn.Linear(Cs, Ct, bias=False) for _ in range(Ls))
        for i, b in enumerate(student.blocks):
            b.register_forward_hook(lambda m, a, out, i=i: self.h_s.__setitem__(i, out))
        for j in set(self.pairs):
            self.teacher.blocks[j].register_forward_hook(lambda m, a, out, j=j: self.h_t.__setitem__(j, out))

    def _build_sampler(self):
        if not self.cache_topk:
            return super()._build_sampler()
        t, info = self.t, self.dist
        key = {"teacher": str(Path(self.teacher_dir).resolve()), "k": self.cache_topk, "seq_len": t.seq_len,
               "tokens": len(self.data.train), "data": str(self.data.data_dir)}
        folder = self.out_dir / "teacher_topk"
        if info.is_main:
            TopKCache.build(self.teacher, self.data.train, t.seq_len, self.cache_topk, folder, key,
                            info.device, progress=t.progress)
        D.barrier(info)
        cache = TopKCache(folder)
        return FixedWindowSampler(self.data.train, t.seq_len, t.batch_size, t.seed, cache, info.dp_rank,
                                  info.dp_size)

    def describe(self) -> str:
        src = f"top-{self.cache_topk} cache" if self.cache_topk else "on the fly"
        return (super().describe() + f"\ndistill: teacher {self.teacher.num_params() / 1e6:.2f}M -> student "
                f"{self.n_params / 1e6:.2f}M; alpha {self.alpha}, T {self.temperature}, {self.kl} KL "
                f"(teacher {src})" + (f", hidden x{self.hidden_weight}" if self.hidden_weight > 0 else ""))

    def batch_loss(self, batch) -> torch.Tensor:
        dev = self.dist.device
        x, y = batch[0].to(dev), batch[1].to(dev)
        self.step_tokens += y.numel() * self.dist.dp_size
        if len(batch) == 4:  # cached top-K of the teacher
            teacher = (batch[2].to(dev), batch[3].to(dev))
            if self.hidden_weight > 0:
                with torch.no_grad():
                    self.teacher(x)  # the hidden states are not cached
        else:
            with torch.no_grad():
                teacher = self.teacher(x)
        logits = self.model(x)
        hidden = None
        if self.hidden_weight > 0:
            proj = self.raw_model.distill_proj
            hidden = [(proj[i](self.h_s[i]), self.h_t[j]) for i, j in enumerate(self.pairs)]
        loss, self.parts = distill_loss(logits, teacher, y, self.alpha, self.temperature, self.kl, hidden,
                                        self.hidden_weight)
        return loss

    def train_step(self) -> torch.Tensor:
        loss = super().train_step()
        keep_zeros(self.raw_model, self.masks)  # pruned weights stay pruned
        return loss

    def extra_metrics(self) -> dict[str, Any]:
        return {f"train_{k}": v for k, v in self.parts.items()}

    def _load_model_state(self, sd: dict[str, torch.Tensor]) -> None:
        try:
            self.raw_model.load_state_dict(sd)
        except RuntimeError as e:
            raise CheckpointError(f"the checkpoint does not match this student (was a setting changed?): "
                                  f"{str(e)[:300]}") from None

    def _export(self, model_sd: dict[str, torch.Tensor]) -> None:
        """The student alone (without the hidden-state projections) becomes the model folder."""
        model = Transformer(self.model_config)
        model.load_state_dict({k: v for k, v in model_sd.items() if not k.startswith("distill_proj.")})
        self._export_model(model)


def distill(teacher: str, data: str, out: str, student: str | None = None, student_preset: str | None = None,
            student_config: str | dict | None = None, max_steps: int = 1000, alpha: float = 0.5,
            temperature: float = 2.0, kl: str = "forward", hidden_weight: float = 0.0,
            cache_topk: int | None = None, lr: float = 1e-3, batch_size: int = 12, seq_len: int = 64,
            grad_accum: int = 1, eval_interval: int | None = None, eval_iters: int | None = 20,
            warmup_steps: int | None = None, val_fraction: float = 0.1, seed: int = 1337,
            device: str = "auto", num_threads: int | None = None, progress: bool = True,
            resume: str | bool | None = None, overwrite: bool = False, stop_after: int | None = None,
            keep_zeros: bool = False, **train: Any) -> TrainResult:
    """Distil `teacher` (a model folder) into a student on `data` (text or a prepared folder); `out`
    becomes the student's model folder. Exactly one of `student` (a model folder), `student_preset`
    or `student_config` (YAML file or dict of ModelConfig fields). `keep_zeros`: zero block weights of
    the student stay zero (recovery of an unstructured-pruned model). `train` are more OptimConfig fields."""
    if sum(s is not None for s in (student, student_preset, student_config)) != 1:
        raise ConfigError("give exactly one of --student DIR, --student-preset NAME, --student-config YAML")
    opt = OptimConfig(batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, max_iters=max_steps,
                      lr=lr, min_lr=lr / 10, warmup_iters=warmup_steps if warmup_steps is not None else
                      max(1, max_steps // 20), eval_interval=eval_interval or max(1, max_steps // 10),
                      eval_iters=eval_iters, seed=seed, device=device, num_threads=num_threads,
                      progress=progress, **train)
    cfg = TrainConfig(model=student_preset or "tiny", data=DataConfig(path=str(data), val_fraction=val_fraction),
                      train=opt, out_dir=str(out))
    return Distiller(cfg, teacher, student, alpha, temperature, kl, hidden_weight, cache_topk, student_config,
                     resume, overwrite, stop_after, keep_zeros).fit()

