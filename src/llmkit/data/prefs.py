"""Alignment data: preference pairs (`prompt`, `chosen`, `rejected`) and RL prompts (`prompt` + any fields).

Preference JSONL is trl's layout: `prompt` is a string or a list of chat messages; `chosen` and
`rejected` are strings or lists of assistant messages. Each side is rendered with the tokenizer's
chat template and masked as in SFT (`encode_example`): only the completion's tokens carry labels.
RL prompt JSONL has `prompt` (string or messages) or a chat `messages` list (a trailing assistant
turn is dropped: it is the reference answer); every other field is passed to the reward function.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.data.sft import IGNORE, ROLES, SFTExample, chat_ids, encode_example
from llmkit.errors import InputError
from llmkit.text.sources import read_jsonl_records

PREF_EXPECTED = ('expected one JSON object per line: {"prompt": str | [messages], "chosen": str | [assistant '
                 'messages], "rejected": str | [assistant messages]}')
PROMPT_EXPECTED = 'expected one JSON object per line with "prompt" (a string or chat messages) or "messages"'


@dataclass
class PrefPair:
    """One tokenized preference pair; `index` is its position in the data (for precomputed values)."""

    chosen: SFTExample
    rejected: SFTExample
    index: int = 0
    margin: float = 0.0  # the line's optional "margin" (reward-model loss, as Llama 2)


@dataclass
class PromptRecord:
    """One RL prompt: its chat messages, the rendered prompt ids, and the line's other fields."""

    messages: list[dict[str, Any]]
    prompt_ids: list[int]
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The last user message (what a reward function usually needs)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def _messages(value: Any, where: str, key: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: {key!r} must be a string or a non-empty list of chat messages")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: {key!r} message {j} needs a 'role' in {', '.join(ROLES)} and a string "
                             f"'content', got {m!r:.80}")
    return value


def _completion(value: Any, where: str, key: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    msgs = _messages(value, where, key)
    if msgs[-1]["role"] != "assistant":
        raise InputError(f"{where}: {key!r} must end with an assistant message")
    return msgs


def read_prefs(path: str | Path) -> Iterator[tuple[list[dict], list[dict], list[dict], float, str]]:
    """Yield (prompt messages, chosen messages, rejected messages, margin, 'file:line') per pair."""
    n = 0
    for record, where in read_jsonl_records(path, "preference data", PREF_EXPECTED):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
        if missing:
            raise InputError(f"{where}: missing {', '.join(map(repr, missing))}; {PREF_EXPECTED}")
        prompt = _messages(record["prompt"], where, "prompt")
        margin = record.get("margin", 0.0)
        if not isinstance(margin, int | float) or margin != margin:
            raise InputError(f"{where}: 'margin' must be a number, got {margin!r:.40}")
        yield (prompt, _completion(record["chosen"], where, "chosen"),
               _completion(record["rejected"], where, "rejected"), float(margin), where)
        n += 1
    if not n:
        raise InputError(f"preference data file {str(path)!r} is empty; {PREF_EXPECTED}")


def load_prefs(paths: str | Path | list, tokenizer: Any, max_seq_len: int) -> tuple[list[PrefPair], int]:
    """Tokenized pairs (prompt masked) and how many sides were truncated to `max_seq_len`."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    pairs: list[PrefPair] = []
    truncated = 0
    for path in paths:
        for prompt, chosen, rejected, margin, where in read_prefs(path):
            sides = []
            for msgs in (prompt + chosen, prompt + rejected):
                ex = encode_example(tokenizer, msgs)
                if len(ex.input_ids) > max_seq_len:
                    truncated += 1
                    ex = SFTExample(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])
                if all(label == IGNORE for label in ex.labels[1:]):
                    raise InputError(f"{where}: no completion token is left within --max-seq-len {max_seq_len}; "
                                     "expected a larger --max-seq-len or a shorter prompt")
                sides.append(ex)
            pairs.append(PrefPair(sides[0], sides[1], len(pairs), margin))
    return pairs, truncated


def load_prompts(path: str | Path, tokenizer: Any, max_prompt_len: int | None = None) -> list[PromptRecord]:
    """RL prompts rendered with the chat template's generation prompt; other fields kept in `row`."""
    out: list[PromptRecord] = []
    for record, where in read_jsonl_records(path, "prompt data", PROMPT_EXPECTED):
        if "prompt" in record:
            msgs = _messages(record["prompt"], where, "prompt")
        elif "messages" in record:
            msgs = _messages(record["messages"], where, "messages")
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if not msgs:
                raise InputError(f"{where}: 'messages' holds no prompt before the assistant turn")
        else:
            raise InputError(f"{where}: keys {sorted(record)}: {PROMPT_EXPECTED}")
        row = {k: v for k, v in record.items() if k != "prompt"}
        ids = chat_ids(tokenizer, msgs, True)
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            raise InputError(f"{where}: the prompt has {len(ids)} tokens, more than --max-prompt-len "
                             f"{max_prompt_len}")
        out.append(PromptRecord(msgs, ids, row))
    if not out:
        raise InputError(f"prompt data file {str(path)!r} is empty; {PROMPT_EXPECTED}")
    return out
