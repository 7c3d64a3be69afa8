"""What every task gets: the model, the run's options, the sample store and the input perturbation."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import InputError


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a clear error names the bad line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; expected a JSONL file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not valid JSON ({e.msg}); expected one JSON object per line") from e
    return rows


def require(row: dict[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}; expected {', '.join(keys)}")


def load_predictions(path: str | Path) -> dict[str, list[str]]:
    """`--predictions FILE`: JSONL rows with `task_id` or `id`, and `completion`; several rows = several samples."""
    preds: dict[str, list[str]] = {}
    for i, row in enumerate(read_jsonl(path)):
        key = row.get("task_id", row.get("id"))
        if key is None or "completion" not in row:
            raise InputError(f"{path} row {i + 1}: expected `task_id` (or `id`) and `completion` fields")
        preds.setdefault(str(key), []).append(str(row["completion"]))
    return preds


@dataclass
class TaskContext:
    """Options and services shared by the tasks of one run."""

    lm: Any  # LocalLM | APILM | None (when only --predictions are scored)
    store: Any  # SampleStore
    limit: int | None = None
    num_fewshot: int | None = None
    stride: int | None = None
    samples: int = 1
    predictions: dict[str, list[str]] | None = None
    judge: Any = None  # eval.judge.Judge | None
    perturb: Callable[[str], str] | None = None
    tag: str = ""  # the perturbation's name ("" = clean inputs)
    progress: bool = True
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def key(self, task: str, doc_id: Any) -> str:
        return f"{task}|{self.tag}|{doc_id}"

    def text(self, s: str) -> str:
        """The input text as this pass sees it (perturbed in a robustness pass)."""
        return self.perturb(s) if self.perturb else s

    def limited(self, rows: list[Any]) -> list[Any]:
        return rows[: self.limit] if self.limit else rows

    def need_lm(self, task: str) -> Any:
        if self.lm is None:
            raise InputError(f"task {task} needs a model: pass --model DIR or --base-url URL")
        return self.lm

    def generate(self, task: str, ids: Sequence[str], prompts: Sequence[str], **kw: Any) -> list[list[str]]:
        """Completions per document: from --predictions when given (by id), else from the model."""
        if self.predictions is not None:
            out = []
            for i in ids:
                if str(i) not in self.predictions:
                    raise InputError(f"--predictions has no completion for {task} id {i!r}")
                out.append(self.predictions[str(i)])
            return out
        return self.need_lm(task).generate(list(prompts), progress=self.progress, **kw)
