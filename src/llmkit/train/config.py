"""Pretraining config: one dataclass, loaded from YAML, overridable with `--section.key value`."""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmkit.errors import ConfigError
from llmkit.model.config import ModelConfig
from llmkit.model.presets import PRESETS


@dataclass
class DataConfig:
    """Where the tokens come from: a prepared shard folder, or raw text prepared on the fly."""

    path: str | None = None  # shard folder (manifest.json), text file, or folder of text files
    tokenizer: str = "char"  # "char" | "bpe" | path to a saved tokenizer folder
    vocab_size: int = 4096  # BPE vocabulary size when tokenizer == "bpe"
    val_fraction: float = 0.1  # the last fraction of the tokens is the validation split


@dataclass
class ParallelConfig:
    """N-D parallelism on one DeviceMesh (pp, dp_replicate, dp_shard, tp); see docs/distributed.md."""

    dp_shard: int = -1  # FSDP2 sharding degree; -1 = the processes left after dp_replicate * tp * pp
    dp_replicate: int = 1  # replicas (DDP; HSDP when dp_shard > 1 too)
    tp: int = 1  # tensor parallel (Megatron column/row plans, sequence parallel norms, vocab-parallel loss)
    pp: int = 1  # pipeline stages (torch.distributed.pipelining), the model split by blocks
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b (2 stages per rank)
    pp_microbatches: int | None = None  # None = the number of pipeline stages
    zero: int | None = None  # 1 | 2 | 3 (FSDP2 reshard settings); None = 3 whenever parameters are sharded
    offload: bool = False  # FSDP2 CPU offload of parameters, gradients and optimizer state
    activation_checkpoint: str = "none"  # none | full | selective (per block)

    def active(self) -> bool:
        """Anything beyond plain DDP / FSDP asked for (then the trainer builds a DeviceMesh)."""
        return (
            self.tp > 1 or self.pp > 1 or self.dp_replicate > 1 or self.dp_shard > 1
            or self.zero is not None or self.offload or self.activation_checkpoint != "none"
        )


@dataclass
class OptimConfig:
    """The optimisation loop: AdamW, warmup + cosine schedule, evaluation and checkpoints."""

    batch_size: int = 12  # sequences per micro-batch, per process
    seq_len: int = 64  # tokens per training window (the model's context, block_size, may be longer)
    grad_accum: int = 1  # micro-batches per optimizer step, per process
    max_iters: int = 2000  # optimizer steps
    max_minutes: float | None = None  # time budget: stop (and finish the cosine) after this long
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine floor
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # default: max_iters
    weight_decay: float = 0.1  # applied to >= 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    label_smoothing: float = 0.0
    eval_interval: int = 250  # steps between evaluations (and checkpoints)
    eval_iters: int | None = None  # val batches per periodic eval; None = whole val split (final eval: always)
    log_interval: int = 10  # steps between progress-bar updates
    checkpoint: bool = True  # write a resumable checkpoint at each eval
    keep_checkpoints: int = 1  # how many old checkpoints to keep besides the latest
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast dtype)
    compile: bool = False
    seed: int = 1337
    strategy: str = "auto"  # auto (ddp under torchrun; parallel if train.parallel is set) | single | ddp | fsdp
    # | parallel (N-D layouts, docs/distributed.md)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int | None = None  # CPU threads; None = OMP_NUM_THREADS or all cores; 0 = time 1 vs all
    progress: bool = True  # tqdm bar
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    qat: str | None = None  # int8 | int4: quantization-aware training; out_dir gets the quantized model
    qat_group_size: int = 64  # inputs per scale for QAT (0 = per channel, int8 only)
    objective: str = "clm"  # clm (causal LM) | mlm (BERT masked LM) | span (T5 span corruption); objectives.py
    whole_word_mask: bool = False  # mlm: mask whole words rather than single tokens
    nsp: bool = False  # mlm: add BERT's next-sentence prediction ([CLS] A [SEP] B [SEP], BertForPreTraining)


@dataclass
class TrainConfig:
    """Everything `llmkit pretrain` needs. `model` is a preset name or a dict of ModelConfig fields."""

    model: Any = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    out_dir: str = "out/pretrain"

    # ---- building -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a nested dict (as read from YAML); unknown keys raise ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"a training config must be a mapping, got {type(d).__name__}")
        cfg = cls()
        for key, value in d.items():
            cfg.set(key, value)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Load a YAML config file."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (expected a YAML file)")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model if not isinstance(self.model, dict) else dict(self.model),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "out_dir": self.out_dir,
        }

    # ---- overrides ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Checks that need no data: the objective's name and what it combines with."""
        from llmkit.train.objectives import OBJECTIVES

        t = self.train
        if t.objective not in OBJECTIVES:
            raise ConfigError(f"train.objective={t.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if t.nsp and t.objective != "mlm":
            raise ConfigError(f"train.nsp needs train.objective mlm, got {t.objective!r}")
        if t.objective != "clm" and (t.qat or t.parallel.active() or t.strategy in ("fsdp", "parallel")):
            raise ConfigError(f"train.objective={t.objective} runs with strategy single/ddp, without qat and "
                              "train.parallel; expected those off (they apply to the causal decoder)")

    def set(self, key: str, value: Any) -> None:
        """Set a (dotted) key, e.g. `train.lr`, `model.n_layer`, `data`, `out_dir`."""
        head, _, rest = key.partition(".")
        if head == "model":
            self._set_model(rest, value)
        elif head in ("data", "train"):
            section = getattr(self, head)
            if not rest:
                if isinstance(value, dict):
                    for k, v in value.items():
                        self.set(f"{head}.{k}", v)
                elif head == "data" and isinstance(value, str):
                    self.data.path = value  # `data: path/to/text` shorthand
                else:
                    raise ConfigError(f"config section {head!r} must be a mapping, got {value!r}")
                return
            _set_field(section, rest, value, prefix=f"{head}.")
        elif head == "out_dir" and not rest:
            self.out_dir = str(value)
        else:
            raise ConfigError(_unknown(key, all_keys()))

    def _set_model(self, rest: str, value: Any) -> None:
        valid = model_keys()
        if not rest:
            if isinstance(value, str):
                self.model = value
            elif isinstance(value, dict):
                self.model = {} if not isinstance(self.model, dict) else self.model
                for k, v in value.items():
                    self._set_model(str(k), v)
            else:
                raise ConfigError(f"'model' must be a preset name or a mapping of fields, got {value!r}")
            return
        if rest not in valid:
            raise ConfigError(_unknown(f"model.{rest}", [f"model.{k}" for k in valid]))
        if not isinstance(self.model, dict):
            self.model = {"preset": self.model}
        self.model[rest] = value

    def apply_overrides(self, overrides: list[str]) -> None:
        """Apply `--a.b value` / `--a.b=value` command-line pairs (values are parsed as YAML)."""
        i = 0
        while i < len(overrides):
            tok = overrides[i]
            if not tok.startswith("--"):
                raise ConfigError(f"expected an override like --train.lr 3e-4, got {tok!r}")
            if "=" in tok:
                key, raw = tok[2:].split("=", 1)
                i += 1
            else:
                key = tok[2:]
                if i + 1 >= len(overrides) or overrides[i + 1].startswith("--"):
                    raise ConfigError(f"override --{key} needs a value, e.g. --{key} VALUE")
                raw = overrides[i + 1]
                i += 2
            self.set(key.replace("-", "_") if key.replace("-", "_") in all_keys() else key, _parse(raw))

    def model_config(self, vocab_size: int):
        """The ModelConfig this run trains; vocab_size defaults to the tokenizer's."""
        spec = {"preset": self.model} if isinstance(self.model, str) else dict(self.model or {})
        preset = spec.pop("preset", None)
        if spec.get("vocab_size") is None:  # the tokenizer decides unless the config says otherwise
            spec["vocab_size"] = vocab_size
        elif spec["vocab_size"] < vocab_size:
            raise ConfigError(
                f"model.vocab_size={spec['vocab_size']} is smaller than the tokenizer's vocabulary "
                f"({vocab_size}); expected at least {vocab_size}"
            )
        if preset:
            if "block_size" not in spec and PRESETS.get(preset, {}).get("block_size", 0) < self.train.seq_len:
                spec["block_size"] = self.train.seq_len
            return ModelConfig.from_preset(preset, **spec)
        spec.setdefault("block_size", self.train.seq_len)
        return ModelConfig.from_dict(spec)


def model_keys() -> list[str]:
    """ModelConfig field names (plus `preset`)."""
    return ["preset"] + [f.name for f in dataclasses.fields(ModelConfig)]


def all_keys() -> list[str]:
    """Every dotted key a config or override may set."""
    keys = ["out_dir"] + [f"model.{k}" for k in model_keys()]
    keys += [f"data.{f.name}" for f in dataclasses.fields(DataConfig)]
    keys += [f"train.{f.name}" for f in dataclasses.fields(OptimConfig) if f.name != "parallel"]
    keys += [f"train.parallel.{f.name}" for f in dataclasses.fields(ParallelConfig)]
    return keys


# nanoGPT / Hugging Face names people type by habit
ALIASES = {
    "learning_rate": "lr",
    "gradient_accumulation_steps": "grad_accum",
    "beta_1": "beta1",
    "beta_2": "beta2",
    "max_steps": "max_iters",
    "warmup_steps": "warmup_iters",
    "num_layers": "n_layer",
    "num_hidden_layers": "n_layer",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "micro_batch_size": "batch_size",
    "out": "out_dir",
}


# old keys still read (configs and checkpoints written before the rename), with a DeprecationWarning
DEPRECATED = {"train.block_size": "train.seq_len"}  # the training window; model.block_size is the context


def _unknown(key: str, valid: list[str]) -> str:
    head, _, tail = key.rpartition(".")
    close = [k for k in valid if k.rsplit(".", 1)[-1] == ALIASES.get(tail) and k.startswith(head)]
    close += difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    tails = {k.rsplit(".", 1)[-1]: k for k in valid}
    close += [tails[t] for t in difflib.get_close_matches(tail, list(tails), n=3)]
    close = list(dict.fromkeys(close))[:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}{hint} (valid sections: model, data, train, out_dir)"


def _set_field(obj: Any, name: str, value: Any, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    head, _, rest = name.partition(".")
    sub = getattr(obj, head, None) if head in fields else None
    if dataclasses.is_dataclass(sub):  # a nested section, e.g. train.parallel.tp
        if rest:
            return _set_field(sub, rest, value, prefix=f"{prefix}{head}.")
        if not isinstance(value, dict):
            raise ConfigError(f"config section {prefix + head!r} must be a mapping, got {value!r}")
        for k, v in value.items():
            _set_field(sub, str(k), v, prefix=f"{prefix}{head}.")
        return
    if prefix + name in DEPRECATED:
        new = DEPRECATED[prefix + name]
        warnings.warn(f"config key {prefix + name} is deprecated; use {new}", DeprecationWarning, stacklevel=3)
        name = new.rpartition(".")[2]
    if name not in fields:
        raise ConfigError(_unknown(prefix + name, [prefix + k for k in fields]))
    setattr(obj, name, _coerce(value, getattr(type(obj)(), name), prefix + name))


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Cast a YAML/CLI value to the type of the field's default (None stays None)."""
    if value is None:
        return None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true/false, got {value!r}")
    int_or_none = ("train.lr_decay_iters", "train.eval_iters", "train.num_threads", "train.parallel.zero",
                   "train.parallel.pp_microbatches")
    if isinstance(default, int) or key in int_or_none:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        return value
    if isinstance(default, float) or key == "train.max_minutes":
        if isinstance(value, str):  # YAML reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} expects a number, got {value!r}")
        return float(value)
    if isinstance(default, str) or default is None:
        return str(value)
    return value


def _parse(raw: str) -> Any:
    """Parse a command-line value the way YAML would (`3e-4` is a float, `true` a bool)."""
    try:
        v = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(v, str):
        try:
            return float(v) if any(c in v for c in ".eE") else int(v)
        except ValueError:
            return v
    return v
