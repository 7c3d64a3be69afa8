"""Reference-based text generation metrics: BLEU and chrF (sacrebleu), ROUGE (rouge-score).

Data: JSONL with `prompt` and `reference` (a string or a list of strings); the model completes each
prompt greedily (or `--predictions` gives the outputs by `id`). The outputs are generated once per
file and shared by `bleu`, `rouge` and `chrf`. Chinese text (any CJK character in the references)
uses sacrebleu's `zh` tokenizer and, for ROUGE, one token per CJK character.
Scales: BLEU and chrF 0-100 (sacrebleu), ROUGE F1 0-1 (rouge-score).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmkit.errors import InputError
from llmkit.eval.context import TaskContext, read_jsonl, require

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")


def is_cjk(texts: list[str]) -> bool:
    return any(_CJK.search(t) for t in texts)


class CJKTokenizer:
    """rouge-score tokenizer: each CJK character is a token; other text as rouge-score's default (lowercased words)."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(
            r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]|[a-z0-9]+", text.lower()
        )


def _refs(row: dict[str, Any]) -> list[str]:
    r = row["reference"]
    return [str(x) for x in r] if isinstance(r, list) else [str(r)]


def bleu(hyps: list[str], refs: list[list[str]]) -> float:
    import sacrebleu

    streams = [[r[j] if j < len(r) else "" for r in refs] for j in range(max(len(r) for r in refs))]
    tok = "zh" if is_cjk([x for r in refs for x in r]) else "13a"
    return float(sacrebleu.corpus_bleu(hyps, streams, tokenize=tok).score)


def chrf(hyps: list[str], refs: list[list[str]]) -> float:
    import sacrebleu

    streams = [[r[j] if j < len(r) else "" for r in refs] for j in range(max(len(r) for r in refs))]
    return float(sacrebleu.corpus_chrf(hyps, streams).score)


def rouge(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    kinds = ["rouge1", "rouge2", "rougeL"]
    tok = CJKTokenizer() if is_cjk([x for r in refs for x in r]) else None
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=tok is None, tokenizer=tok)
    sums = dict.fromkeys(kinds, 0.0)
    for h, r in zip(hyps, refs):
        s = scorer.score_multi(r, h)
        for k in kinds:
            sums[k] += s[k].fmeasure
    return {k: v / max(len(hyps), 1) for k, v in sums.items()}


def outputs(ctx: TaskContext, path: str) -> tuple[list[str], list[list[str]]]:
    """(hypotheses, references) of a file, generated once and shared by the three metrics."""
    rows = read_jsonl(Path(path))
    for i, r in enumerate(rows):
        require(r, ["prompt", "reference"], f"{path} row {i + 1}")
    rows = ctx.limited(rows)
    name = f"textgen:{Path(path).name}"
    ids = [str(r.get("id", i)) for i, r in enumerate(rows)]
    todo = [(i, r) for i, r in zip(ids, rows) if ctx.store.get(ctx.key(name, i)) is None]
    if todo:
        prompts = [ctx.text(r["prompt"]) for _, r in todo]
        max_new = int(ctx.options.get("max_new_tokens") or 128)
        gens = ctx.generate(name, [i for i, _ in todo], prompts, max_new_tokens=max_new, stop=["\n\n"])
        for (i, r), g, p in zip(todo, gens, prompts):
            ctx.store.add(
                {
                    "key": ctx.key(name, i),
                    "task": name,
                    "perturbation": ctx.tag,
                    "id": i,
                    "prompt": p,
                    "response": g[0].strip(),
                    "reference": _refs(r),
                }
            )
    recs = [ctx.store.get(ctx.key(name, i)) for i in ids]
    if not recs:
        raise InputError(f"{path}: no rows")
    return [r["response"] for r in recs], [r["reference"] for r in recs]


def run(ctx: TaskContext, task: str, path: str | None) -> dict[str, dict[str, float]]:
    if path is None:
        raise InputError(f"task {task} needs data: --tasks {task}=FILE.jsonl (fields prompt, reference)")
    hyps, refs = outputs(ctx, path)
    if task == "bleu":
        return {task: {"bleu": bleu(hyps, refs), "n": len(hyps)}}
    if task == "chrf":
        return {task: {"chrf": chrf(hyps, refs), "n": len(hyps)}}
    return {task: {**rouge(hyps, refs), "n": len(hyps)}}
