"""`samples.jsonl`: every prompt, response and score of a run, appended as it is produced.

A run that crashed resumes from it: records are keyed by `key` (task / perturbation / document id),
and a task asks `store.get(key)` before it computes a document again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmkit.eval.lm import dumps


class SampleStore:
    """Append-only JSONL of per-document records, keyed by `record["key"]`."""

    def __init__(self, path: str | Path, resume: bool = True):
        self.path = Path(path)
        self.done: dict[str, dict[str, Any]] = {}
        if resume and self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by the crash
                        continue
                    self.done[rec["key"]] = rec
        self.resumed = len(self.done)
        # rewrite the good records only, so a torn last line is gone before we append
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in self.done.values():
                f.write(dumps(rec) + "\n")
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        self.done[record["key"]] = record
        self._f.write(dumps(record) + "\n")
        self._f.flush()
        return record

    def close(self) -> None:
        self._f.close()
