"""Request bodies of the OpenAI-compatible API (pydantic), with the OpenAI defaults.

Unknown fields are ignored, as OpenAI does. A few vLLM-style extras (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `stop_token_ids`) are accepted too. Types are strict, as
OpenAI's are: `"5"` or `true` is not an integer, `1.0` is not a token id. Every string must be
valid Unicode (no lone surrogates such as a JSON `"\\ud800"`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_STOP_STRINGS = 16  # stop strings per request (OpenAI allows 4)
MAX_STOP_CHARS = 256  # characters per stop string
MAX_LOGIT_BIAS = 300  # logit_bias entries per request
INT64 = 2**63
_TOKEN_ID = re.compile(r"0|[1-9][0-9]*")


def _lone_surrogate(v: Any) -> str | None:
    """The first lone surrogate in any string inside `v` (dict keys too), else None."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            return v[e.start]
        return None
    if isinstance(v, dict):
        v = [*v.keys(), *v.values()]
    if isinstance(v, list | tuple):
        for x in v:
            if (bad := _lone_surrogate(x)) is not None:
                return bad
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, v: Any, info: ValidationInfo) -> Any:
        bad = _lone_surrogate(v)
        if bad is not None:
            raise ValueError(f"text contains a lone surrogate (U+{ord(bad):04X}); expected valid Unicode (UTF-8)")
        return v


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=-INT64, le=INT64 - 1)
    user: str | None = None
    # extras (vLLM names)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(
                f"at most {MAX_STOP_STRINGS} stop sequences of at most {MAX_STOP_CHARS} characters each "
                f"(got {len(stops)}, the longest {max(len(s) for s in stops)} characters)"
            )
        return stops or None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries (got {len(v)})")
        for k, b in v.items():
            if not _TOKEN_ID.fullmatch(k):
                raise ValueError(f"logit_bias keys must be token ids written as decimal integers (got {k!r})")
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100] (got {b})")
        return v


PromptType = list[int] | list[list[int]] | str | list[str]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    max_tokens: int | None = Field(default=None, ge=0)  # None: the rest of the context (as vLLM)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's shape)


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # role "tool": the call this result answers

    def as_dict(self) -> dict[str, Any]:
        """The message as a chat-template dict (tokenizer/tool_calls.py's shapes)."""
        m: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name:
            m["name"] = self.name
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        return m

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class JsonSchemaFormat(_Request):
    name: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # vLLM's guided decoding extras
    guided_choice: list[str] | None = None
    guided_regex: str | None = None
    rag: bool | dict | None = None  # retrieval from --rag-store (serve/rag.py)
    # tool calling (checked in serve/tools.py: tokenizer/tool_calls.validate_tools)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True


class EmbeddingRequest(_Request):
    model: str
    input: list[int] | list[list[int]] | str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class TokenizeRequest(_Request):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    model: str | None = None


class DetokenizeRequest(_Request):
    tokens: list[int]
    model: str | None = None
