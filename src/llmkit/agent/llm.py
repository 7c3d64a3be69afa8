"""The model an agent talks to: a local model folder (llmkit's one generation loop) or an OpenAI-compatible
endpoint (the `openai` client). Both answer `chat(messages, tools=None, stop=None) -> Reply`.

Tool calls go through `tokenizer/tool_calls.py` for local models (the same rendering and parser the
server uses: tools rendered the way the chat template expects, the reply parsed in its family's format)
and through the API's `tools` / `tool_calls` fields for endpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import InputError
from llmkit.infer.generate import Generator, eos_token_ids, make_params
from llmkit.tokenizer.chat_template import CHATML_TEMPLATE
from llmkit.tokenizer.tool_calls import detect_format, parse_tool_calls, prepare_chat, template_knows_tools


@dataclass
class Reply:
    """One model turn: its text, the tool calls it made (OpenAI dicts), and token counts."""

    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


class LocalChat:
    """A model folder (or a loaded model + tokenizer) driven through `infer/`'s generation loop."""

    def __init__(self, model: Any, tokenizer: Any = None, max_tokens: int = 256, temperature: float = 0.0,
                 seed: int | None = 0, chat_template: str | None = None):
        from llmkit.model.hf import load_model
        from llmkit.tokenizer import load_tokenizer

        self.name = str(model) if isinstance(model, str | Path) else type(model).__name__
        if isinstance(model, str | Path):
            if not Path(model).is_dir():
                raise InputError(f"--model {model!r} is not a model folder (expected a folder with config.json)")
            tokenizer = tokenizer or load_tokenizer(model)
            model = load_model(model)
        if tokenizer is None:
            raise InputError("a loaded model needs its tokenizer: LocalChat(model, tokenizer)")
        self.model, self.tokenizer = model, tokenizer
        self.template = chat_template or tokenizer.chat_template or CHATML_TEMPLATE
        self.format = detect_format(self.template)
        # function calling when the template renders tools, or is llmkit's ChatML (its documented default
        # is the hermes format, what `llmkit finetune` teaches); other templates get ReAct text
        self.native_tools = template_knows_tools(self.template) or self.template == CHATML_TEMPLATE
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed

    def encode(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids: the conversation (tool calls and results included) with the assistant turn opened."""
        msgs, extra = prepare_chat(messages, tools, self.template)
        return self.tokenizer.encode_chat(msgs, True, chat_template=self.template, **extra)

    def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
        return len(self.encode(messages, tools))

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
             stop: list[str] | None = None, max_tokens: int | None = None) -> Reply:
        ids = self.encode(messages, tools)
        limit = getattr(self.model.config, "block_size", None)
        max_new = max_tokens or self.max_tokens
        if limit is not None:
            if len(ids) >= limit:
                raise InputError(f"the agent's prompt is {len(ids)} tokens, the model's context is {limit}; "
                                 "lower --max-steps or set a short-term memory budget (--context-budget)")
            max_new = min(max_new, limit - len(ids))
        sampling = {"temperature": self.temperature}
        if self.temperature > 0 and self.seed is not None:
            sampling["seed"] = self.seed
        params = make_params(None, max_new_tokens=max_new, stop=stop or None, **sampling)
        params = params.validate(self.model.config.vocab_size)
        gen = Generator(self.model, [ids], [params], eos_token_ids(self.model, self.tokenizer),
                        tokenizer=self.tokenizer)
        text, n, finish = [], 0, None
        for (event,) in gen:
            if event is None:
                break
            n += 1
            text.append(event.text)
            if event.finish_reason is not None:
                finish = event.finish_reason
                break
        out = "".join(text)
        content, calls = parse_tool_calls(out, self.format) if tools else (out, [])
        return Reply(content or "", calls, len(ids), n, "tool_calls" if calls else finish)

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "model": self.name, "tool_format": self.format}


class RemoteChat:
    """An OpenAI-compatible `/v1/chat/completions` endpoint (e.g. `llmkit serve`), through the `openai` client."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, seed: int | None = 0, timeout: float = 120.0):
        try:
            import openai
        except ImportError:
            raise InputError("--base-url needs the openai package: pip install openai") from None
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=1)
        self.errors = (openai.APIError,)
        if model is None:
            try:
                models = self.client.models.list().data
            except openai.APIError as e:
                raise InputError(f"cannot list models at {base_url}: {e}") from None
            if not models:
                raise InputError(f"{base_url} serves no model; pass --served-model")
            model = models[0].id
        self.base_url, self.name = base_url, model
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.last_prompt_tokens = 0

    def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
        """An estimate (4 characters a token); the server reports the exact count after each call."""
        return sum(len(json.dumps(m)) for m in messages) // 4 + (len(json.dumps(tools)) // 4 if tools else 0)

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
             stop: list[str] | None = None, max_tokens: int | None = None) -> Reply:
        kw: dict[str, Any] = {"model": self.name, "messages": messages, "max_tokens": max_tokens or self.max_tokens,
                              "temperature": self.temperature}
        if self.seed is not None:
            kw["seed"] = self.seed
        if tools:
            kw["tools"] = tools
        if stop:
            kw["stop"] = stop
        try:
            r = self.client.chat.completions.create(**kw)
        except self.errors as e:
            raise InputError(f"the endpoint {self.base_url} refused the request: {e}") from None
        choice = r.choices[0]
        calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                               "arguments": c.function.arguments}}
                 for c in choice.message.tool_calls or []]
        usage = r.usage
        return Reply(choice.message.content or "", calls, usage.prompt_tokens if usage else 0,
                     usage.completion_tokens if usage else 0, choice.finish_reason)

    def describe(self) -> dict[str, Any]:
        return {"kind": "endpoint", "base_url": self.base_url, "model": self.name}


def chat_model(model_or_url: Any, tokenizer: Any = None, **kw: Any) -> Any:
    """A `LocalChat` for a folder or loaded model, a `RemoteChat` for an http(s) URL; anything with a
    `chat` method is used as it is."""
    if hasattr(model_or_url, "chat") and not hasattr(model_or_url, "forward"):
        return model_or_url
    if isinstance(model_or_url, str) and model_or_url.startswith(("http://", "https://")):
        kw.pop("chat_template", None)
        return RemoteChat(model_or_url, **kw)
    kw.pop("model", None)
    kw.pop("api_key", None)
    return LocalChat(model_or_url, tokenizer, **kw)
