"""`llmkit lm-eval ARGS...`: lm-evaluation-harness's own command line with the `llmkit` model registered."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the llmkit backend (--model llmkit --model_args pretrained=DIR)",
        add_help=False,
        prefix_chars="\0",  # every flag, --help included, goes to lm_eval untouched
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run, accepts_extra=True)


def run(args: argparse.Namespace) -> int:
    from lm_eval.__main__ import cli_evaluate

    import llmkit.eval  # noqa: F401  (registers model "llmkit")

    argv = list(args.lm_eval_args) + list(args.extra or [])
    old = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = old
    return 0
