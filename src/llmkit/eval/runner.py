"""`llmkit eval`: run tasks on a model folder or an endpoint, write results.json, samples.jsonl and reports."""

from __future__ import annotations

import datetime
import importlib
import json
import time
from pathlib import Path
from typing import Any

from llmkit.errors import InputError
from llmkit.eval.context import TaskContext, load_predictions
from llmkit.eval.lm import APILM, LocalLM, dumps
from llmkit.eval.store import SampleStore
from llmkit.fsutil import atomic_write_text

# task name -> module with `run(ctx, task, path) -> {name: {metric: value}}`
TASKS = {
    "perplexity": "llmkit.eval.perplexity",
    "mc": "llmkit.eval.mc",
    "mmlu": "llmkit.eval.mc",
    "ceval": "llmkit.eval.mc",
    "gsm8k": "llmkit.eval.gsm8k",
    "humaneval": "llmkit.eval.humaneval",
    "bleu": "llmkit.eval.textgen",
    "rouge": "llmkit.eval.textgen",
    "chrf": "llmkit.eval.textgen",
    "judge": "llmkit.eval.judge",
    "efficiency": "llmkit.eval.efficiency",
    "safety": "llmkit.eval.safety",
    "robustness": "llmkit.eval.robustness",
}
NO_ROBUSTNESS = {"humaneval", "judge", "efficiency", "safety", "robustness"}


def parse_tasks(spec: str | list[str]) -> list[tuple[str, str | None]]:
    """'mc=data.jsonl,gsm8k=g.jsonl,efficiency' -> [(name, path|None), ...]; unknown names are an error."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        name, _, path = item.partition("=")
        if name not in TASKS:
            raise InputError(f"unknown task {name!r}; expected one of {', '.join(TASKS)} (as NAME or NAME=PATH)")
        out.append((name, path or None))
    if not out:
        raise InputError(f"--tasks is empty; expected NAME[=PATH],... from {', '.join(TASKS)}")
    return out


def _run_task(ctx: TaskContext, name: str, path: str | None) -> dict[str, dict[str, float]]:
    return importlib.import_module(TASKS[name]).run(ctx, name, path)


def evaluate(
    tasks: str | list[str],
    out: str | Path,
    *,
    model: Any = None,
    tokenizer: Any = None,
    base_url: str | None = None,
    served_model: str | None = None,
    api_key: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    stride: int | None = None,
    samples: int = 1,
    predictions: str | Path | None = None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    judge_key: str | None = None,
    dtype: Any = None,
    device: str | None = None,
    batch_size: int = 32,
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `tasks` and write `out/results.json`, `samples.jsonl`, `report.md`, `report.html`; return the results dict.

    `model` is a model folder (or a loaded model with `tokenizer`); `base_url` an OpenAI-compatible
    endpoint instead. A run whose `out/samples.jsonl` exists resumes: documents already there are not
    computed again (`resume=False` starts over).
    """
    from llmkit import __version__

    specs = parse_tasks(tasks)
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if model is not None and base_url is not None:
        raise InputError("give either --model DIR or --base-url URL, not both")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm = None
    if model is not None:
        lm = LocalLM(model, tokenizer, dtype=dtype, device=device, batch_size=batch_size)
    elif base_url is not None:
        lm = APILM(base_url, served_model, api_key)
    elif predictions is None:
        raise InputError("nothing to evaluate: pass --model DIR, --base-url URL or --predictions FILE")
    judge = None
    if judge_url:
        from llmkit.eval.judge import Judge

        judge = Judge(judge_url, judge_model, judge_key)
    store = SampleStore(out / "samples.jsonl", resume=resume)
    ctx = TaskContext(
        lm=lm,
        store=store,
        limit=limit,
        num_fewshot=num_fewshot,
        stride=stride,
        samples=samples,
        predictions=load_predictions(predictions) if predictions else None,
        judge=judge,
        progress=progress,
        seed=seed,
        options=dict(options or {}),
    )
    results: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    ran: list[tuple[str, str | None]] = []
    try:
        for name, path in specs:
            if name == "robustness":
                continue
            t0 = time.perf_counter()
            results.update(_run_task(ctx, name, path))
            timings[name] = round(time.perf_counter() - t0, 3)
            ran.append((name, path))
        for name, path in specs:
            if name != "robustness":
                continue
            from llmkit.eval import robustness as rb

            t0 = time.perf_counter()
            wanted = set(path.split("+")) if path else None

            # `robustness` alone: every task that has a headline metric; `robustness=a+b`: exactly those
            if wanted:
                targets = [(n, p) for n, p in ran if n in wanted and n != "efficiency"]
            else:
                targets = [(n, p) for n, p in ran if n not in NO_ROBUSTNESS]
            if wanted and not targets:
                raise InputError(f"robustness={path}: those tasks are not in --tasks (or cannot be perturbed)")
            perturbed: dict[str, dict[str, dict[str, float]]] = {}
            for pname, fn in rb.PERTURBATIONS.items():
                ctx.tag, ctx.perturb = pname, (lambda s, fn=fn: fn(s, seed=seed))
                perturbed[pname] = {}
                for n, p in targets:
                    perturbed[pname].update(_run_task(ctx, n, p))
            ctx.tag, ctx.perturb = "", None
            results["robustness"] = rb.summarize(results, perturbed)
            timings["robustness"] = round(time.perf_counter() - t0, 3)
    finally:
        store.close()
        if lm is not None:
            lm.close()
    report = {
        "results": results,
        "config": {
            "tasks": [f"{n}={p}" if p else n for n, p in specs],
            "limit": limit,
            "num_fewshot": num_fewshot,
            "stride": stride,
            "samples": samples,
            "predictions": str(predictions) if predictions else None,
            "judge": {"base_url": judge_url, "model": judge.model} if judge else None,
            "seed": seed,
        },
        "model": lm.info() if lm is not None else {"kind": "predictions", "path": str(predictions), "hash": None},
        "model_name": lm.name if lm is not None else Path(str(predictions)).stem,
        "resumed_samples": store.resumed,
        "timings_s": timings,
        "llmkit_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / "results.json", json.dumps(json.loads(dumps(report)), indent=2, ensure_ascii=False))
    from llmkit.eval.report import write_reports

    write_reports(out, report)
    return report
