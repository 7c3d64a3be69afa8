"""LLM-as-judge through any OpenAI-compatible chat endpoint.

- single-answer grading: the judge rates an answer 1-10 against a rubric, replying `Rating: [[N]]`;
- pairwise: the judge picks `[[A]]`, `[[B]]` or `[[C]]` (tie) between the model's answer and a
  reference answer, asked twice with the answers in both orders so position bias cancels. Per
  question the model wins only if both orders say so (loses likewise); anything else is a tie.
  win rate = (wins + ties / 2) / n with a 95% normal-approximation interval over the per-question
  scores (1, 1/2, 0); self-consistency = the share of questions whose two orders agree.

Data: JSONL with `prompt`, optional `reference` (the answer to compare against) and `rubric`.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llmkit.errors import InputError
from llmkit.eval.context import TaskContext, read_jsonl, require

RUBRIC = "helpfulness, relevance, accuracy, depth and level of detail"

GRADE = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
    "the user question displayed below. Consider: {rubric}. Be as objective as possible. After a short "
    'explanation, rate the response on a scale of 1 to 10 by strictly following this format: "Rating: [[5]]".'
    "\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
PAIR = (
    "Please act as an impartial judge and evaluate the responses provided by two AI assistants to the user "
    "question displayed below. Consider: {rubric}. Do not let the order of the responses or their length "
    'influence you. After a short explanation, output your verdict strictly in this format: "[[A]]" if '
    'assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
    "\n\n[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's "
    "Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]"
)


def parse_rating(text: str) -> float | None:
    m = re.search(r"\[\[(\d+(?:\.\d+)?)\]\]", text) or re.search(r"Rating:\s*(\d+(?:\.\d+)?)", text)
    if not m:
        return None
    v = float(m.group(1))
    return v if 1 <= v <= 10 else None


def parse_verdict(text: str) -> str:
    """'A', 'B' or 'tie' ([[C]], several or no verdicts)."""
    found = set(re.findall(r"\[\[([ABC])\]\]", text))
    return next(iter(found)) if len(found) == 1 and found != {"C"} else "tie"


def combine(first: str, second: str) -> tuple[str, bool]:
    """Outcome for the model (A in the first order, B in the second): (win|loss|tie, the orders agree)."""
    o1 = {"A": "win", "B": "loss"}.get(first, "tie")
    o2 = {"B": "win", "A": "loss"}.get(second, "tie")
    return (o1 if o1 == o2 else "tie"), o1 == o2


def win_rate(outcomes: list[str], z: float = 1.96) -> tuple[float, float, float]:
    """(win rate, CI low, CI high): mean of 1 / 0.5 / 0 scores, +- z standard errors (sample std), clipped to [0, 1]."""
    s = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes]
    n = len(s)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(s) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in s) / (n - 1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


class Judge:
    """A judge model behind an OpenAI-compatible `/v1/chat/completions`."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        max_tokens: int = 256,
        concurrency: int = 4,
    ):
        import os

        from openai import OpenAI

        url = base_url.rstrip("/")
        url = url if url.endswith("/v1") else url + "/v1"
        self.client = OpenAI(base_url=url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "EMPTY"))
        if model is None:
            from llmkit.eval.lm import _list_models

            models = _list_models(self.client, url)
            if not models:
                raise InputError(f"{url}/models lists no model; pass --judge-model NAME")
            model = models[0].id
        self.model = model
        self.max_tokens, self.concurrency = max_tokens, concurrency

    def ask(self, prompt: str) -> str:
        r = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=self.max_tokens,
        )
        return r.choices[0].message.content or ""

    def ask_many(self, prompts: list[str]) -> list[str]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self.ask, prompts))


def run(ctx: TaskContext, task: str, path: str | None) -> dict[str, dict[str, float]]:
    if ctx.judge is None:
        raise InputError("task judge needs a judge endpoint: --judge-url URL [--judge-model NAME]")
    if path is None:
        raise InputError("task judge needs data: --tasks judge=FILE.jsonl (fields prompt, optional reference)")
    rows = read_jsonl(Path(path))
    for i, r in enumerate(rows):
        require(r, ["prompt"], f"{path} row {i + 1}")
    rows = ctx.limited(rows)
    ids = [str(r.get("id", i)) for i, r in enumerate(rows)]
    todo = [(i, r) for i, r in zip(ids, rows) if ctx.store.get(ctx.key(task, i)) is None]
    if todo:
        prompts = [ctx.text(r["prompt"]) for _, r in todo]
        answers = [g[0].strip() for g in ctx.generate(task, [i for i, _ in todo], prompts, max_new_tokens=256)]
        asks = []
        for (_, r), q, a in zip(todo, prompts, answers):
            rubric = r.get("rubric", RUBRIC)
            asks.append(GRADE.format(rubric=rubric, question=q, answer=a))
            if "reference" in r:
                asks.append(PAIR.format(rubric=rubric, question=q, a=a, b=r["reference"]))
                asks.append(PAIR.format(rubric=rubric, question=q, a=r["reference"], b=a))
        replies = iter(ctx.judge.ask_many(asks))
        for (i, r), q, a in zip(todo, prompts, answers):
            rec: dict[str, Any] = {
                "key": ctx.key(task, i),
                "task": task,
                "perturbation": ctx.tag,
                "id": i,
                "prompt": q,
                "response": a,
            }
            g = next(replies)
            rec.update(judge_grade=g, score=parse_rating(g))
            if "reference" in r:
                r1, r2 = next(replies), next(replies)
                v1, v2 = parse_verdict(r1), parse_verdict(r2)
                outcome, agree = combine(v1, v2)
                rec.update(
                    reference=r["reference"],
                    judge_ab=r1,
                    judge_ba=r2,
                    verdict_ab=v1,
                    verdict_ba=v2,
                    outcome=outcome,
                    consistent=agree,
                )
            ctx.store.add(rec)
    recs = [ctx.store.get(ctx.key(task, i)) for i in ids]
    scores = [r["score"] for r in recs if r.get("score") is not None]
    out: dict[str, float] = {
        "n": len(recs),
        "score": sum(scores) / len(scores) if scores else float("nan"),
        "graded": len(scores),
    }
    pairs = [r for r in recs if "outcome" in r]
    if pairs:
        wr, lo, hi = win_rate([r["outcome"] for r in pairs])
        out.update(
            win_rate=wr,
            win_rate_ci_low=lo,
            win_rate_ci_high=hi,
            consistency=sum(r["consistent"] for r in pairs) / len(pairs),
        )
    return {task: out}
