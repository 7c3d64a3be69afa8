"""What every endpoint needs: the engine, tokenizer, limits, metrics; plus shared request helpers."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmkit.infer.sampling import SamplingParams
from llmkit.serve.errors import APIError
from llmkit.serve.metrics import ServerMetrics

PROMPT_CHARS_PER_TOKEN = 32  # a text prompt longer than (context + 2) * this is checked on a prefix first
INLINE_CHARS = 4096  # request text up to this size is tokenized on the event loop (tens of microseconds)


async def off_loop(size: int, fn: Any, *args: Any) -> Any:
    """`fn(*args)` for a request with `size` characters of text: right here when that is small (a
    thread hop costs more than tokenizing a short prompt), else in a worker thread so a large or
    hostile request never blocks the event loop."""
    if size <= INLINE_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def text_size(value: Any) -> int:
    """Characters (or token ids) of a request field: a string, token ids, or lists/dicts/request models
    (a chat message's text parts) of them."""
    if isinstance(value, str):
        return len(value)
    if hasattr(value, "model_dump"):
        return text_size(value.model_dump())
    if isinstance(value, dict):
        return sum(text_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(text_size(v) for v in value)
    return 1 if isinstance(value, int) else 0  # a token id


@dataclass
class ServerLimits:
    """What one client may ask of the server (docs/serving.md, "Limits and security").

    Sizes are bytes, times seconds. `max_connections` caps open connections plus running
    requests (uvicorn's limit_concurrency: 503 beyond it). `graceful_timeout` is how long a
    SIGTERM waits for in-flight requests; those still running are then answered with an error.
    """

    max_body_bytes: int = 4 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_connections: int | None = 1024
    graceful_timeout: float | None = 30.0
    enable_docs: bool = False


@dataclass
class ServerState:
    """One served model (and optionally an embedding model) with the server's limits.

    `engine` is None when the main model is an encoder (embeddings only). `max_tokens` caps
    max_tokens per request (None: the context); `request_timeout` is seconds per request.
    """

    engine: Any | None
    tokenizer: Any | None
    model_name: str
    max_seq_len: int
    embedder: Any | None = None
    embedding_model_name: str | None = None
    api_key: str | None = None
    rag: Any | None = None  # an llmkit.rag.service.RagService for --rag-store (serve/rag.py)
    max_tokens: int | None = None
    request_timeout: float | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    created: int = field(default_factory=lambda: int(time.time()))
    adapters: list[str] = field(default_factory=list)  # LoRA adapters served beside the base (multi-LoRA)
    metrics: ServerMetrics = field(default=None)  # type: ignore[assignment]
    shutdown_deadline: float | None = None  # set at SIGTERM: in-flight requests are cut off then
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False)  # token_text's cache

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = ServerMetrics(self.stats if self.engine is not None else None)

    def stats(self) -> dict[str, int]:
        """The engine's stats; `running` and `queued` count prompt scoring too (it runs in the batch)."""
        return self.engine.stats() if self.engine is not None else {}

    def admit(self, k: int, param: str = "n") -> None:
        """Admission control for a request of `k` sequences: 400 (naming `param`) if it can never
        be queued, 429 (retry later) if the queue cannot take it now."""
        cap = self.engine.max_queue
        if k > cap:
            raise APIError(
                f"this request needs {k} sequences (prompts x n) but the server queues at most {cap} at once "
                f"(--max-queue); lower n or send fewer prompts per request",
                400,
                param=param,
            )
        queued = self.engine.stats()["queued"]
        if queued + k > cap:
            raise APIError(
                f"the request queue is full ({queued} of {cap} waiting); retry later",
                429,
                code="queue_full",
                headers={"Retry-After": "1"},
            )

    def check_shutdown(self) -> None:
        """503 once the shutdown deadline has passed (see `begin_shutdown`)."""
        if self.shutdown_deadline is not None and time.monotonic() > self.shutdown_deadline:
            raise APIError(
                "the server is shutting down and its graceful timeout ran out before this request finished; "
                "retry on another replica or later",
                503,
                code="shutting_down",
            )

    def begin_shutdown(self) -> None:
        """SIGTERM arrived: requests still running just before the graceful timeout get a 503."""
        grace = self.limits.graceful_timeout
        if grace is not None and self.shutdown_deadline is None:
            self.shutdown_deadline = time.monotonic() + max(grace - min(1.0, grace / 4), 0.0)

    def model_names(self) -> list[str]:
        names = [self.model_name, *self.adapters] if self.engine is not None else []
        if self.embedder is not None:
            names.append(self.embedding_model_name or self.model_name)
        return names

    def require_generator(self, name: str) -> str | None:
        """The LoRA adapter `name` selects (None: the base model); 404 unless it is served here."""
        if self.engine is not None and name in self.adapters:
            return name
        if self.engine is None or name != self.model_name:
            hint = (
                f"; this server generates with '{self.model_name}'"
                if self.engine is not None
                else ("; this server only serves embeddings")
            )
            if self.embedder is not None and name == (self.embedding_model_name or self.model_name):
                raise APIError(
                    f"model '{name}' is an embedding model: use /v1/embeddings{hint}",
                    400,
                    param="model",
                    code="model_not_supported",
                )
            raise APIError(f"the model '{name}' does not exist{hint}", 404, param="model", code="model_not_found")
        return None

    def deadline(self) -> float | None:
        return time.monotonic() + self.request_timeout if self.request_timeout else None

    def check_context(self, prompt_len: int, max_tokens: int | None, echo_only: bool = False) -> int:
        """Validate prompt length + max_tokens against the context; return the max_tokens to use.

        `max_tokens=None` means "as many as fit" (capped by the server's --max-tokens).
        """
        ctx = self.max_seq_len
        if prompt_len == 0:
            raise APIError("the prompt is empty: expected at least one token", 400, param="prompt")
        room = ctx - prompt_len
        if prompt_len > ctx or (room <= 0 and not echo_only):
            raise APIError(
                f"this model's maximum context length is {ctx} tokens, but the prompt has "
                f"{prompt_len} tokens (leaving no room to generate); shorten the prompt",
                400,
                param="messages/prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = room if self.max_tokens is None else min(room, self.max_tokens)
            return max_tokens
        if self.max_tokens is not None and max_tokens > self.max_tokens:
            raise APIError(
                f"max_tokens={max_tokens} exceeds this server's limit of {self.max_tokens} tokens per request",
                400,
                param="max_tokens",
            )
        if prompt_len + max_tokens > ctx:
            raise APIError(
                f"this model's maximum context length is {ctx} tokens, but you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                f"completion); reduce the prompt or max_tokens",
                400,
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt. A text far longer than the context is rejected after
        tokenizing a prefix only, so a megabyte prompt costs milliseconds, not seconds."""
        cap = (self.max_seq_len + 2) * PROMPT_CHARS_PER_TOKEN
        if len(text) > cap:
            head = self.tokenizer.encode(text[:cap], add_special_tokens=add_special_tokens)
            if len(head) > self.max_seq_len + 1:  # cutting the text changes at most one token
                raise APIError(
                    f"this model's maximum context length is {self.max_seq_len} tokens, but the prompt has more "
                    f"than {len(head) - 1} tokens ({len(text)} characters); shorten the prompt",
                    400,
                    param="messages/prompt",
                    code="context_length_exceeded",
                )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of one token, as the `tokens` / `top_logprobs` keys show it (cached: an echo
        request's logprobs name thousands of tokens, built on the event loop)."""
        text = self._token_texts.get(token_id)
        if text is None:
            token_id = int(token_id)
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)
            self._token_texts[token_id] = text
        return text


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sampling_params(req: Any, max_new_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
    """SamplingParams from an OpenAI request's fields; choice j of n draws with seed + j."""
    bias = {int(k): float(v) for k, v in req.logit_bias.items()} if req.logit_bias else None
    temperature = 1.0 if req.temperature is None else req.temperature
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=max(req.top_k, 0),
        top_p=1.0 if req.top_p is None else req.top_p,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=None if req.seed is None else _choice_seed(req.seed, choice),
        logit_bias=bias,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        logprobs=logprobs,
        ignore_eos=req.ignore_eos,
    )


def _choice_seed(seed: int, choice: int) -> int:
    """seed + choice, wrapped into the signed 64-bit range."""
    return (seed + choice + 2**63) % 2**64 - 2**63


def check_token_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(
            f"token id {bad[0]} in '{param}' is out of range: expected 0 <= id < {vocab_size}",
            400,
            param=param,
        )


def check_logit_bias(req: Any, vocab_size: int) -> None:
    for k in req.logit_bias or {}:
        if not 0 <= int(k) < vocab_size:
            raise APIError(
                f"logit_bias token id {k} is out of range: expected 0 <= id < {vocab_size}",
                400,
                param="logit_bias",
            )
