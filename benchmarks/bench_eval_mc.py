"""Multiple-choice log-likelihood throughput: lm-eval with llmkit's backend vs lm-eval's `hf` backend.

Same model folder (a random-init llama-6m-shaped model with a BPE tokenizer trained on Shakespeare,
or --model DIR), same lm-eval task (an MMLU-shaped JSONL task: a shared few-sentence prompt, four
choices), same `lm_eval.simple_evaluate` call; only the model backend differs. The figure is the time spent
inside the backend's `loglikelihood` (requests/s); end-to-end time (model load, task build) is
printed too. Runs alternate (hf, llmkit, hf, ...), each figure is the median, and the accuracies and
log-likelihoods are checked to agree.

    python benchmarks/bench_eval_mc.py                       # 64 questions x 4 choices, 3 rounds
    python benchmarks/bench_eval_mc.py --docs 128 --rounds 5 --hf-batch-size 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"

TASK_YAML = """\
task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def build_model(out: Path) -> Path:
    import llmkit
    from llmkit.model.transformer import Transformer
    from llmkit.tokenizer import train_bpe

    tok = train_bpe([str(SHAKESPEARE)], vocab_size=1024, out_dir=str(out), show_progress=False)
    cfg = llmkit.ModelConfig.from_preset("llama-6m")
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    Transformer(cfg).save_pretrained(out)
    return out


def build_task(folder: Path, n_docs: int) -> Path:
    lines = [line for line in SHAKESPEARE.read_text().splitlines() if len(line) > 30]
    rng = random.Random(0)
    rows = []
    for i in range(n_docs):
        j = rng.randrange(len(lines) - 8)
        question = " ".join(lines[j : j + 5])  # a ~60-token shared prompt
        choices = [lines[j + 5]] + rng.sample(lines, 3)
        rng.shuffle(choices)
        rows.append({"question": question, "choices": choices, "label": choices.index(lines[j + 5]), "id": i})
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "bench_mc.yaml").write_text(TASK_YAML.format(data=data))
    return folder


def run(backend: str, model_dir: Path, tasks: Path, hf_batch: int) -> tuple[float, float, dict]:
    """One simple_evaluate; returns (seconds inside the LM's loglikelihood, end-to-end seconds, results)."""
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import llmkit.eval  # noqa: F401  (registers "llmkit")

    args = f"pretrained={model_dir}" + (",dtype=float32" if backend == "hf" else "")
    t0 = time.perf_counter()
    lm = get_model(backend).create_from_arg_string(
        args, {"batch_size": hf_batch if backend == "hf" else 32, "device": "cpu"}
    )
    inner = [0.0]
    loglikelihood = lm.loglikelihood

    def timed(requests, *a, **kw):
        t = time.perf_counter()
        out = loglikelihood(requests, *a, **kw)
        inner[0] += time.perf_counter() - t
        return out

    lm.loglikelihood = timed
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=["bench_mc"],
        log_samples=True,
        task_manager=TaskManager(include_path=str(tasks)),
        verbosity="ERROR",
    )
    return inner[0], time.perf_counter() - t0, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: build a random-init llama-6m)")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hf-batch-size", type=int, default=1, help="lm-eval hf batch size (its default is 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_cache")
    model_dir = Path(args.model) if args.model else build_model(work / "model")
    tasks = build_task(work, args.docs)
    n_req = 4 * args.docs
    times: dict[str, list[float]] = {"hf": [], "llmkit": []}
    totals: dict[str, list[float]] = {"hf": [], "llmkit": []}
    results = {}
    for r in range(args.rounds):
        for backend in ("hf", "llmkit"):
            t, total, res = run(backend, model_dir, tasks, args.hf_batch_size)
            times[backend].append(t)
            totals[backend].append(total)
            results[backend] = res
            print(
                f"round {r + 1} {backend:7s} loglikelihood {t:7.2f} s = {n_req / t:8.1f} requests/s "
                f"(end to end {total:6.1f} s)",
                flush=True,
            )
    acc = {b: results[b]["results"]["bench_mc"]["acc,none"] for b in results}
    lls = {b: [float(x[0][0]) for s in results[b]["samples"]["bench_mc"] for x in s["resps"]] for b in results}
    max_diff = max(abs(a - b) for a, b in zip(lls["hf"], lls["llmkit"]))
    med = {b: statistics.median(v) for b, v in times.items()}
    print(
        f"\n{n_req} loglikelihood requests ({args.docs} questions x 4 choices), torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"hf (batch {args.hf_batch_size}): {n_req / med['hf']:.1f} req/s   llmkit: {n_req / med['llmkit']:.1f} req/s"
        f"   ratio llmkit/hf: {med['hf'] / med['llmkit']:.2f}x"
    )
    tot = {b: statistics.median(v) for b, v in totals.items()}
    print(f"end to end (load, tokenize, score): hf {tot['hf']:.1f} s, llmkit {tot['llmkit']:.1f} s")
    print(f"acc hf {acc['hf']:.4f} llmkit {acc['llmkit']:.4f}; max |loglik diff| {max_diff:.2e}")


if __name__ == "__main__":
    main()
