"""Character-level Shakespeare: llmkit vs nanoGPT's CPU baseline (val loss 1.886 in 190 s wall).

Runs configs/shakespeare-char.yaml (nanoGPT's config, 2000 iters) and the llmkit recipe
(configs/shakespeare-char-llmkit.yaml), and prints for each: val loss on the whole val split (the
last 10% of the characters), training tokens/s, wall time (evals and checkpoints included, data
preparation excluded, as nanoGPT's prepare.py is a separate step) and the ratios to nanoGPT.

    python benchmarks/bench_shakespeare.py [--data ../shared/data/tinyshakespeare/input.txt] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

NANOGPT_VAL_LOSS, NANOGPT_WALL_S = 1.886, 190.0
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "nanogpt-config": ROOT / "configs/shakespeare-char.yaml",
    "llmkit-recipe": ROOT / "configs/shakespeare-char-llmkit.yaml",
}


def nanogpt_style_val_loss(model_dir: Path, data: Path, seq_len: int, iters: int = 20, batch: int = 12) -> float:
    """nanoGPT's `estimate_loss` on val: the mean loss of `iters` random batches (seeded)."""
    import torch
    import torch.nn.functional as F

    from llmkit.data.shards import get_batch, load_tokens
    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer
    from llmkit.train.checkpoint import load_checkpoint

    state = load_checkpoint(model_dir)  # the final checkpoint: same weights as the HF folder
    model = Transformer(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    model.eval()
    val = load_tokens(data, "val")
    g = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for _ in range(iters):
            x, y = get_batch(val, batch, seq_len, generator=g)
            logits = model(x)
            losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item())
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare/input.txt"))
    ap.add_argument("--out", default="out/bench_shakespeare")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--only", choices=sorted(CONFIGS), action="append", help="run only this config")
    ap.add_argument("--max-iters", type=int, help="override the 2000 iterations (smoke runs)")
    args = ap.parse_args()

    import torch

    from llmkit.train.config import TrainConfig
    from llmkit.train.prepare import prepare_text
    from llmkit.train.trainer import pretrain

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    t0 = time.perf_counter()
    prepare_text(args.data, data, tokenizer="char", val_fraction=0.1)  # reused when already there
    print(f"data ready in {time.perf_counter() - t0:.1f} s (not counted)")
    rows = []
    for name in args.only or list(CONFIGS):
        cfg = TrainConfig.from_yaml(CONFIGS[name])
        cfg.data.path, cfg.out_dir = str(data), str(out / name)
        cfg.train.num_threads = args.threads
        if args.max_iters:
            cfg.train.max_iters = args.max_iters
        t0, c0 = time.perf_counter(), time.process_time()
        res = pretrain(cfg, overwrite=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        nano_est = nanogpt_style_val_loss(Path(cfg.out_dir), data, cfg.train.seq_len)
        rows.append(
            {
                "config": name,
                "iters": res.step,
                "val_loss": res.val_loss,
                "val_loss_nanogpt_estimate": nano_est,
                "wall_s": wall,
                "cpu_s": cpu,
                "train_s": res.train_time,
                "tokens_per_sec": res.tokens / res.train_time,
                "val_loss_ratio_vs_nanogpt": res.val_loss / NANOGPT_VAL_LOSS,
                "wall_ratio_vs_nanogpt": wall / NANOGPT_WALL_S,
                "threads": args.threads,
                "load_avg_1min": os.getloadavg()[0],
            }
        )
    print(
        f"\n{'config':<16}{'iters':>6}{'val loss':>10}{'vs 1.886':>9}{'20-batch est':>13}"
        f"{'wall s':>8}{'vs 190 s':>9}{'CPU s':>8}{'tok/s':>9}"
    )
    for r in rows:
        print(
            f"{r['config']:<16}{r['iters']:>6}{r['val_loss']:>10.4f}{r['val_loss_ratio_vs_nanogpt']:>9.3f}"
            f"{r['val_loss_nanogpt_estimate']:>13.4f}{r['wall_s']:>8.1f}{r['wall_ratio_vs_nanogpt']:>9.2f}"
            f"{r['cpu_s']:>8.1f}{r['tokens_per_sec']:>9,.0f}"
        )
    print("val loss: mean over every 64-character window of the whole val split; 20-batch est: nanoGPT's")
    print("estimate_loss (20 random batches of 12 windows, seed 0); CPU s: process CPU time (with 1 thread")
    print("this is what wall time would be on an idle core).")
    print(
        f"(nanoGPT: val loss {NANOGPT_VAL_LOSS} in {NANOGPT_WALL_S:.0f} s wall; {args.threads} torch threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
