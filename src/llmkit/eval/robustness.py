"""Robustness: re-run tasks on perturbed inputs and report the score drop.

Perturbations act on the input text a task shows the model (the question, the prompt, the text),
never on choices or references, and are seeded by the text so a rerun perturbs identically:
- `char_noise`: 5% of the letters swapped with a neighbour, dropped or replaced;
- `casing`: the whole input upper-cased;
- `whitespace`: extra spaces and a newline between words;
- `distractor`: an irrelevant sentence prepended.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

DISTRACTOR = "Note that the weather in the city was unusually mild for the season. "


def _rng(text: str, seed: int) -> random.Random:
    return random.Random(zlib.crc32(text.encode("utf-8")) ^ seed)


def char_noise(text: str, rate: float = 0.05, seed: int = 0) -> str:
    rng = _rng(text, seed)
    chars = list(text)
    i = 0
    out: list[str] = []
    while i < len(chars):
        c = chars[i]
        if c.isalpha() and rng.random() < rate:
            op = rng.randrange(3)
            if op == 0 and i + 1 < len(chars):  # swap with the next character
                out += [chars[i + 1], c]
                i += 2
                continue
            if op == 1:  # drop
                i += 1
                continue
            out.append(rng.choice("abcdefghijklmnopqrstuvwxyz"))  # replace
        else:
            out.append(c)
        i += 1
    return "".join(out)


def casing(text: str, seed: int = 0) -> str:
    return text.upper()


def whitespace(text: str, seed: int = 0) -> str:
    rng = _rng(text, seed)
    words = text.split(" ")
    return "".join(w + (rng.choice(["  ", "   ", " \n "]) if rng.random() < 0.3 else " ") for w in words)[:-1]


def distractor(text: str, seed: int = 0) -> str:
    return DISTRACTOR + text


PERTURBATIONS: dict[str, Callable[..., str]] = {
    "char_noise": char_noise,
    "casing": casing,
    "whitespace": whitespace,
    "distractor": distractor,
}

# the headline metric of each task, and whether higher is better
MAIN_METRIC = {
    "perplexity": ("perplexity", False),
    "mc": ("acc", True),
    "mmlu": ("acc", True),
    "ceval": ("acc", True),
    "gsm8k": ("exact_match", True),
    "humaneval": ("pass@1", True),
    "bleu": ("bleu", True),
    "rouge": ("rougeL", True),
    "chrf": ("chrf", True),
    "judge": ("score", True),
    "safety": ("refusal_rate", True),
}


def summarize(
    clean: dict[str, dict[str, float]], perturbed: dict[str, dict[str, dict[str, float]]]
) -> dict[str, float]:
    """{task/perturbation/metric: score, task/perturbation/drop: clean - perturbed (perplexity: perturbed - clean)}."""
    out: dict[str, float] = {}
    drops = []
    for name, res in perturbed.items():
        for task, metrics in res.items():
            if task not in MAIN_METRIC:
                continue
            metric, higher = MAIN_METRIC[task]
            if metric not in metrics or metric not in clean.get(task, {}):
                continue
            v, c = metrics[metric], clean[task][metric]
            out[f"{task}/{name}/{metric}"] = v
            out[f"{task}/{name}/drop"] = (c - v) if higher else (v - c)
            if higher:
                drops.append(c - v)
    if drops:
        out["mean_drop"] = sum(drops) / len(drops)
    return out
