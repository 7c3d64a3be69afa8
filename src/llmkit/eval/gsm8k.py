"""GSM8K: few-shot chain-of-thought generation, answer extraction, exact match and maj@K.

Data: JSONL with `question` and `answer` (GSM8K's own format, the final answer after `####`);
rows with `"split": "dev"` replace the built-in exemplars (the 8 chain-of-thought exemplars of
Wei et al., 2022). The answer of a response is, in order: the number after `####`, the number after
"The answer is", or the last number in the text. With `--samples K` (K > 1) the model also samples
K responses (temperature 0.7) and `maj@K` scores their most common answer.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from llmkit.errors import InputError
from llmkit.eval.context import TaskContext, read_jsonl, require

EXEMPLARS = [
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
        "there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
        "After eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
        "Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
        "The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. "
        "How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
        "5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to "
        "thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
        "were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
        "balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
        "he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
        "left. 23 - 15 is 8. The answer is 8.",
    ),
]

STOP = ["Question:", "\n\n"]
_NUM = r"-?[\d,]*\.?\d+"


def normalize_number(s: str) -> str | None:
    """'1,234.50' -> '1234.5'; None when `s` holds no number."""
    m = re.search(_NUM, s.replace("$", ""))
    if not m:
        return None
    t = m.group(0).replace(",", "")
    try:
        v = float(t)
    except ValueError:
        return None
    return str(int(v)) if v == int(v) else repr(v)


def extract_answer(text: str) -> str | None:
    """The final answer of a response: after `####`, after "The answer is", else the last number."""
    m = re.search(r"####\s*(" + _NUM + ")", text)
    if m:
        return normalize_number(m.group(1))
    m = re.search(r"[Tt]he (?:final )?answer is[:\s]*\$?\s*(" + _NUM + ")", text)
    if m:
        return normalize_number(m.group(1))
    nums = re.findall(_NUM, text.replace("$", ""))
    nums = [n for n in nums if re.search(r"\d", n)]
    return normalize_number(nums[-1]) if nums else None


def _reference(answer: str) -> str | None:
    return extract_answer(answer)


def _cot(answer: str) -> str:
    """GSM8K's worked answer as an exemplar: calculator annotations dropped, '#### N' -> 'The answer is N.'"""
    body, _, final = answer.partition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body} The answer is {final.strip()}."


def build_prompt(question: str, shots: list[tuple[str, str]]) -> str:
    parts = [f"Question: {q}\nAnswer: {a}" for q, a in shots]
    parts.append(f"Question: {question}\nAnswer:")
    return "\n\n".join(parts)


def run(ctx: TaskContext, task: str, path: str | None) -> dict[str, dict[str, float]]:
    if path is None:
        raise InputError("task gsm8k needs data: --tasks gsm8k=FILE.jsonl (fields question, answer)")
    rows = read_jsonl(Path(path))
    for i, r in enumerate(rows):
        require(r, ["question", "answer"], f"{path} row {i + 1}")
    dev = [(r["question"], _cot(r["answer"])) for r in rows if r.get("split") == "dev"]
    test = ctx.limited([r for r in rows if r.get("split") != "dev"])
    k = ctx.num_fewshot if ctx.num_fewshot is not None else 8
    shots = (dev or EXEMPLARS)[:k]
    ids = [str(r.get("id", i)) for i, r in enumerate(test)]
    todo = [(i, r) for i, r in zip(ids, test) if ctx.store.get(ctx.key(task, i)) is None]
    if todo:
        prompts = [build_prompt(ctx.text(r["question"]), shots) for _, r in todo]
        tids = [i for i, _ in todo]
        greedy = ctx.generate(task, tids, prompts, max_new_tokens=256, stop=STOP, temperature=0.0)
        sampled: list[list[str]] = [[] for _ in todo]
        if ctx.samples > 1 and ctx.predictions is None:
            sampled = ctx.need_lm(task).generate(
                prompts,
                max_new_tokens=256,
                stop=STOP,
                temperature=0.7,
                n=ctx.samples,
                seed=ctx.seed,
                progress=ctx.progress,
            )
        elif ctx.predictions is not None:  # several predictions per id = the samples
            sampled = [g if len(g) > 1 else [] for g in greedy]
        for (i, r), g, s, prompt in zip(todo, greedy, sampled, prompts):
            ref = _reference(r["answer"])
            pred = extract_answer(g[0])
            votes = [a for a in (extract_answer(x) for x in s) if a is not None]
            maj = Counter(votes).most_common(1)[0][0] if votes else None
            rec: dict[str, Any] = {
                "key": ctx.key(task, i),
                "task": task,
                "perturbation": ctx.tag,
                "id": i,
                "prompt": prompt,
                "response": g[0],
                "extracted": pred,
                "target": ref,
                "exact_match": float(pred is not None and pred == ref),
            }
            if s:
                rec.update(samples=s, votes=votes, majority=maj, maj=float(maj is not None and maj == ref))
            ctx.store.add(rec)
    recs = [ctx.store.get(ctx.key(task, i)) for i in ids]
    out = {"exact_match": sum(r["exact_match"] for r in recs) / max(len(recs), 1), "n": len(recs)}
    if recs and all("maj" in r for r in recs):
        out[f"maj@{len(recs[0]['samples'])}"] = sum(r["maj"] for r in recs) / len(recs)
    return {task: out}
