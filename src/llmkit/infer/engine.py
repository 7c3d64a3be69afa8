"""Continuous-batching generation engine (Orca-style iteration-level scheduling over a paged KV cache).

A background thread runs the loop: at every step it admits queued requests into the running batch
(their prompts prefilled in chunks, similar lengths sharing a padded forward), then decodes one
token for every running sequence in a single batched forward. Sequences leave the batch as soon
as they finish or are cancelled, and their KV blocks return to the pool, so requests join and
leave at every step.

    engine = Engine(model, tokenizer).start()
    handle = engine.submit(tokenizer.encode("Hello"), SamplingParams(max_new_tokens=32))
    for event in handle:            # or `async for event in handle` inside an event loop
        print(event.text, end="")
    engine.shutdown()
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import threading
import weakref
from collections import deque
from typing import Any

import torch

from llmkit.errors import InputError, LlmkitError
from llmkit.infer.generate import eos_token_ids
from llmkit.infer.paged_cache import PagedKVCache
from llmkit.infer.request import _END, GenerationResult, RequestHandle
from llmkit.infer.sampling import SamplingParams
from llmkit.infer.sequence import Sequence, TokenEvent, sample_step
from llmkit.model.layers import check_token_ids
from llmkit.model.linear import set_decode_packing
from llmkit.model.lora import adapter_names, route_tokens
from llmkit.model.prompt_tuning import prompt_adapter_names, virtual_prefix

__all__ = ["Engine", "EngineClosedError", "GenerationResult", "QueueFullError", "RequestHandle", "TokenEvent"]

PREFILL_PAD = 1.25  # a batched prefill forward may compute at most this many tokens per real one


class QueueFullError(LlmkitError):
    """The engine's waiting queue is full; retry later (the server answers 429/503)."""


class EngineClosedError(LlmkitError):
    """The engine is shutting down (or shut down) and accepts no new requests."""


class _Sequence(Sequence):
    """Engine-thread state of one request: its `Sequence` plus the handle and KV-cache id."""

    def __init__(self, handle: RequestHandle, seq_id: int, eos_token_ids: set[int], tokenizer: Any,
                 virtual: list[int] | None = None):
        super().__init__(handle.prompt_ids, handle.params, eos_token_ids, tokenizer)
        self.handle, self.seq_id = handle, seq_id
        self.adapter: str | None = None  # adapter name (None: the base model)
        if virtual:  # a soft prompt's virtual ids run first (positions 0..N-1), unseen by the caller
            self.tokens[:0] = virtual
            self.prompt_len += len(virtual)


class Engine:
    """Continuous-batching generation over a paged KV cache, run by a background thread.

    `max_batch_size` sequences decode together; up to `max_queue` more wait. `max_seq_len`
    (default: the model's context) bounds prompt + max_new_tokens. The KV pool has `num_blocks`
    blocks of `kv_block_size` tokens (default: enough for a full batch at `max_seq_len`). Prompts
    longer than `prefill_chunk` tokens are prefilled in chunks. `fast_decode` swaps the model's
    dense Linears for the packed-for-decode kind (`model/linear.py`), as `generate` does.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        max_queue: int = 64,
        kv_block_size: int = 16,
        num_blocks: int | None = None,
        prefill_chunk: int = 512,
        fast_decode: bool = True,
    ):
        cfg = model.config
        if getattr(model, "is_encoder_decoder", False):
            raise InputError(f"the engine (and `llmkit serve`) runs decoder-only models; {cfg.model_type} is an "
                             "encoder-decoder: use llmkit.generate / generate_text or `llmkit generate`")
        self.model = model
        self.tokenizer = tokenizer
        self.config = cfg
        self.max_batch_size = int(max_batch_size)
        self.max_seq_len = int(max_seq_len or cfg.block_size)
        if self.max_batch_size < 1 or self.max_seq_len < 2:
            raise InputError(f"max_batch_size must be >= 1 and max_seq_len >= 2, got {max_batch_size}, {max_seq_len}")
        if self.max_seq_len > cfg.block_size:
            raise InputError(f"max_seq_len={self.max_seq_len} exceeds the model's context of {cfg.block_size} tokens")
        self.max_queue = int(max_queue)
        self.prefill_chunk = int(prefill_chunk)
        self.fast_decode = fast_decode
        set_decode_packing(model, fast_decode)
        if self.prefill_chunk < 1 or kv_block_size < 1:
            raise InputError(f"prefill_chunk and kv_block_size must be >= 1, got {prefill_chunk}, {kv_block_size}")
        if num_blocks is None:
            num_blocks = self.max_batch_size * -(-self.max_seq_len // kv_block_size)
        windows = {cfg.window_for_layer(i) for i in range(cfg.n_layer)}
        # one window for all layers: blocks that leave it are freed; mixed sliding/full layers keep all
        free_window = next(iter(windows)) if len(windows) == 1 else None
        p = next(model.parameters())
        self.device = p.device
        head_dim = getattr(cfg, "head_dim", None) or cfg.n_embd // cfg.n_head
        self.cache = PagedKVCache(
            n_layer=cfg.n_layer,
            n_kv_head=cfg.n_kv_head or cfg.n_head,
            head_dim=head_dim,
            num_blocks=num_blocks,
            kv_block_size=kv_block_size,
            dtype=p.dtype,
            device=p.device,
            sliding_window=free_window,
            max_chunk=self.prefill_chunk,
            mask_windows=windows,
        )
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.adapters = adapter_names(model)  # LoRA adapters a request may name (multi-LoRA)
        self.prompt_adapters = prompt_adapter_names(model)  # soft prompts (prompt tuning) likewise

        self._lock = threading.Lock()  # guards the queue, the running list and the block pool
        self._wake = threading.Condition(self._lock)
        self._model_lock = threading.Lock()  # one forward at a time (engine step or prompt_logprobs)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._drain = True
        self.counters = {
            "requests_finished": 0,
            "tokens_generated": 0,
            "steps": 0,
            "prefill_tokens": 0,
            "prefill_forwards": 0,
        }

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the background loop (idempotent); returns self."""
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine was shut down; create a new Engine")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llmkit-engine", daemon=True)
                self._thread.start()
                _LIVE_ENGINES.add(self)
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Reject new requests; with `drain` finish the queued and running ones, else abort them."""
        with self._lock:
            self._closed = True
            self._drain = drain
            self._wake.notify_all()
            thread = self._thread
        if thread is None:
            if drain and self._waiting:  # never started: run the queue to completion now
                self._thread = thread = threading.Thread(target=self._run, name="llmkit-engine", daemon=True)
                thread.start()
            else:
                self._abort_all()
                return
        thread.join(timeout)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown(drain=exc[0] is None)

    # ---- requests -----------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> RequestHandle:
        """Queue a request; raises `QueueFullError` when `max_queue` requests already wait and
        `InputError` for bad ids or when prompt + max_new_tokens exceed `max_seq_len`.
        `adapter` names a LoRA adapter of the model (None: the base model); requests for
        different adapters share the running batch."""
        ids = self._check_ids(prompt_ids)
        virtual = self._virtual_prefix(adapter)
        params = dataclasses.replace(params) if params is not None else SamplingParams()
        params.validate(self.config.vocab_size)
        if params.stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer: pass tokenizer= to Engine or use stop_token_ids")
        need = len(virtual) + len(ids) + params.max_new_tokens
        if need > self.max_seq_len:
            raise InputError(
                f"prompt ({need - params.max_new_tokens} tokens) + max_new_tokens ({params.max_new_tokens}) = {need} "
                f"exceeds the "
                f"context of {self.max_seq_len} tokens; shorten the prompt or lower max_new_tokens"
            )
        if self.cache.blocks_to_reserve(need) > self.cache.num_blocks:
            raise InputError(
                f"a request of {need} tokens needs more KV blocks than the pool has ({self.cache.num_blocks})"
            )
        seq_id = next(self._ids)
        handle = RequestHandle(self, request_id or f"req-{seq_id}", ids, params)
        seq = _Sequence(handle, seq_id, self.eos_token_ids, self.tokenizer, virtual)
        seq.adapter = adapter
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shutting down and accepts no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"the request queue is full ({self.max_queue} waiting, {len(self._running)} running); retry later"
                )
            self._waiting.append(seq)
            self._wake.notify()
        return handle

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[GenerationResult]:
        """Submit every prompt at once and wait for all results (starts the engine if needed)."""
        self.start()
        handles = [self.submit(p, params) for p in prompts]
        return [h.result() for h in handles]

    @torch.inference_mode()
    def prompt_logprobs(
        self, prompt_ids: list[int], top_n: int = 0, adapter: str | None = None
    ) -> list[tuple[float | None, list | None]]:
        """log p(token_i | tokens_<i) for every prompt token, with the top-N (token_id, logprob)
        alternatives at each position; position 0 has no prefix and gets (None, None)."""
        ids = self._check_ids(prompt_ids)
        virtual = self._virtual_prefix(adapter)
        n_virtual, ids = len(virtual), virtual + ids
        if len(ids) > self.max_seq_len:
            raise InputError(f"prompt has {len(ids)} tokens but the context is {self.max_seq_len}")
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with self._model_lock, self._routed([adapter], x):
            logits = self.model(x)[0].float()  # [T, V]
        lp = torch.log_softmax(logits[:-1], dim=-1)  # [T-1, V]: prediction for token i+1
        target = x[0, 1:]
        chosen = lp.gather(1, target[:, None]).squeeze(1).tolist()
        out: list[tuple[float | None, list | None]] = [(None, None)]
        if top_n > 0:
            top_lp, top_ids = lp.topk(min(top_n, lp.shape[-1]), dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_lp.tolist())]
        else:
            tops = [[] for _ in chosen]
        out += list(zip(chosen, tops))
        return out[n_virtual:] if n_virtual else out  # a soft prompt's positions are not the caller's

    def stats(self) -> dict[str, int]:
        """Running and queued request counts, KV block usage and lifetime counters."""
        with self._lock:
            return {
                "running": len(self._running),
                "queued": len(self._waiting),
                "free_blocks": self.cache.num_free_blocks,
                "total_blocks": self.cache.num_blocks,
                "kv_block_size": self.cache.kv_block_size,
                "max_batch_size": self.max_batch_size,
                **self.counters,
            }

    # ---- internals ----------------------------------------------------------------------------
    def _virtual_prefix(self, adapter: str | None) -> list[int]:
        """Checks `adapter`; a soft prompt's virtual ids start its requests (none for LoRA or the base)."""
        if adapter is not None and adapter not in self.adapters + self.prompt_adapters:
            known = ", ".join(self.adapters + self.prompt_adapters) or "none loaded"
            raise InputError(f"unknown adapter {adapter!r}; this engine has: {known}")
        return virtual_prefix(self.model, adapter) if adapter in self.prompt_adapters else []

    @contextlib.contextmanager
    def _routed(self, adapters: list[str | None], x: torch.Tensor):
        """Route row b of `x` [B, T] through LoRA adapter adapters[b] (None: the base) for one forward."""
        if not self.adapters:
            yield
            return
        index = torch.tensor([self.adapters.index(a) if a in self.adapters else -1 for a in adapters],
                             device=x.device)
        route_tokens(self.model, index[:, None].expand(x.shape), self.adapters)
        try:
            yield
        finally:
            route_tokens(self.model, None, self.adapters)

    def _check_ids(self, prompt_ids: list[int]) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        try:
            ids = [int(t) for t in prompt_ids]
        except (TypeError, ValueError) as e:
            raise InputError(f"prompt_ids must be a list of ints, got {type(prompt_ids).__name__}") from e
        if not ids:
            raise InputError("prompt_ids is empty: expected at least one token id")
        check_token_ids(ids, self.config.vocab_size, what="prompt token id(s)")
        return ids

    def _cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            if handle._done or handle.finish_reason is not None:
                return
            handle._cancelled = True
            handle.finish_reason = "cancelled"
            for seq in self._waiting:
                if seq.handle is handle:
                    self._waiting.remove(seq)
                    break
            self._wake.notify()
        handle._push(_END)

    def _finish(self, seq: _Sequence, reason: str) -> None:
        """Remove a sequence from the batch and return its blocks (caller holds no lock)."""
        with self._lock:
            if seq in self._running:
                self._running.remove(seq)
            self.cache.free_sequence(seq.seq_id)
            self.counters["requests_finished"] += 1
        if seq.handle.finish_reason is None:
            seq.handle.finish_reason = reason
        seq.handle._push(_END)

    def _abort_all(self, error: BaseException | None = None) -> None:
        with self._lock:
            seqs = list(self._waiting) + list(self._running)
            self._waiting.clear()
            self._running.clear()
            for seq in seqs:
                self.cache.free_sequence(seq.seq_id)
        for seq in seqs:
            if seq.handle.finish_reason is None:
                seq.handle.finish_reason = "abort" if error is None else "error"
            seq.handle._push(error if error is not None else _END)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._waiting or self._running or self._closed):
                        self._wake.wait()
                    if self._closed and (not self._drain or not (self._waiting or self._running)):
                        break
                    # cancelled sequences leave the batch and free their blocks
                    for seq in [s for s in self._running if s.handle._cancelled]:
                        self._running.remove(seq)
                        self.cache.free_sequence(seq.seq_id)
                    admitted = self._admit()
                try:
                    with self._model_lock:
                        if admitted:
                            self._prefill(admitted)
                        if self._running:
                            self._decode_step()
                except Exception as e:  # a failed forward must not hang the callers
                    err = e if isinstance(e, LlmkitError) else LlmkitError(f"engine step failed: {e!r}")
                    with self._lock:
                        seqs = list(self._running)
                        self._running.clear()
                        for seq in seqs + admitted:
                            self.cache.free_sequence(seq.seq_id)
                    for seq in seqs + [s for s in admitted if s not in seqs]:
                        seq.handle.finish_reason = "error"
                        seq.handle._push(err)
        if not self._drain:
            self._abort_all()

    def _admit(self) -> list[_Sequence]:
        """Move queued requests into the batch while slots and KV blocks allow (FCFS, lock held)."""
        admitted = []
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            seq = self._waiting[0]
            need = seq.prompt_len + seq.handle.params.max_new_tokens
            if not self.cache.can_allocate(need):
                break  # wait for blocks; never skip the head of the queue (no starvation)
            self._waiting.popleft()
            self.cache.add_sequence(seq.seq_id, need)
            admitted.append(seq)
        return admitted

    def _forward(self, seqs: list[_Sequence], chunks: list[list[int]]) -> torch.Tensor:
        """Append `chunks[b]` to sequence b's cache; return the logits of each chunk's last token [B, V].

        Rows are right-padded by repeating their last token at its own position (see `PagedBatch`):
        that slot sees the same keys as the real last token, so every row's last slot holds the
        logits wanted and the padding is never written to the cache.
        """
        batch = self.cache.batch([s.seq_id for s in seqs], [len(c) for c in chunks])
        T = max(len(c) for c in chunks)
        x = torch.tensor([c + [c[-1]] * (T - len(c)) for c in chunks], dtype=torch.long, device=self.device)
        meta = batch.meta
        with self._routed([s.adapter for s in seqs], x):
            logits = self.model(x, position_ids=meta.position_ids, kv_cache=batch, attn_meta=meta,
                                num_logits_to_keep=1)
        logits = logits[:, -1]
        batch.commit()
        return logits.float()  # [B, V]

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Run the prompts of newly admitted sequences through the model, then sample their first tokens.

        Prompts go in chunks of at most `prefill_chunk` tokens; chunks of similar length share one
        padded forward (padding at most `PREFILL_PAD` of the real tokens).
        """
        with self._lock:
            for seq in [s for s in seqs if s.handle._cancelled]:
                self.cache.free_sequence(seq.seq_id)
        seqs = [s for s in seqs if not s.handle._cancelled]
        done: dict[int, torch.Tensor] = {}  # seq_id -> logits of the prompt's last token [V]
        pos = {s.seq_id: 0 for s in seqs}
        while pending := [s for s in seqs if pos[s.seq_id] < s.prompt_len]:
            chunks = {
                s.seq_id: s.tokens[pos[s.seq_id] : min(s.prompt_len, pos[s.seq_id] + self.prefill_chunk)]
                for s in pending
            }
            pending.sort(key=lambda s: len(chunks[s.seq_id]))
            groups: list[list[_Sequence]] = [[]]
            real = 0
            for s in pending:  # ascending length: the newest row sets the padded width
                n = len(chunks[s.seq_id])
                if groups[-1] and (len(groups[-1]) + 1) * n > PREFILL_PAD * (real + n):
                    groups.append([])
                    real = 0
                groups[-1].append(s)
                real += n
            for group in groups:
                logits = self._forward(group, [chunks[s.seq_id] for s in group])  # [B, V]
                self.counters["prefill_forwards"] += 1
                for b, s in enumerate(group):
                    pos[s.seq_id] += len(chunks[s.seq_id])
                    if pos[s.seq_id] == s.prompt_len:
                        done[s.seq_id] = logits[b]
        self.counters["prefill_tokens"] += sum(s.prompt_len for s in seqs)
        if seqs:
            with self._lock:
                self._running.extend(seqs)
            self._sample_and_emit(seqs, torch.stack([done[s.seq_id] for s in seqs]))

    def _decode_step(self) -> None:
        seqs = list(self._running)
        logits = self._forward(seqs, [[s.tokens[-1]] for s in seqs])
        self.counters["steps"] += 1
        self._sample_and_emit(seqs, logits)

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """One shared decode step (`sample_step`), then stream each row's event to its handle."""
        for seq, event in zip(seqs, sample_step(logits, seqs)):
            handle = seq.handle
            handle.token_ids.append(event.token_id)
            self.counters["tokens_generated"] += 1
            if handle._cancelled:
                continue
            handle.text += event.text
            if event.finish_reason is not None:
                handle.finish_reason = event.finish_reason  # before the event, so a late cancel() is a no-op
            handle._push(event)
            if event.finish_reason is not None:
                self._finish(seq, event.finish_reason)


# An engine thread killed mid-OpenMP at interpreter exit aborts the process ("terminate called
# without an active exception"), so engines nobody shut down are stopped before that.
_LIVE_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _stop_live_engines() -> None:
    for engine in list(_LIVE_ENGINES):
        engine.shutdown(drain=False, timeout=10)
