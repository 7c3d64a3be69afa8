"""Multiple choice by log-likelihood: MMLU / C-Eval / CMMLU CSV folders and a JSONL layout.

A question's score for each choice is log p(choice | prompt) (lm-eval's convention: the choice
follows the prompt after a target delimiter). `acc` takes the argmax, `acc_norm` the argmax of
log-likelihood / number of characters of the choice (lm-eval's acc_norm). Per subject, micro
(over questions) and macro (over subjects) averages.

Layouts:
- CSV (`question,A,B,C,D,answer`, with or without a header; C-Eval's `id` and `explanation`
  columns and CMMLU's capitalised header are recognised), one file per subject, in a folder with
  `test/` (or `val/`) and `dev/` subfolders, or flat `{subject}_test.csv` / `{subject}_dev.csv`.
  The dev split gives the few-shot examples.
- JSONL: `question`, `choices` (list of strings), `label` (index, letter or the choice text);
  rows with `"split": "dev"` are few-shot examples.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.errors import InputError
from llmkit.eval.context import TaskContext, read_jsonl, require

LETTERS = "ABCDEFGHIJ"


@dataclass
class Question:
    id: str
    subject: str
    question: str
    choices: list[str]
    label: int


def _label(value: Any, choices: list[str], where: str) -> int:
    if isinstance(value, bool):
        raise InputError(f"{where}: label {value!r} is not an index, a letter or a choice")
    if isinstance(value, int):
        idx = value
    elif isinstance(value, str) and value.strip().isdigit():
        idx = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        idx = LETTERS.index(value.strip().upper())
    elif isinstance(value, str) and value in choices:
        idx = choices.index(value)
    else:
        raise InputError(f"{where}: label {value!r} is not an index, a letter or one of the choices")
    if not 0 <= idx < len(choices):
        raise InputError(f"{where}: label {value!r} is out of range for {len(choices)} choices")
    return idx


def read_csv_subject(path: Path, subject: str) -> list[Question]:
    """One subject's CSV (MMLU without header; C-Eval / CMMLU with one)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows:
        return []
    head = [c.strip().lower() for c in rows[0]]
    if "question" in head:
        col = {name: head.index(name) for name in head}
        letters = [c for c in "abcdefghij" if c in col]
        if "answer" not in col or len(letters) < 2:
            raise InputError(f"{path}: header {rows[0]} lacks answer/A/B columns; expected question,A,B,C,D,answer")
        items = [(r[col["question"]], [r[col[c]] for c in letters], r[col["answer"]]) for r in rows[1:]]
    else:
        if len(rows[0]) < 4:
            raise InputError(f"{path}: rows have {len(rows[0])} columns; expected question,A,B,C,D,answer")
        items = [(r[0], r[1:-1], r[-1]) for r in rows]
    out = []
    for i, (q, choices, ans) in enumerate(items):
        if not str(ans).strip():  # e.g. C-Eval's unlabelled test split
            continue
        out.append(Question(f"{subject}/{i}", subject, q, choices, _label(ans, choices, f"{path} row {i + 1}")))
    return out


def _subject_of(path: Path) -> str:
    stem = path.stem
    for suf in ("_test", "_val", "_dev"):
        if stem.endswith(suf):
            return stem[: -len(suf)]
    return stem


def load_csv_tasks(path: str | Path) -> tuple[list[Question], dict[str, list[Question]]]:
    """(evaluation questions of every subject, few-shot pool per subject) from a CSV file or folder."""
    path = Path(path)
    if path.is_file():
        return read_csv_subject(path, _subject_of(path)), {}
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder; expected MMLU/C-Eval-style CSVs")
    evald = next((path / d for d in ("test", "val") if (path / d).is_dir()), path)
    files = sorted(f for f in evald.glob("*.csv") if not f.stem.endswith("_dev"))
    if not files:
        raise InputError(f"{path}: no CSV files found; expected test/{{subject}}_test.csv or {{subject}}.csv")
    devd = path / "dev" if (path / "dev").is_dir() else path
    questions, dev = [], {}
    for f in files:
        subject = _subject_of(f)
        questions += read_csv_subject(f, subject)
        dev_file = devd / f"{subject}_dev.csv"
        if dev_file.is_file():
            dev[subject] = read_csv_subject(dev_file, subject)
    return questions, dev


def load_jsonl_task(path: str | Path) -> tuple[list[Question], dict[str, list[Question]]]:
    questions, dev = [], {}
    for i, row in enumerate(read_jsonl(path)):
        where = f"{path} row {i + 1}"
        require(row, ["question", "choices", "label"], where)
        if not isinstance(row["choices"], list) or len(row["choices"]) < 2:
            raise InputError(f"{where}: `choices` must be a list of at least 2 strings")
        choices = [str(c) for c in row["choices"]]
        subject = str(row.get("subject", "all"))
        q = Question(
            str(row.get("id", i)), subject, str(row["question"]), choices, _label(row["label"], choices, where)
        )
        (dev.setdefault(subject, []) if row.get("split") == "dev" else questions).append(q)
    return questions, dev


# --- prompt formats ------------------------------------------------------------------------------
@dataclass
class Format:
    header: str  # with {subject}
    answer: str  # the cue after the options
    delimiter: str  # between the prompt and a choice
    lettered: bool  # choices are the letters A, B, ... (MMLU style) or the choice texts


FORMATS = {
    "mmlu": Format(
        "The following are multiple choice questions (with answers) about {subject}.\n\n", "Answer:", " ", True
    ),
    "ceval": Format("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "答案：", "", True),
    "jsonl": Format("", "", " ", False),
}


def _body(q: Question, fmt: Format, ctx: TaskContext | None) -> str:
    text = ctx.text(q.question) if ctx else q.question
    if not fmt.lettered:
        return text
    opts = "".join(f"\n{LETTERS[j]}. {c}" for j, c in enumerate(q.choices))
    return f"{text}{opts}\n{fmt.answer}"


def build_prompt(q: Question, shots: Sequence[Question], fmt: Format, ctx: TaskContext | None = None) -> str:
    """The few-shot prompt for `q` (the model then scores `delimiter + choice`)."""
    head = fmt.header.format(subject=q.subject.replace("_", " ")) if fmt.header else ""
    parts = []
    for s in shots:
        gold = LETTERS[s.label] if fmt.lettered else s.choices[s.label]
        parts.append(_body(s, fmt, None) + fmt.delimiter + gold)
    parts.append(_body(q, fmt, ctx))
    return head + "\n\n".join(parts)


def choices_of(q: Question, fmt: Format) -> list[str]:
    return [LETTERS[j] for j in range(len(q.choices))] if fmt.lettered else q.choices


def run(ctx: TaskContext, task: str, path: str | None) -> dict[str, dict[str, float]]:
    """Score the questions; returns {task: metrics, task/subject: metrics, ...}."""
    if path is None:
        raise InputError(f"task {task} needs data: --tasks {task}=PATH (a CSV folder or file, or a JSONL file)")
    p = Path(path)
    if p.suffix == ".jsonl":
        questions, dev = load_jsonl_task(p)
        fmt = FORMATS["jsonl"]
    else:
        questions, dev = load_csv_tasks(p)
        fmt = FORMATS["ceval" if task == "ceval" else "mmlu"]
    if (
        task == "mc"
        and p.suffix != ".jsonl"
        and any("\u4e00" <= ch <= "\u9fff" for q in questions[:5] for ch in q.question)
    ):
        fmt = FORMATS["ceval"]
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    k = ctx.num_fewshot if ctx.num_fewshot is not None else (5 if fmt.lettered else 0)
    records = []
    for subject, qs in by_subject.items():
        qs = ctx.limited(qs)
        todo = [q for q in qs if ctx.store.get(ctx.key(task, q.id)) is None]
        if todo:
            lm = ctx.need_lm(task)
            shots = dev.get(subject, [])[:k]
            pairs, spans = [], []
            for q in todo:
                prompt = build_prompt(q, shots, fmt, ctx)
                start = len(pairs)
                pairs += [(prompt, fmt.delimiter + c) for c in choices_of(q, fmt)]
                spans.append((start, len(pairs), prompt))
            scores = lm.loglikelihood(pairs, progress=ctx.progress)
            for q, (a, b, prompt) in zip(todo, spans):
                lls = np.array([s[0] for s in scores[a:b]])
                lens = np.array([float(len(c)) for c in choices_of(q, fmt)])
                pred, pred_norm = int(lls.argmax()), int((lls / lens).argmax())
                ctx.store.add(
                    {
                        "key": ctx.key(task, q.id),
                        "task": task,
                        "perturbation": ctx.tag,
                        "id": q.id,
                        "subject": subject,
                        "prompt": prompt,
                        "choices": choices_of(q, fmt),
                        "loglikelihoods": lls.tolist(),
                        "target": q.label,
                        "response": pred,
                        "acc": float(pred == q.label),
                        "acc_norm": float(pred_norm == q.label),
                    }
                )
        records += [ctx.store.get(ctx.key(task, q.id)) for q in qs]
    return aggregate(task, records)


def aggregate(task: str, records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    if not records:
        raise InputError(f"task {task}: no labelled questions found")
    out: dict[str, dict[str, float]] = {}
    subjects: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        subjects.setdefault(r["subject"], []).append(r)
    for s, rs in subjects.items():
        out[f"{task}/{s}"] = {
            "acc": float(np.mean([r["acc"] for r in rs])),
            "acc_norm": float(np.mean([r["acc_norm"] for r in rs])),
            "n": len(rs),
        }
    out[task] = {
        "acc": float(np.mean([r["acc"] for r in records])),
        "acc_norm": float(np.mean([r["acc_norm"] for r in records])),
        "acc_macro": float(np.mean([v["acc"] for v in out.values()])),
        "acc_norm_macro": float(np.mean([v["acc_norm"] for v in out.values()])),
        "n": len(records),
    }
    if len(subjects) == 1:  # one subject: no separate per-subject row
        out.pop(f"{task}/{next(iter(subjects))}")
    return out
