"""Continuous-batching generation engine (Orca-style iteration-level scheduling over a paged KV cache).

A background thread runs the loop. Every step the scheduler picks, within a token budget, one
token for every decoding sequence, then prefill chunks of sequences still reading their prompt,
then newly admitted requests; all of them run in ONE forward (mixed chunked prefill, Sarathi /
vLLM), so a long prompt never stalls the running streams. KV blocks are taken as sequences grow;
when the pool runs dry the newest sequence is preempted (its blocks released, recomputed later).
With prefix caching, prompts that start with blocks already cached (a shared system prompt, a
chat's history) prefill only their new tokens. Prompt scoring (`prompt_logprobs`) runs in the same
batch as a prefill-only request. Sequences leave the batch as soon as they finish or are cancelled.

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
import functools
import itertools
import threading
import weakref
from collections import deque
from typing import Any

import torch

from llmkit.errors import InputError, LlmkitError
from llmkit.infer.generate import eos_token_ids
from llmkit.infer.paged_cache import PagedBatch, PagedKVCache
from llmkit.infer.request import _END, GenerationResult, RequestHandle
from llmkit.infer.sampling import SamplingParams
from llmkit.infer.sequence import Sequence, TokenEvent, sample_step, speculative_step
from llmkit.infer.speculative import (
    SpeculativeConfig,
    draft_limit,
    make_proposer,
    rope_switch_length,
    speculative_config,
)
from llmkit.model.layers import check_token_ids
from llmkit.model.linear import set_decode_packing
from llmkit.model.lora import adapter_names, route_tokens
from llmkit.model.prompt_tuning import prompt_adapter_names, virtual_prefix

__all__ = ["Engine", "EngineClosedError", "GenerationResult", "QueueFullError", "RequestHandle", "TokenEvent"]

PACK_PAD = 1.25  # a padded [B, T] forward may compute at most this many tokens per real one, else pack rows
SCORING_CHUNK = 8  # default prompt-scoring tokens per step while other sequences decode (they keep their pace)


class QueueFullError(LlmkitError):
    """The engine's waiting queue is full; retry later (the server answers 429/503)."""


class EngineClosedError(LlmkitError):
    """The engine is shutting down (or shut down) and accepts no new requests."""


class _Sequence(Sequence):
    """Engine-thread state of one request: its `Sequence` plus the handle, KV-cache id and progress."""

    def __init__(self, handle: RequestHandle, seq_id: int, eos_token_ids: set[int], tokenizer: Any,
                 virtual: list[int] | None = None, decoder_start: int | None = None):
        # encoder-decoder: the prompt goes to the encoder; the decoder's sequence starts at its start token
        super().__init__([decoder_start] if decoder_start is not None else handle.prompt_ids, handle.params,
                         eos_token_ids, tokenizer)
        self.encoded: Any = None  # encoder-decoder: the prompt's EncoderOutput (cross-attention keys/values)
        self.handle, self.seq_id = handle, seq_id
        self.adapter: str | None = None  # adapter name: LoRA or soft prompt (None: the base model)
        self.n_virtual = len(virtual or [])  # a soft prompt's virtual ids run first, unseen by the caller
        if virtual:
            self.tokens[:0] = virtual
            self.prompt_len += len(virtual)
        self.num_computed = 0  # leading tokens whose keys/values are in the cache
        self.score_top: int | None = None  # a scoring request: top-N alternatives per prompt position
        self.scores: list[tuple[float | None, list | None]] = []

    @property
    def prefilling(self) -> bool:
        """Still reading its prompt (or recomputing after a preemption): more than one token to feed."""
        return len(self.tokens) - self.num_computed > 1 or self.score_top is not None


class Engine:
    """Continuous-batching generation over a paged KV cache, run by a background thread.

    `max_batch_size` sequences run together; up to `max_queue` more wait. `max_seq_len`
    (default: the model's context) bounds prompt + max_new_tokens. The KV pool has `num_blocks`
    blocks of `kv_block_size` tokens (default: a full batch at `max_seq_len`), taken as sequences
    grow. One step computes at most `max_num_batched_tokens` tokens (default `prefill_chunk`):
    every decoding sequence's next token first, then prompt chunks of at most `prefill_chunk`.
    Prompt scoring (`submit_scoring`) is background work: while other sequences decode it adds at
    most `scoring_chunk` tokens to a step, so a step costs its decode rows little more (on a CPU each
    token of a step is compute); alone it runs in `prefill_chunk` chunks.
    `prefix_caching` shares full KV blocks between prompts with a common prefix; `mixed_prefill`
    False runs prefill chunks in steps of their own (decoding waits, as before chunked prefill).
    `fast_decode` swaps the model's dense Linears for the packed-for-decode kind (`model/linear.py`).
    `speculative` ("ngram", a dict of `SpeculativeConfig` fields or a config) or `draft_model`
    (folder or model) turns on speculative decoding: a decoding row feeds its last token plus up to
    `num_speculative_tokens` proposed ones, verified in the step's forward (infer/speculative.py).
    An encoder-decoder model (T5) runs in the same loop: a request's prompt is encoded when it is first
    scheduled and the paged cache holds its decoder's keys/values (no prompt scoring, speculation or
    prefix caching for it).
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
        prefix_caching: bool = True,
        mixed_prefill: bool = True,
        max_num_batched_tokens: int | None = None,
        scoring_chunk: int = SCORING_CHUNK,
        speculative: SpeculativeConfig | dict | str | None = None,
        draft_model: Any = None,
        num_speculative_tokens: int | None = None,
    ):
        cfg = model.config
        # encoder-decoder (T5): a request's prompt is encoded once when it is first scheduled; the paged
        # cache holds the decoder's self-attention keys/values, each sequence its cross-attention ones
        self.seq2seq = bool(getattr(model, "is_encoder_decoder", False))
        if self.seq2seq and (speculative is not None or draft_model is not None):
            raise InputError(f"speculative decoding runs decoder-only models; {cfg.model_type} is an encoder-decoder")
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
        self.max_num_batched_tokens = int(max_num_batched_tokens or prefill_chunk)
        self.scoring_chunk = int(scoring_chunk)
        self.mixed_prefill = bool(mixed_prefill)
        self.fast_decode = fast_decode
        set_decode_packing(model, fast_decode)
        if min(self.prefill_chunk, kv_block_size, self.max_num_batched_tokens, self.scoring_chunk) < 1:
            raise InputError(f"prefill_chunk, kv_block_size, max_num_batched_tokens and scoring_chunk must be >= 1, "
                             f"got {prefill_chunk}, {kv_block_size}, {max_num_batched_tokens}, {scoring_chunk}")
        if num_blocks is None:
            num_blocks = self.max_batch_size * -(-self.max_seq_len // kv_block_size)
        windows = {cfg.window_for_layer(i) for i in range(cfg.n_layer)}
        # one window for all layers: blocks that leave it are released; mixed sliding/full layers keep all
        free_window = next(iter(windows)) if len(windows) == 1 else None
        p = next(model.parameters())
        self.device = p.device
        head_dim = getattr(cfg, "head_dim", None) or cfg.n_embd // cfg.n_head
        self.cache = PagedKVCache(
            n_layer=cfg.n_decoder_layer if self.seq2seq else cfg.n_layer,
            n_kv_head=cfg.n_kv_head or cfg.n_head,
            head_dim=head_dim,
            num_blocks=num_blocks,
            kv_block_size=kv_block_size,
            dtype=p.dtype,
            device=p.device,
            sliding_window=free_window,
            mask_windows=windows,
            prefix_caching=prefix_caching and not self.seq2seq,  # decoder keys depend on the encoder input
        )
        # rows packed into one forward share its RoPE variant; LongRoPE picks one per row. Encoder-decoder
        # rows decode one token each (their decoder prompt is the start token): padded rows, one encoder each
        self._can_pack = getattr(cfg, "rope_type", None) != "longrope" and not self.seq2seq
        self._encoder_batch: tuple[list[int], Any] | None = None  # (seq ids, EncoderOutput.cat of them)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.rope_switch = rope_switch_length(model)  # LongRoPE: rows crossing it are recomputed
        self.speculative = speculative_config(speculative, draft_model, num_speculative_tokens)
        self.proposer = None
        if self.speculative is not None:
            if self.speculative.num_speculative_tokens + 1 > self.max_num_batched_tokens:
                raise InputError("num_speculative_tokens + 1 must not exceed max_num_batched_tokens")
            self.proposer = make_proposer(self.speculative, model, self.max_seq_len, self.max_batch_size,
                                          fast_decode=fast_decode)
        self.spec_accepted_per_pos = [0] * (self.speculative.num_speculative_tokens if self.speculative else 0)
        self.adapters = adapter_names(model)  # LoRA adapters a request may name (multi-LoRA)
        self.prompt_adapters = prompt_adapter_names(model)  # soft prompts (prompt tuning) likewise

        self._lock = threading.Lock()  # guards the queue, the running list and the block pool
        self._wake = threading.Condition(self._lock)
        self._model_lock = threading.Lock()  # one forward at a time
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # in admission order: the last one is preempted first
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
            "preemptions": 0,
            "spec_decode_num_drafts": 0,  # verification steps of a row with a draft (vLLM's names)
            "spec_decode_num_draft_tokens": 0,
            "spec_decode_num_accepted_tokens": 0,
        }

    @property
    def prefix_caching(self) -> bool:
        return self.cache.prefix_caching

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
        return_logprobs: bool = True,
    ) -> RequestHandle:
        """Queue a request; raises `QueueFullError` when `max_queue` requests already wait and
        `InputError` for bad ids or when prompt + max_new_tokens exceed `max_seq_len`.
        `adapter` names a LoRA adapter or a soft prompt of the model (None: the base model); requests
        for different adapters share the running batch. `return_logprobs=False`: the events carry no
        log-probability unless `params.logprobs` asks for them (None; the step skips a log-sum-exp)."""
        ids = self._check_ids(prompt_ids)
        virtual = self._virtual_prefix(adapter)
        params = dataclasses.replace(params) if params is not None else SamplingParams()
        params.validate(self.config.vocab_size)
        if params.stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer: pass tokenizer= to Engine or use stop_token_ids")
        if self.seq2seq:  # the encoder reads the prompt; the decoder holds the start token + the new tokens
            if len(ids) > self.max_seq_len:
                raise InputError(f"prompt has {len(ids)} tokens but the encoder's context is {self.max_seq_len}; "
                                 "shorten the prompt")
            return self._enqueue(ids, params, request_id, adapter, 1 + params.max_new_tokens, None, virtual,
                                 return_logprobs)
        need = len(virtual) + len(ids) + params.max_new_tokens
        if need > self.max_seq_len:
            raise InputError(
                f"prompt ({need - params.max_new_tokens} tokens) + max_new_tokens ({params.max_new_tokens}) = {need} "
                f"exceeds the "
                f"context of {self.max_seq_len} tokens; shorten the prompt or lower max_new_tokens"
            )
        return self._enqueue(ids, params, request_id, adapter, need, None, virtual, return_logprobs)

    def submit_scoring(
        self, prompt_ids: list[int], top_n: int = 0, request_id: str | None = None, adapter: str | None = None
    ) -> RequestHandle:
        """Queue a prefill-only request that scores its prompt (see `prompt_logprobs`); it runs in
        the continuous batch and counts against `max_queue`. When the handle is done,
        `handle.prompt_logprobs` holds the result."""
        ids = self._check_ids(prompt_ids)
        if self.seq2seq:
            raise InputError(f"prompt scoring (echo, prompt_logprobs) needs a decoder-only model; "
                             f"{self.config.model_type} is an encoder-decoder")
        virtual = self._virtual_prefix(adapter)
        if len(virtual) + len(ids) > self.max_seq_len:
            raise InputError(f"prompt has {len(virtual) + len(ids)} tokens but the context is {self.max_seq_len}")
        return self._enqueue(ids, SamplingParams(max_new_tokens=1), request_id, adapter, len(virtual) + len(ids),
                             int(top_n), virtual)

    def _enqueue(self, ids: list[int], params: SamplingParams, request_id: str | None, adapter: str | None,
                 need: int, score_top: int | None, virtual: list[int], return_logprobs: bool = True
                 ) -> RequestHandle:
        if self.max_blocks_held(need) > self.cache.num_blocks:
            raise InputError(
                f"a request of {need} tokens needs more KV blocks than the pool has ({self.cache.num_blocks})"
            )
        seq_id = next(self._ids)
        handle = RequestHandle(self, request_id or f"req-{seq_id}", ids, params)
        seq = _Sequence(handle, seq_id, self.eos_token_ids, self.tokenizer, virtual,
                        decoder_start=self._decoder_start() if self.seq2seq else None)
        seq.adapter, seq.score_top = adapter, score_top
        seq.return_logprobs = return_logprobs or params.logprobs is not None
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

    def max_blocks_held(self, n_tokens: int) -> int:
        """Most KV blocks a sequence of `n_tokens` tokens holds at once (a sliding window releases
        blocks that left it; one step appends at most `prefill_chunk` tokens)."""
        n = self.cache.blocks_needed(n_tokens)
        w = self.cache.sliding_window
        if w is not None:
            n = min(n, self.cache.blocks_needed(w - 1 + self.prefill_chunk) + 1)
        return n

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[GenerationResult]:
        """Submit every prompt at once and wait for all results (starts the engine if needed)."""
        self.start()
        handles = [self.submit(p, params) for p in prompts]
        return [h.result() for h in handles]

    def prompt_logprobs(
        self, prompt_ids: list[int], top_n: int = 0, adapter: str | None = None
    ) -> list[tuple[float | None, list | None]]:
        """log p(token_i | tokens_<i) for every prompt token, with the top-N (token_id, logprob)
        alternatives at each position; position 0 has no prefix and gets (None, None).
        Runs as a prefill-only request in the engine's batch (starts the engine if needed)."""
        self.start()
        handle = self.submit_scoring(prompt_ids, top_n, adapter=adapter)
        for _ in handle:  # no events: ends when scored (raises if the engine failed)
            pass
        if handle.prompt_logprobs is None:
            raise LlmkitError(f"scoring was {handle.finish_reason} before it finished")
        return handle.prompt_logprobs

    def stats(self) -> dict[str, int]:
        """Running and queued request counts, KV block usage, prefix-cache and lifetime counters."""
        with self._lock:
            return {
                "running": len(self._running),
                "queued": len(self._waiting),
                "scoring_running": sum(s.score_top is not None for s in self._running),
                "scoring_queued": sum(s.score_top is not None for s in self._waiting),
                "free_blocks": self.cache.num_free_blocks,
                "total_blocks": self.cache.num_blocks,
                "kv_block_size": self.cache.kv_block_size,
                "max_batch_size": self.max_batch_size,
                "prefix_cache_queries": self.cache.prefix_queries,
                "prefix_cache_hits": self.cache.prefix_hits,
                "prefix_cache_blocks": len(self.cache.pool.cached),
                **self.counters,
                "spec_decode_num_accepted_tokens_per_pos": list(self.spec_accepted_per_pos),
            }

    # ---- internals ----------------------------------------------------------------------------
    def _virtual_prefix(self, adapter: str | None) -> list[int]:
        """Checks `adapter`; a soft prompt's virtual ids start its requests (none for LoRA or the base)."""
        if adapter is not None and adapter not in self.adapters + self.prompt_adapters:
            known = ", ".join(self.adapters + self.prompt_adapters) or "none loaded"
            raise InputError(f"unknown adapter {adapter!r}; this engine has: {known}")
        return virtual_prefix(self.model, adapter) if adapter in self.prompt_adapters else []

    @contextlib.contextmanager
    def _routed(self, adapters: list[str | None], x: torch.Tensor, rows: torch.Tensor | None = None):
        """Route the tokens of `x` [B, T] through LoRA adapters for one forward: row b through
        adapters[b] (None: the base), or with `rows` [T] (a packed row) token t through adapters[rows[t]]."""
        if not self.adapters:
            yield
            return
        index = torch.tensor([self.adapters.index(a) if a in self.adapters else -1 for a in adapters], device=x.device)
        per_token = index[rows][None, :] if rows is not None else index[:, None].expand(x.shape)
        route_tokens(self.model, per_token, self.adapters)
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
                    self.cache.free_sequence(seq.seq_id)  # a preempted sequence may hold none; no-op
                    break
            self._wake.notify()
        handle._push(_END)

    def _finish(self, seq: _Sequence, reason: str) -> None:
        """Remove a sequence from the batch and release its blocks (caller holds no lock)."""
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
                    # cancelled sequences leave the batch and release their blocks
                    for seq in [s for s in self._running if s.handle._cancelled]:
                        self._running.remove(seq)
                        self.cache.free_sequence(seq.seq_id)
                    scheduled = self._schedule()
                    if not scheduled:
                        self._wake.wait(0.05)  # nothing fits now (e.g. only cancelled work): look again
                        continue
                try:
                    with self._model_lock:
                        self._step(scheduled)
                except Exception as e:  # a failed forward must not hang the callers
                    err = e if isinstance(e, LlmkitError) else LlmkitError(f"engine step failed: {e!r}")
                    with self._lock:
                        seqs = list(self._running)
                        self._running.clear()
                        for seq in seqs:
                            self.cache.free_sequence(seq.seq_id)
                    for seq in seqs:
                        seq.handle.finish_reason = "error"
                        seq.handle._push(err)
        if not self._drain:
            self._abort_all()

    # ---- scheduling -----------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[_Sequence, int]]:
        """Pick this step's work (lock held): [(sequence, tokens to compute)].

        Decoding sequences (oldest first) get one token each; sequences still reading their prompt
        get chunks of at most `prefill_chunk` within the `max_num_batched_tokens` budget; then queued
        requests are admitted (FCFS) while batch slots, budget and KV blocks allow. A sequence whose
        blocks cannot be found preempts the newest running one. Without `mixed_prefill` a step
        with prefill work runs only prefill. Prompt scoring is background work: one scoring request
        runs at a time (generation requests queued behind it go first), in chunks of `scoring_chunk`
        while other sequences decode.
        """
        budget = self.max_num_batched_tokens
        taken = 0  # blocks promised to this step's rows
        out: list[tuple[_Sequence, int]] = []
        prefill_only = not self.mixed_prefill and (
            any(s.prefilling for s in self._running) or (self._waiting and len(self._running) < self.max_batch_size)
        )
        decode = [s for s in self._running if not s.prefilling]
        prefill = [s for s in self._running if s.prefilling]
        streaming = bool(decode) and not prefill_only

        def cap(seq: _Sequence) -> int:  # prompt scoring is background work: small chunks while streams decode
            return self.scoring_chunk if seq.score_top is not None and streaming else self.prefill_chunk

        for seq in ([] if prefill_only else decode) + prefill:
            if seq not in self._running:  # preempted by an older sequence of this step
                continue
            if self._crosses_rope_switch(seq):  # recompute the whole sequence with LongRoPE's long factors
                self.cache.free_sequence(seq.seq_id)
                self.cache.add_sequence(seq.seq_id, None, seq.adapter)
                seq.num_computed = 0
                n = len(seq.tokens)  # one forward: a chunk of it would still get the short factors
            elif not seq.prefilling:  # its last token, plus the proposed ones to verify
                n = 1 + (draft_limit(seq, self.speculative.num_speculative_tokens, self.model)
                         if self.proposer is not None else 0)
            else:
                n = min(len(seq.tokens) - seq.num_computed, cap(seq), budget)
            if n <= 0:
                continue
            while self.cache.blocks_to_append(seq.seq_id, n) > self.cache.num_free_blocks - taken:
                victim = self._running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                taken += self.cache.blocks_to_append(seq.seq_id, n)
                budget -= n
                out.append((seq, n))
        scoring = any(s.score_top is not None for s in self._running)
        i = 0
        while i < len(self._waiting) and len(self._running) < self.max_batch_size and budget > 0:
            if out and not self.mixed_prefill and not prefill_only:
                break  # decode step: prefill waits for a step of its own
            seq = self._waiting[i]
            if seq.score_top is not None and scoring:
                i += 1  # one scoring request at a time; generation requests go ahead of the others
                continue
            cached = self.cache.add_sequence(seq.seq_id, seq.tokens, seq.adapter, lookup=seq.score_top is None)
            n = min(len(seq.tokens) - cached, cap(seq), budget)
            if self.cache.blocks_to_append(seq.seq_id, n) > self.cache.num_free_blocks - taken:
                self.cache.free_sequence(seq.seq_id)  # wait for blocks; never skip a generation request
                break
            del self._waiting[i]
            seq.num_computed = cached
            self._running.append(seq)
            scoring = scoring or seq.score_top is not None
            taken += self.cache.blocks_to_append(seq.seq_id, n)
            budget -= n
            out.append((seq, n))
        return out

    def _crosses_rope_switch(self, seq: _Sequence) -> bool:
        """True when a decoding row's next token sits at a LongRoPE model's original context length
        (transformers then recomputes the whole sequence with the long factors; so does the engine)."""
        n = self.rope_switch
        return (n is not None and not seq.prefilling and seq.score_top is None and seq.prompt_len <= n
                and len(seq.tokens) == n + 1)

    def _preempt(self, seq: _Sequence) -> None:
        """Release a running sequence's blocks and requeue it first; it is recomputed (its prompt and
        generated tokens prefilled again, cached blocks reused) when readmitted (lock held)."""
        self._running.remove(seq)
        self.cache.free_sequence(seq.seq_id)
        seq.num_computed = 0
        seq.scores = []
        self._waiting.appendleft(seq)
        self.counters["preemptions"] += 1

    # ---- one forward --------------------------------------------------------------------------
    def _step(self, scheduled: list[tuple[_Sequence, int]]) -> None:
        """One forward over every scheduled row, then sample the rows that reached their last token
        and score the scoring rows' positions."""
        seqs = [s for s, _ in scheduled]
        drafts, qs = self._propose(scheduled)
        chunks = [s.tokens[s.num_computed : s.num_computed + (1 if d or n > 1 and not s.prefilling else n)] + d
                  for (s, n), d in zip(scheduled, drafts)]
        N, B, T = sum(len(c) for c in chunks), len(chunks), max(len(c) for c in chunks)
        scoring = [s.score_top is not None for s in seqs]
        keep_all = [sc or bool(d) for sc, d in zip(scoring, drafts)]  # scoring and verified rows: every position
        packed = self._can_pack and (any(keep_all) or B * T > PACK_PAD * N)
        with self._lock:  # blocks come from the shared pool
            batch = self.cache.batch([s.seq_id for s in seqs], chunks, packed=packed)
        logits, row_of = self._forward(seqs, batch, keep_all)
        with self._lock:
            batch.commit()
        self.counters["steps"] += 1
        # prompt tokens computed (again, after a preemption); not the prefix-cache hits
        self.counters["prefill_tokens"] += sum(
            max(0, min(s.prompt_len, s.num_computed + len(c)) - s.num_computed) for s, c in zip(seqs, chunks)
        )
        self.counters["prefill_forwards"] += int(any(s.prefilling for s in seqs))
        to_sample, rows = [], []
        verify = [b for b, d in enumerate(drafts) if d]
        for b, (seq, chunk) in enumerate(zip(seqs, chunks)):
            if drafts[b]:
                continue
            if scoring[b]:
                self._score(seq, logits[row_of[b] : row_of[b] + len(chunk)], chunk)
            seq.num_computed += len(chunk)
            if seq.num_computed == len(seq.tokens):
                if scoring[b]:
                    seq.handle.prompt_logprobs = seq.scores[seq.n_virtual:]  # not a soft prompt's positions
                    self._finish(seq, "length")
                else:
                    to_sample.append(seq)
                    rows.append(row_of[b] + len(chunk) - 1)
        if to_sample:
            self._sample_and_emit(to_sample, logits if rows == list(range(len(logits))) else logits[rows])
        if verify:
            self._verify([seqs[b] for b in verify], [logits[row_of[b] : row_of[b] + len(chunks[b])] for b in verify],
                         [drafts[b] for b in verify], [qs[b] for b in verify])

    def _propose(self, scheduled: list[tuple[_Sequence, int]]) -> tuple[list[list[int]], list]:
        """Speculative decoding: the draft of each decoding row scheduled for more than one token."""
        drafts: list[list[int]] = [[] for _ in scheduled]
        qs: list = [None for _ in scheduled]
        rows = [b for b, (s, n) in enumerate(scheduled) if self.proposer is not None and n > 1 and not s.prefilling]
        if self.proposer is not None:
            self.proposer.retain([s.seq_id for s in self._running])
        if rows:
            d, q = self.proposer.propose([scheduled[b][0] for b in rows], [scheduled[b][0].seq_id for b in rows],
                                         [scheduled[b][1] - 1 for b in rows])
            for i, b in enumerate(rows):
                drafts[b] = d[i]
                qs[b] = q[i] if q is not None else None
        return drafts, qs

    def _verify(self, seqs: list[_Sequence], logits: list[torch.Tensor], drafts: list[list[int]], qs: list) -> None:
        """Keep each row's accepted draft prefix plus one token of the model's (`speculative_step`),
        roll the rejected tokens out of the KV cache and stream the kept ones."""
        events, accepted = speculative_step(logits, drafts, qs, seqs)
        with self._lock:
            for seq in seqs:
                seq.num_computed = len(seq.tokens) - 1  # keys of its last token are not computed yet
                self.cache.rollback(seq.seq_id, seq.num_computed)
        for d, n in zip(drafts, accepted):
            self.counters["spec_decode_num_drafts"] += 1
            self.counters["spec_decode_num_draft_tokens"] += len(d)
            self.counters["spec_decode_num_accepted_tokens"] += n
            for i in range(n):
                self.spec_accepted_per_pos[i] += 1
        self._emit(seqs, events)

    def _forward(self, seqs: list[_Sequence], batch: PagedBatch, scoring: list[bool]) -> tuple[torch.Tensor, list[int]]:
        """Run the model on `batch`; return logits [K, V] and where row b's logits start in them
        (the last token of each row; every token of a scoring row or of a row verifying a draft)."""
        x = batch.input_ids()
        meta = batch.meta
        model = self.model if not self.seq2seq else functools.partial(self._decode, seqs)
        if batch.packed:
            keep, row_of = [], []
            start = 0
            for q, sc in zip(batch.q_lens, scoring):
                row_of.append(len(keep) - (q - 1 if not sc else 0))
                keep += list(range(start, start + q)) if sc else [start + q - 1]
                start += q
            keep_t = torch.tensor(keep, dtype=torch.long, device=self.device)
            tok_rows = torch.repeat_interleave(torch.arange(len(seqs), device=self.device),
                                               torch.tensor(batch.q_lens, device=self.device))
            with self._routed([s.adapter for s in seqs], x, tok_rows):
                logits = model(x, position_ids=meta.position_ids, kv_cache=batch, attn_meta=meta,
                               num_logits_to_keep=keep_t)
            return logits[0].float(), row_of
        if any(scoring):  # padded rows that keep every position: [B, T, V] flattened, row b at b * T
            with self._routed([s.adapter for s in seqs], x):
                logits = model(x, position_ids=meta.position_ids, kv_cache=batch, attn_meta=meta)
            B, T = logits.shape[:2]
            return logits.reshape(B * T, -1).float(), [b * T for b in range(B)]
        with self._routed([s.adapter for s in seqs], x):
            logits = model(x, position_ids=meta.position_ids, kv_cache=batch, attn_meta=meta,
                           num_logits_to_keep=1)
        # row b's last real token sits in the last slot (padding repeats it at its own position)
        return logits[:, -1].float(), [b - (len(c) - 1) for b, c in enumerate(batch.chunks)]

    # ---- encoder-decoder ------------------------------------------------------------------------
    def _decoder_start(self) -> int:
        start = self.config.decoder_start_token_id
        return int(start if start is not None else self.config.pad_token_id or 0)

    def _decode(self, seqs: list[_Sequence], x: torch.Tensor, position_ids: torch.Tensor, kv_cache: PagedBatch,
                attn_meta: Any, num_logits_to_keep: int = 0) -> torch.Tensor:
        """The decoder's forward for the engine's rows: sequences scheduled for the first time are
        encoded (one batch), then every row attends to its own encoder output."""
        new = [s for s in seqs if s.encoded is None]
        if new:
            for s, enc in zip(new, self.model.encode_each([s.handle.prompt_ids for s in new])):
                s.encoded = enc
        ids = [s.seq_id for s in seqs]
        if self._encoder_batch is None or self._encoder_batch[0] != ids:  # the batch changed: re-stack
            self._encoder_batch = (ids, type(seqs[0].encoded).cat([s.encoded for s in seqs]))
        return self.model.decode(x, self._encoder_batch[1], kv_cache=kv_cache, attn_meta=attn_meta,
                                 num_logits_to_keep=num_logits_to_keep)

    def _score(self, seq: _Sequence, logits: torch.Tensor, chunk: list[int]) -> None:
        """Prompt log-probs from one chunk's logits [q, V]: position i predicts token i + 1."""
        start = seq.num_computed
        if start == 0:
            seq.scores = [(None, None)]
        lp = torch.log_softmax(logits, dim=-1)
        targets = seq.tokens[start + 1 : start + 1 + len(chunk)]  # the last position predicts nothing
        lp = lp[: len(targets)]
        if not targets:
            return
        chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None]).squeeze(1).tolist()
        if seq.score_top:
            top_lp, top_ids = lp.topk(min(seq.score_top, lp.shape[-1]), dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_lp.tolist())]
        else:
            tops = [[] for _ in chosen]
        seq.scores += list(zip(chosen, tops))

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """One shared decode step (`sample_step`), then stream each row's event to its handle."""
        self._emit(seqs, [[event] for event in sample_step(logits, seqs)])

    def _emit(self, seqs: list[_Sequence], events: list[list[TokenEvent]]) -> None:
        """Stream each row's new events to its handle; finished rows leave the batch."""
        for seq, row in zip(seqs, events):
            handle = seq.handle
            for event in row:
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
