"""Chat templates: render a Jinja chat template exactly as `transformers` does.

The template runs in jinja2's immutable sandbox with the helpers Hugging Face templates
expect (`raise_exception`, `tojson`, `strftime_now`) and the same whitespace rules
(`trim_blocks`, `lstrip_blocks`), so a template copied from a Hub `tokenizer_config.json`
renders the same string here and in `tokenizer.apply_chat_template`.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmkit.errors import InputError

# ChatML (https://github.com/openai/openai-python/blob/v0.28.1/chatml.md), the default for
# tokenizers trained by llmkit. Same text as the Qwen2 family's template without tools.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATML_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in a sandboxed Jinja environment with the Hugging Face helpers."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise InputError(f"chat template is not valid Jinja (line {e.lineno}): {e.message}") from None


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """Render `messages` (a list of {'role', 'content', ...} dicts) with `template`.

    Extra keyword arguments (`bos_token`, `eos_token`, `tools`, ...) become template variables.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise InputError(
            f"messages must be a list of dicts like {{'role': 'user', 'content': '...'}}, got {type(messages).__name__}"
        )
    kwargs.setdefault("tools", None)
    kwargs.setdefault("documents", None)
    try:
        return compile_chat_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"chat template failed to render: {e}") from None
