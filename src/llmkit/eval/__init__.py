"""Evaluation: perplexity, multiple choice, GSM8K, HumanEval, BLEU/ROUGE/chrF, LLM-as-judge, robustness,
efficiency and safety (`llmkit eval`), and llmkit as an lm-evaluation-harness backend.

Importing this package registers the model name `llmkit` with lm-eval when lm-eval is installed, so
`lm_eval.simple_evaluate(model="llmkit", model_args="pretrained=DIR", ...)` works.
"""

from __future__ import annotations

from llmkit.eval.humaneval import pass_at_k
from llmkit.eval.lm import APILM, LocalLM, score_tokens
from llmkit.eval.perplexity import perplexity, sliding_nll
from llmkit.eval.report import compare, write_reports
from llmkit.eval.runner import TASKS, evaluate

__all__ = [
    "APILM",
    "LocalLM",
    "TASKS",
    "compare",
    "evaluate",
    "pass_at_k",
    "perplexity",
    "score_tokens",
    "sliding_nll",
    "write_reports",
    "register_lm_eval",
]


def register_lm_eval() -> bool:
    """Register `llmkit` in lm-eval's model registry; False when lm-eval is not installed."""
    try:
        from llmkit.eval.lm_eval_backend import register
    except ImportError:
        return False
    register()
    return True


register_lm_eval()
