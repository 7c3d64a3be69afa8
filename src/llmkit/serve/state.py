"""What every endpoint needs: the engine, tokenizer, limits, metrics; plus shared request helpers."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmkit.infer.sampling import SamplingParams
from llmkit.serve.errors import APIError
from llmkit.serve.metrics import ServerMetrics


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
    rag: Any | None = None  # serve/rag.py: RagServer for --rag-store
    max_tokens: int | None = None
    request_timeout: float | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: ServerMetrics = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = ServerMetrics(self.engine.stats if self.engine is not None else None)

    def model_names(self) -> list[str]:
        names = [self.model_name] if self.engine is not None else []
        if self.embedder is not None:
            names.append(self.embedding_model_name or self.model_name)
        return names

    def require_generator(self, name: str) -> None:
        """404 unless `name` is the generative model served here."""
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

    def token_text(self, token_id: int) -> str:
        """The text of one token, as the `tokens` / `top_logprobs` keys show it."""
        return self.tokenizer.decode([int(token_id)]) if self.tokenizer is not None else str(token_id)


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
        seed=None if req.seed is None else req.seed + choice,
        logit_bias=bias,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        logprobs=logprobs,
        ignore_eos=req.ignore_eos,
    )


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
