"""lm-evaluation-harness (`lm_eval --model local-completions`) against the server, log-likelihoods checked
against `transformers` on the same checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_serve_fixtures import build_tiny_llama, running_server

pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "a small dog"], "answer": 0},
    {"question": "ROMEO: O, she doth teach", "choices": ["the torches", "nothing at all"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "seven", "the moon", "4"], "answer": 0},
]

TASK_YAML = """\
task: llmkit_serve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_lm_eval_local_completions_loglikelihoods(tmp_path):
    model_dir = build_tiny_llama(tmp_path / "tiny")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "mc.yaml").write_text(TASK_YAML.format(data=data))
    out = tmp_path / "out"
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    exe = shutil.which("lm_eval") or shutil.which("lm-eval")
    cmd = [exe] if exe else [sys.executable, "-m", "lm_eval"]
    with running_server(model_dir) as srv:
        args = (
            f"model=tiny,base_url={srv.url}/v1/completions,tokenizer_backend=remote,"
            "num_concurrent=2,max_retries=1,max_length=256"
        )
        proc = subprocess.run(
            [
                *cmd,
                "run",
                "--model",
                "local-completions",
                "--model_args",
                args,
                "--tasks",
                "llmkit_serve_mc",
                "--include_path",
                str(tasks),
                "--log_samples",
                "--output_path",
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        tokenizer = srv.state.tokenizer
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    samples = [json.loads(line) for f in out.rglob("samples_llmkit_serve_mc*.jsonl") for line in open(f)]
    assert len(samples) == len(DOCS)

    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    checked = 0
    for s in samples:
        args = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]  # (context, continuation)
        for (context, continuation), resp in zip(args, s["resps"]):
            ctx = tokenizer.encode(context, add_special_tokens=False)
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            cont = whole[len(ctx) :]
            with torch.no_grad():
                lp = torch.log_softmax(ref(torch.tensor([whole])).logits[0].float(), -1)
            want = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
            greedy = all(int(lp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
            got, got_greedy = resp[0]
            assert float(got) == pytest.approx(want, abs=1e-3), (context, continuation)
            assert str(got_greedy) == str(greedy)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in DOCS)
    results = json.loads(next(Path(out).rglob("results*.json")).read_text())
    assert "llmkit_serve_mc" in results["results"]
