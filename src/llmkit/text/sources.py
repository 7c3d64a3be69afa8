"""Read documents lazily from text files, folders of them and JSONL files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import InputError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DOC_BOUNDARIES = ("file", "line", "blank-line")


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "path" or "path:line"


def expand_inputs(inputs: Iterable[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Files named in `inputs`; folders expand recursively to their text / JSONL files (sorted)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            if not found:
                raise InputError(f"folder {p} holds no text files (looked for {', '.join(suffixes)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"input {p} does not exist (expected a text file, a JSONL file or a folder)")
    if not files:
        raise InputError("no input files given")
    for f in files:
        if not os.access(f, os.R_OK):
            raise InputError(f"input file {f} is not readable (permission denied)")
    return files


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(f, start=1)
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None


def read_jsonl_records(path: str | os.PathLike, kind: str, expected: str) -> Iterator[tuple[dict[str, Any], str]]:
    """Yield (record, 'file:line') for each non-blank line of a JSONL file of objects; a missing or
    unreadable file, bad JSON or a non-object line is an InputError naming `kind`, the file, the line
    and what was `expected`. The one JSONL reader (SFT, preference, prompt, corpus, RAG and qrels files)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{kind} file {str(p)!r} does not exist (expected a JSONL file)")
    for lineno, line in _lines(p):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg}); {expected}") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: got a JSON {type(record).__name__}; {expected}")
        yield record, where


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    expected = f"expected an object with a text field {text_field!r} per line"
    for record, where in read_jsonl_records(path, "corpus", expected):
        if text_field not in record:
            raise InputError(f"{where} has no field {text_field!r} (found {sorted(record)}); choose the text field "
                             "with --text-field")
        text = record[text_field]
        if not isinstance(text, str):
            raise InputError(f"{where} field {text_field!r} is {type(text).__name__}, expected a string")
        yield Document(text, where)


def _text_documents(path: Path, boundary: str) -> Iterator[Document]:
    if boundary == "file":
        yield Document("".join(line for _, line in _lines(path)), str(path))
        return
    buf: list[str] = []
    start = 1
    for lineno, line in _lines(path):
        if boundary == "line":
            if line.strip():
                yield Document(line, f"{path}:{lineno}")
        elif line.strip():
            if not buf:
                start = lineno
            buf.append(line)
        elif buf:
            yield Document("".join(buf), f"{path}:{start}")
            buf = []
    if buf:
        yield Document("".join(buf), f"{path}:{start}")


def iter_documents(files: Iterable[Path], text_field: str = "text", doc_boundary: str = "file") -> Iterator[Document]:
    """Yield documents one at a time: a JSONL record's `text_field`, or a text file split by `doc_boundary`.

    `doc_boundary`: `file` (one document per text file), `line` (one per non-empty line) or `blank-line`
    (paragraphs); `line` and `blank-line` stream files of any size.
    """
    if doc_boundary not in DOC_BOUNDARIES:
        raise InputError(f"doc_boundary must be one of {DOC_BOUNDARIES}, got {doc_boundary!r}")
    for path in files:
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_documents(path, text_field)
        else:
            yield from _text_documents(path, doc_boundary)
