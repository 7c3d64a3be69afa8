"""Supervised fine-tuning data: JSONL in chat, Alpaca or prompt/completion form -> masked token ids.

Every record becomes a list of chat messages and is rendered with the tokenizer's chat template
(ChatML when it has none). The loss covers assistant tokens only (each assistant turn, its
end-of-turn token included) unless `train_on_prompt`. Masking is found by rendering prefixes:
the tokens an assistant turn adds after the generation prompt are exactly what the model must
produce at inference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import InputError
from llmkit.text.sources import read_jsonl_records
from llmkit.tokenizer.chat_template import CHATML_TEMPLATE
from llmkit.tokenizer.tool_calls import prepare_chat

IGNORE = -100  # the label of a token the loss skips (PyTorch's cross_entropy ignore_index)
FORMATS = ("chat", "alpaca", "prompt_completion")
ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass
class SFTExample:
    """One tokenized example: ids and labels of the same length (labels IGNORE where not trained)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class Seq2SeqExample(SFTExample):
    """An encoder-decoder example: `input_ids` feed the encoder, `labels` are the decoder's targets
    (every one trained, ending with EOS)."""


@dataclass
class SFTDataset:
    """Tokenized examples plus what happened on the way (for the closing report)."""

    examples: list[SFTExample]
    truncated: int = 0  # examples cut to max_seq_len
    dropped: int = 0  # examples with no trained token left after truncation
    formats: dict[str, str] = field(default_factory=dict)  # file -> detected format

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


# ---------------------------------------------------------------------------- reading


def detect_format(record: dict[str, Any]) -> str | None:
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


_EXPECTED = ('expected one JSON object per line: {"messages": [{"role": ..., "content": ...}, ...]}, '
             '{"instruction": ..., "input": ..., "output": ...} or {"prompt": ..., "completion": ...}')


def to_messages(record: dict[str, Any], fmt: str, where: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra template variables such as `tools`) of one record in format `fmt`."""
    if fmt == "chat":
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise InputError(f"{where}: message {j} needs a 'role' in {', '.join(ROLES)}, got {m!r:.80}")
            c = m.get("content")
            if not (isinstance(c, str) or (c is None and m.get("tool_calls"))):
                raise InputError(f"{where}: message {j} needs a string 'content' (or tool_calls), got {c!r:.80}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise InputError(f"{where}: the conversation has no assistant message to train on")
        extra = {"tools": record["tools"]} if record.get("tools") else {}
        return msgs, extra
    if fmt == "alpaca":
        ins, inp, out = record.get("instruction"), record.get("input") or "", record.get("output")
        if not isinstance(ins, str) or not isinstance(inp, str) or not isinstance(out, str):
            raise InputError(f"{where}: 'instruction', 'input' and 'output' must be strings")
        user = f"{ins}\n\n{inp}" if inp else ins
        return [{"role": "user", "content": user}, {"role": "assistant", "content": out}], {}
    p, c = record.get("prompt"), record.get("completion")
    if not isinstance(p, str) or not isinstance(c, str):
        raise InputError(f"{where}: 'prompt' and 'completion' must be strings")
    return [{"role": "user", "content": p}, {"role": "assistant", "content": c}], {}


def read_sft_jsonl(path: str | Path) -> Iterator[tuple[list[dict[str, Any]], dict[str, Any], str, str]]:
    """Yield (messages, extra, format, 'file:line') per record; the format is fixed by the first record."""
    fmt = None
    for record, where in read_jsonl_records(path, "SFT data", _EXPECTED):
        this = detect_format(record)
        if this is None:
            raise InputError(f"{where}: keys {sorted(record)} match no format; {_EXPECTED}")
        if fmt is None:
            fmt = this
        elif this != fmt:
            raise InputError(f"{where}: a {this} record in a {fmt} file; expected every line in one format")
        msgs, extra = to_messages(record, fmt, where)
        yield msgs, extra, fmt, where
    if fmt is None:
        raise InputError(f"SFT data file {str(Path(path))!r} is empty; {_EXPECTED}")


# ---------------------------------------------------------------------------- tokenizing


def chat_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, **kw: Any) -> list[int]:
    """Token ids of a chat rendered with the tokenizer's chat template (ChatML when it has none);
    message contents are encoded as plain text, so no example can forge a turn (`encode_chat`)."""
    template = tokenizer.chat_template or CHATML_TEMPLATE
    # tools / tool_calls / tool messages rendered the way the template expects (tokenizer/tool_calls.py)
    messages, extra = prepare_chat(messages, kw.pop("tools", None), template)
    return tokenizer.encode_chat(messages, add_generation_prompt, chat_template=template, **kw, **extra)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_example(
    tokenizer: Any, messages: list[dict[str, Any]], train_on_prompt: bool = False, **kw: Any
) -> SFTExample:
    """Token ids of the whole chat and labels on the assistant turns (IGNORE elsewhere)."""
    ids = chat_ids(tokenizer, messages, False, **kw)
    if train_on_prompt:
        return SFTExample(ids, list(ids))
    labels = [IGNORE] * len(ids)
    space = _whitespace_ids(tokenizer)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _common_prefix(chat_ids(tokenizer, messages[:i], True, **kw), ids) if i else 0
        end = _common_prefix(chat_ids(tokenizer, messages[: i + 1], False, **kw), ids)
        while end > start and ids[end - 1] in space:  # the newline a template puts after end-of-turn
            end -= 1
        labels[start:end] = ids[start:end]
    return SFTExample(ids, labels)


def encode_seq2seq_example(tokenizer: Any, messages: list[dict[str, Any]]) -> Seq2SeqExample:
    """Encoder-decoder: the text of the turns before the last assistant message (joined by newlines,
    no chat template) is the encoder's input; that message plus EOS is the decoder's target."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if tokenizer.eos_token_id is None:
        raise InputError("an encoder-decoder target ends with EOS but the tokenizer has no eos_token")
    prompt = "\n".join(m.get("content") or "" for m in messages[:last])
    target = tokenizer.encode(messages[last].get("content") or "", add_special_tokens=False)
    return Seq2SeqExample(tokenizer.encode(prompt), target + [tokenizer.eos_token_id])


def _whitespace_ids(tokenizer: Any) -> set[int]:
    cache = tokenizer.__dict__.setdefault("_llmkit_ws_ids", None)
    if cache is None:
        cache = {i for s in ("\n", "\n\n", " ", "\t") for i in tokenizer.encode(s, add_special_tokens=False)
                 if tokenizer.decode([i]).strip() == ""}
        tokenizer.__dict__["_llmkit_ws_ids"] = cache
    return cache


def load_sft_data(
    paths: str | Path | list[str | Path], tokenizer: Any, max_seq_len: int, train_on_prompt: bool = False,
    seq2seq: bool = False,
) -> SFTDataset:
    """Read and tokenize JSONL files; examples longer than `max_seq_len` are truncated and counted.
    `seq2seq`: `Seq2SeqExample`s for an encoder-decoder (`encode_seq2seq_example`; each side truncated)."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    ds = SFTDataset([])
    for path in paths:
        for msgs, extra, fmt, _where in read_sft_jsonl(path):
            ds.formats[str(path)] = fmt
            if seq2seq:
                ex = encode_seq2seq_example(tokenizer, msgs)
                if not ex.input_ids:
                    raise InputError(f"{_where}: the prompt is empty; an encoder-decoder needs encoder input")
                if max(len(ex.input_ids), len(ex.labels)) > max_seq_len:
                    ds.truncated += 1
                    ex = Seq2SeqExample(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])
                ds.examples.append(ex)
                continue
            ex = encode_example(tokenizer, msgs, train_on_prompt, **extra)
            if len(ex.input_ids) > max_seq_len:
                ds.truncated += 1
                ex = SFTExample(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])
            if all(label == IGNORE for label in ex.labels[1:]):
                ds.dropped += 1
                continue
            ds.examples.append(ex)
    if not ds.examples:
        raise InputError(f"no trainable example in {', '.join(map(str, paths))} (all {ds.dropped} lost their "
                         "assistant tokens to truncation); expected a larger --max-seq-len")
    return ds


# ---------------------------------------------------------------------------- batching


def collate(examples: list[SFTExample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded next-token batch: input_ids, targets [B, T] (targets IGNORE on prompt and padding).
    `Seq2SeqExample`s: input_ids + attention_mask [B, S] for the encoder, targets [B, T] for the decoder."""
    if isinstance(examples[0], Seq2SeqExample):
        S, T = max(len(e.input_ids) for e in examples), max(len(e.labels) for e in examples)
        x = torch.full((len(examples), S), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), S), dtype=torch.long)
        y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            x[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, : len(e.input_ids)] = 1
            y[i, : len(e.labels)] = torch.tensor(e.labels)
        return {"input_ids": x, "attention_mask": mask, "targets": y}
    T = max(len(e.input_ids) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids) - 1
        x[i, :n] = torch.tensor(e.input_ids[:-1])
        y[i, :n] = torch.tensor(e.labels[1:])
    return {"input_ids": x, "targets": y}


def pack_rows(examples: list[SFTExample], max_seq_len: int) -> list[list[SFTExample]]:
    """Greedy first-fit packing in the given order: rows of examples with at most max_seq_len - 1 inputs each."""
    rows: list[list[SFTExample]] = []
    used: list[int] = []
    for e in examples:
        n = len(e.input_ids) - 1
        for r, u in enumerate(used):
            if u + n <= max_seq_len:
                rows[r].append(e)
                used[r] += n
                break
        else:
            rows.append([e])
            used.append(n)
    return rows


def collate_packed(rows: list[list[SFTExample]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Packed batch: examples side by side in a row, positions restarting at 0 for each, and
    segment_ids [B, T] (k for the row's k-th example, -1 padding): attention stays inside a segment."""
    T = max(sum(len(e.input_ids) - 1 for e in row) for row in rows)
    B = len(rows)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        c = 0
        for k, e in enumerate(row):
            n = len(e.input_ids) - 1
            x[b, c : c + n] = torch.tensor(e.input_ids[:-1])
            y[b, c : c + n] = torch.tensor(e.labels[1:])
            pos[b, c : c + n] = torch.arange(n)
            seg[b, c : c + n] = k
            c += n
    return {"input_ids": x, "targets": y, "position_ids": pos, "segment_ids": seg}


class SFTBatches:
    """Shuffled epochs of batches, resumable: `state_dict()` holds (epoch, batch index)."""

    def __init__(self, examples: list[SFTExample], batch_size: int, max_seq_len: int, packing: bool, seed: int,
                 pad_id: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.examples, self.batch_size, self.max_seq_len = examples, batch_size, max_seq_len
        self.packing, self.seed, self.pad_id = packing, seed, pad_id
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = [self.examples[i] for i in torch.randperm(len(self.examples), generator=g).tolist()]
        units = pack_rows(order, self.max_seq_len) if self.packing else [[e] for e in order]
        step = self.batch_size * self.world_size
        return [units[i : i + step] for i in range(0, len(units), step)]

    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        units = self._batches[self.index]
        self.index += 1
        mine = units[self.rank :: self.world_size] or units[:1]
        if self.packing:
            return collate_packed(mine, self.pad_id)
        return collate([u[0] for u in mine], self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._batches = self._epoch_batches(self.epoch)
