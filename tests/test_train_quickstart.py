"""`llmkit quickstart` on a small corpus: BPE tokenizer, a few steps, perplexity, plot, samples."""

from __future__ import annotations

import json
from pathlib import Path

from llmkit.train.quickstart import QUICKSTART, default_corpus

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare/input.txt"


def test_quickstart_cli_end_to_end(tmp_path, capsys, monkeypatch):
    from llmkit.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    corpus = tmp_path / "plays.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:40_000] if SHAKESPEARE.is_file() else "To be or not to be.\n" * 2000)
    rc = main(
        [
            "quickstart",
            "--data",
            str(corpus),
            "--out",
            str(tmp_path / "qs"),
            "--max-iters",
            "8",
            "--minutes",
            "5",
            "--samples",
            "2",
            "--train.batch_size",
            "4",
            "--train.eval_iters",
            "2",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "val perplexity" in out and out.count("--- sample") == 2
    qs = tmp_path / "qs"
    assert (qs / "loss.png").read_bytes()[:4] == b"\x89PNG"
    conf = json.loads((qs / "config.json").read_text())
    tok = json.loads((qs / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and conf["vocab_size"] == len(tok["model"]["vocab"]) + len(
        [t for t in tok["added_tokens"] if t["content"] not in tok["model"]["vocab"]]
    )
    assert conf["vocab_size"] <= QUICKSTART["data"]["vocab_size"]
    records = [json.loads(line) for line in (qs / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 8 and records[-1]["val_loss"] < records[0]["val_loss"] + 1e-9


def test_default_corpus_is_offline_shakespeare():
    files = default_corpus()
    assert files and all(f.is_file() and f.stat().st_size > 0 for f in files)
    assert all(f.name != "metadata.txt" for f in files)
