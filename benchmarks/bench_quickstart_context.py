"""What the quickstart's 512-token context costs: training throughput at context 512 versus 128.

The quickstart model (~1.1M parameters, 4 layers, 128 wide, vocab 2048), random init, fp32, CPU,
AdamW; the same 2048 tokens per step either way: 16 x 128 (the old quickstart) or 4 x 512 (the new).
Rounds alternate the two shapes; each round times `--steps` optimizer steps after 2 warm-up
steps. Prints the median tokens/s of each and their ratio, also as the median of per-round ratios (robust
when the machine's load changes between rounds): the share of the old token budget the
512 context keeps in the same minutes).

    python benchmarks/bench_quickstart_context.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.train.quickstart import QUICKSTART
from llmkit.train.trainer import lm_loss

SHAPES = {128: 16, 512: 4}  # context -> batch size (2048 tokens a step)


def steps_per_second(model: Transformer, opt: torch.optim.Optimizer, ctx: int, steps: int) -> float:
    B, V = SHAPES[ctx], model.config.vocab_size
    g = torch.Generator().manual_seed(ctx)
    x = torch.randint(0, V, (B, ctx + 1), generator=g)

    def step() -> None:
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = dict(QUICKSTART["model"])
    model = Transformer(ModelConfig(**{**m, "vocab_size": 2048})).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tok_s: dict[int, list[float]] = {128: [], 512: []}
    for r in range(args.rounds):
        for ctx in (128, 512) if r % 2 == 0 else (512, 128):
            tok_s[ctx].append(steps_per_second(model, opt, ctx, args.steps) * 2048)
    med = {ctx: statistics.median(v) for ctx, v in tok_s.items()}
    for ctx in (128, 512):
        print(f"context {ctx:4d} ({SHAPES[ctx]:2d} x {ctx}): median {med[ctx]:8,.0f} tok/s  "
              f"(rounds: {', '.join(f'{v:,.0f}' for v in tok_s[ctx])})")
    paired = statistics.median(a / b for a, b in zip(tok_s[512], tok_s[128]))  # same round, same load
    print(f"ratio 512 / 128: {med[512] / med[128]:.2f} of the medians, {paired:.2f} median of the per-round "
          f"ratios (threads {args.threads})")


if __name__ == "__main__":
    main()
