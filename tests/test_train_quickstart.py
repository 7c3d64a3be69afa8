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
            "--no-chat",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "val perplexity" in out and out.count("--- sample") == 2
    qs = tmp_path / "qs"
    assert "chat stage" not in out and not (qs / "chat").exists()  # --no-chat: the base model only
    assert f"llmkit chat --model {qs}\n" in out and f"llmkit serve --model {qs} --port 8000" in out
    assert "http://127.0.0.1:8000/" in out and f"llmkit generate --model {qs} --prompt" in out
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


def test_dialogue_pairs_from_a_play():
    from llmkit.text.dialogue import dialogue_pairs

    play = (
        "ROMEO.\nShe speaks.\nO, speak again!\n\nJULIET.\nAy me!\n\nROMEO.\nBright angel.\n\n"
        "Enter Nurse.\n\n"  # a stage direction: the run ends, no reply crosses it
        "NURSE.\nMadam!\n\nJULIET.\nI come.\n\nJULIET.\nAnon.\n"  # the same speaker twice: no pair
    )
    one = dialogue_pairs(play, turns=1)
    assert one == [
        [{"role": "user", "content": "She speaks.\nO, speak again!"}, {"role": "assistant", "content": "Ay me!"}],
        [{"role": "user", "content": "Ay me!"}, {"role": "assistant", "content": "Bright angel."}],
        [{"role": "user", "content": "Madam!"}, {"role": "assistant", "content": "I come."}],
    ]
    two = dialogue_pairs(play, turns=2)
    assert len(two) == 3  # the three-speech runs are too short for a two-exchange conversation
    assert dialogue_pairs(play, max_chars=13, turns=1) == [one[1], one[2]]  # a long speech is left out
    tiny = "First Citizen:\nHear me speak.\n\nAll:\nSpeak, speak.\n"  # tinyshakespeare's form
    assert dialogue_pairs(tiny) == [[{"role": "user", "content": "Hear me speak."},
                                     {"role": "assistant", "content": "Speak, speak."}]]


def test_chat_data_written_as_finetune_jsonl(tmp_path):
    from llmkit.data.sft import read_sft_jsonl
    from llmkit.train.quickstart import build_chat_data

    play = tmp_path / "play.txt"
    play.write_text("".join(f"{'A' if i % 2 else 'B'}.\nLine {i}.\n\n" for i in range(7)))
    n = build_chat_data(play, tmp_path / "chat.jsonl", max_examples=100)
    records = list(read_sft_jsonl(tmp_path / "chat.jsonl"))
    assert n == len(records) == 6 + 2  # 6 pairs + 2 two-exchange conversations (from 7 speeches)
    assert all(fmt == "chat" for _, _, fmt, _ in records)
    prose = tmp_path / "prose.txt"
    prose.write_text("Once upon a time there was a cat.\n\nThe end.\n")
    assert build_chat_data(prose, tmp_path / "none.jsonl", max_examples=100) == 0
