"""`llmkit eval`: evaluate a model folder or an endpoint on tasks; `llmkit eval compare RUN...`."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model: perplexity, mc/mmlu/ceval, gsm8k, humaneval, bleu/rouge/chrf, judge, ...",
        description="Run evaluation tasks; writes results.json, samples.jsonl, report.md and report.html to --out. "
        "`llmkit eval compare RUN1 RUN2 ...` puts runs side by side.",
    )
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model", help="model folder (config.json + weights + tokenizer)")
    src.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    src.add_argument("--served-model", help="model name at --base-url (default: the first it lists)")
    src.add_argument("--api-key", help="API key for --base-url (default: $OPENAI_API_KEY)")
    p.add_argument(
        "--tasks",
        help="NAME[=PATH],...: perplexity mc mmlu ceval gsm8k humaneval bleu rouge chrf "
        "judge robustness efficiency safety",
    )
    p.add_argument("--out", help="output folder (results.json, samples.jsonl, report.md, report.html)")
    p.add_argument("--limit", type=int, help="at most N documents per task (per subject for mmlu/ceval)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: 5 for mmlu/ceval, 8 for gsm8k)")
    p.add_argument("--stride", type=int, help="perplexity sliding-window stride in tokens (default: the context)")
    p.add_argument("--samples", type=int, default=1, help="samples per prompt: pass@k (humaneval), maj@K (gsm8k)")
    p.add_argument("--predictions", help="JSONL (task_id or id, completion): score these outputs without a model")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint of the judge model (judge, safety)")
    p.add_argument("--judge-model", help="judge model name (default: the first the endpoint lists)")
    p.add_argument("--judge-key", help="API key of the judge endpoint")
    p.add_argument("--toxic-words", help="safety: file of toxic words/phrases, one per line")
    p.add_argument("--workers", type=int, help="humaneval: parallel sandboxes (default: CPU count)")
    p.add_argument("--max-new-tokens", type=int, help="bleu/rouge/chrf: tokens to generate (default 128)")
    p.add_argument("--batch-size", type=int, default=32, help="continuations scored per forward")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as saved)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start over even if --out/samples.jsonl exists")
    p.set_defaults(func=run, accepts_extra=True)


def run(args: argparse.Namespace) -> int:
    from llmkit.errors import InputError

    if args.extra and args.extra[0] == "compare":
        # `--out` is also an eval flag, so argparse has already taken it from the compare arguments
        return compare_cmd(args.extra[1:] + (["--out", args.out] if args.out else []))
    if args.extra:
        raise InputError(f"unrecognized arguments: {' '.join(args.extra)}")
    if not args.tasks or not args.out:
        raise InputError("llmkit eval needs --tasks NAME[=PATH],... and --out DIR (or: llmkit eval compare RUN...)")
    import torch

    from llmkit.eval.runner import evaluate

    report = evaluate(
        args.tasks,
        args.out,
        model=args.model,
        base_url=args.base_url,
        served_model=args.served_model,
        api_key=args.api_key,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        stride=args.stride,
        samples=args.samples,
        predictions=args.predictions,
        judge_url=args.judge_url,
        judge_model=args.judge_model,
        judge_key=args.judge_key,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        device=args.device,
        batch_size=args.batch_size,
        resume=not args.no_resume,
        seed=args.seed,
        options={"toxic_words": args.toxic_words, "workers": args.workers, "max_new_tokens": args.max_new_tokens},
    )
    from llmkit.eval.report import _table_md

    sys.stdout.write(_table_md({report["model_name"]: report["results"]}))
    print(f"wrote {args.out}/results.json, samples.jsonl, report.md, report.html")
    return 0


def compare_cmd(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmkit eval compare", description="runs side by side, deltas vs the first")
    p.add_argument("runs", nargs="+", help="folders written by llmkit eval --out")
    p.add_argument("--out", help="also write compare.md, compare.html and compare.json here")
    a = p.parse_args(argv)
    from llmkit.eval.report import compare

    sys.stdout.write(compare(a.runs, a.out))
    return 0
