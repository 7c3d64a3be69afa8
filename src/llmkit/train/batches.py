"""Batches of token windows from a 1-D token array, resumable and identical for any world size."""

from __future__ import annotations

import numpy as np
import torch

from llmkit.data.shards import windows
from llmkit.errors import InputError

__all__ = ["RandomWindowSampler", "eval_starts", "windows"]


class RandomWindowSampler:
    """Draws random windows of `seq_len + 1` tokens (inputs and next-token targets), as nanoGPT.

    Every process draws the windows of the *global* batch in the same order from one seeded
    generator and keeps its own slice, so N processes with batch B see exactly the windows that
    one process with `grad_accum * N` micro-batches of B sees. `state_dict()` captures the
    position for exact resume.
    """

    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        if len(tokens) < seq_len + 2:
            raise InputError(
                f"the training split has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}; "
                "expected more text or a smaller train.seq_len"
            )
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's next micro-batch: x, y [batch_size, seq_len] int64."""
        high = len(self.tokens) - self.seq_len - 1
        mine = None
        for r in range(self.world_size):
            ix = torch.randint(high + 1, (self.batch_size,), generator=self.generator)
            if r == self.rank:
                mine = ix
        return windows(self.tokens, mine.tolist(), self.seq_len)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_starts(
    n_tokens: int, seq_len: int, max_windows: int | None = None, rank: int = 0, world_size: int = 1
) -> tuple[list[int], int]:
    """Starts of the non-overlapping windows that tile a split (or `max_windows` evenly spaced
    ones), dealt round-robin to the processes; also returns the most any process gets, so that
    every process can run the same number of forward passes (FSDP needs that)."""
    n_windows = (n_tokens - 1) // seq_len
    starts = [i * seq_len for i in range(n_windows)]
    if max_windows is not None and max_windows < n_windows:
        starts = [starts[int(j * n_windows / max_windows)] for j in range(max_windows)]
    per_rank = -(-len(starts) // world_size)
    return starts[rank::world_size], per_rank
