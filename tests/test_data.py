"""Data pipeline: cleaning, exact / near dedup, packing, manifest, readers and bad inputs."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.data import (
    SequentialBatches,
    TokenShards,
    clean_text,
    get_batch,
    load_tokens,
    prepare,
    token_dtype,
)
from llmkit.errors import InputError
from llmkit.tokenizer import load_tokenizer, train_bpe_from_iterator, train_char_from_iterator

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"

ZH = (
    "春天来了，公园里的花都开了。小明和他的朋友们一起去公园散步，他们看到了很多美丽的花朵和绿色的树木。"
    "湖边有几只白色的鸭子在游泳，孩子们在草地上放风筝，老人们在树下下棋聊天。阳光很温暖，微风吹过，"
    "大家都觉得非常舒服。中午的时候，他们在湖边的餐厅吃了午饭，然后继续在公园里走了很久才回家。"
)
ZH_NEAR = ZH.replace("白色", "黑色")  # two characters changed out of ~190
ZH_OTHER = (
    "机器学习是人工智能的一个分支，它研究计算机怎样模拟或实现人类的学习行为，以获取新的知识或技能，"
    "重新组织已有的知识结构使之不断改善自身的性能。深度学习使用多层神经网络从大量数据中学习表示。"
)
EN = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch, sipping his "
    "coffee and wondering whether the rain will come before the harvest is finished this year."
)
EN_NEAR = EN.replace("sipping his coffee", "sipping her coffee")
EN_OTHER = "Transformers replaced recurrent networks for language modelling because attention parallelises."


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_from_iterator([EN, EN_OTHER, ZH, ZH_OTHER] * 20, 400, out, show_progress=False)
    return out


def _decode_docs(tok, tokens: np.ndarray) -> list[str]:
    """Split a packed stream at EOS and decode each document."""
    docs, cur = [], []
    for t in tokens.tolist():
        if t == tok.eos_token_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert cur == [], "the stream must end with EOS"
    return docs


def test_clean_text():
    raw = "Caf\u0065\u0301\r\nline  \r\n\n\n\n\tindented\x00\x07\ufeff end  "
    assert clean_text(raw) == "Café\nline\n\n\tindented end"
    assert clean_text("ﬁ ① Ｆｕｌｌ", "NFKC") == "fi 1 Full"
    assert clean_text("ﬁ ① Ｆｕｌｌ", "NFC") == "ﬁ ① Ｆｕｌｌ"
    assert clean_text("non\u00a0breaking\u2009thin") == "non breaking thin"
    assert clean_text(ZH) == ZH  # language-agnostic: Chinese passes untouched
    assert clean_text("👨‍👩‍👧 keeps the joiners") == "👨‍👩‍👧 keeps the joiners"
    assert clean_text(" \x00\n\t ") == ""
    with pytest.raises(InputError, match="normalization"):
        clean_text("x", "NFX")


def _write_corpus(root: Path) -> dict[str, str]:
    """A folder with crafted exact and near duplicates, Chinese included, plus a JSONL file."""
    files = {
        "a/en.txt": EN,
        "a/en_exact.txt": "  " + EN.upper().replace(" ", "   ") + "\n\n",  # same after case/space folding
        "a/en_near.md": EN_NEAR,
        "b/zh.txt": ZH,
        "b/zh_near.txt": ZH_NEAR,
        "b/zh_other.txt": ZH_OTHER,
        "b/deep/en_other.txt": EN_OTHER,
        "c/short.txt": "tiny",
        "c/blank.txt": " \n\t\x00 \n",
        "c/ignored.bin": "not a text suffix",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    records = [
        {"text": "JSONL document number one with a field.", "id": 1},
        {"text": EN, "id": 2},
        {"text": "JSONL document two\u00a0says something else entirely.", "id": 3},
    ]
    (root / "c" / "docs.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n")
    return files


def test_prepare_dedup_report_and_tokens(tmp_path, bpe_dir, capsys):
    _write_corpus(tmp_path / "in")
    m = prepare([tmp_path / "in"], bpe_dir, tmp_path / "out", val_fraction=0.0, min_chars=10, progress=False)
    rep = m["dedup"]["report"]
    assert rep["removed"] == {"empty": 1, "too_short": 1, "exact_duplicate": 2, "near_duplicate": 2}
    assert rep["input_documents"] == 12 and rep["kept_documents"] == 6
    near = {e["source"].split("in/")[1]: e["duplicate_of"].split("in/")[1] for e in rep["examples"]["near_duplicate"]}
    assert near == {"a/en_near.md": "a/en.txt", "b/zh_near.txt": "b/zh.txt"}
    exact = {e["source"].split("in/")[1] for e in rep["examples"]["exact_duplicate"]}
    assert exact == {"a/en_exact.txt", "c/docs.jsonl:2"}
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == rep

    # The packed tokens decode to the cleaned kept documents, in input order, each followed by EOS.
    tok = load_tokenizer(bpe_dir)
    kept = [
        EN,
        EN_OTHER,
        ZH,
        ZH_OTHER,
        "JSONL document number one with a field.",
        "JSONL document two says something else entirely.",
    ]
    order = sorted(
        range(len(kept)),
        key=lambda i: [
            "a/en.txt",
            "b/deep/en_other.txt",
            "b/zh.txt",
            "b/zh_other.txt",
            "c/docs.jsonl:1",
            "c/docs.jsonl:3",
        ][i],
    )
    tokens = load_tokens(tmp_path / "out", "train")
    assert _decode_docs(tok, np.asarray(tokens)) == [kept[i] for i in order]
    assert tokens.dtype == np.uint16 and len(tokens) == m["splits"]["train"]["tokens"]
    assert m["splits"]["train"]["documents"] == 6 and m["splits"]["val"] == {
        "file": "val.bin",
        "tokens": 0,
        "documents": 0,
    }
    assert m["vocab_size"] == 400 and m["eos_token_id"] == tok.eos_token_id == 0
    assert len(m["sources"]) == 10 and not any(s.endswith(".bin") for s in m["sources"])
    assert len(m["tokenizer"]["sha256"]) == 64
    assert load_tokenizer(tmp_path / "out" / "tokenizer").encode(ZH) == tok.encode(ZH)

    # Near-dedup off: the near duplicates stay.
    m2 = prepare(
        [tmp_path / "in"],
        bpe_dir,
        tmp_path / "out2",
        val_fraction=0.0,
        min_chars=10,
        near_dup_threshold=None,
        progress=False,
    )
    assert m2["dedup"]["report"]["removed"]["near_duplicate"] == 0 and m2["dedup"]["report"]["kept_documents"] == 8


def test_doc_split_deterministic_and_workers_agree(tmp_path, bpe_dir):
    lines = [
        f"document {i}: {EN_OTHER.split()[i % 10]} {i * 7919 % 1000} {ZH_OTHER[i % 50 : i % 50 + 20]}"
        for i in range(300)
    ]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    kw = dict(val_fraction=0.2, doc_boundary="line", near_dup_threshold=None, progress=False)
    m1 = prepare(tmp_path / "lines.txt", bpe_dir, tmp_path / "o1", seed=1, **kw)
    prepare(tmp_path / "lines.txt", bpe_dir, tmp_path / "o2", seed=1, workers=2, **kw)
    prepare(tmp_path / "lines.txt", bpe_dir, tmp_path / "o3", seed=2, **kw)
    assert m1["split"]["mode"] == "doc"
    for s in ("train", "val"):
        assert (tmp_path / "o1" / f"{s}.bin").read_bytes() == (tmp_path / "o2" / f"{s}.bin").read_bytes()
    assert (tmp_path / "o1" / "val.bin").read_bytes() != (tmp_path / "o3" / "val.bin").read_bytes()
    n_val = m1["splits"]["val"]["documents"]
    assert m1["splits"]["train"]["documents"] + n_val == 300 and 30 <= n_val <= 90  # ~60 expected
    tok = load_tokenizer(bpe_dir)
    train = _decode_docs(tok, np.asarray(load_tokens(tmp_path / "o1", "train")))
    val = _decode_docs(tok, np.asarray(load_tokens(tmp_path / "o1", "val")))
    assert sorted(train + val) == sorted(lines) and not set(train) & set(val)
    assert train == [x for x in lines if x in set(train)]  # input order kept inside a split


def test_prepare_streams_documents(tmp_path, bpe_dir, monkeypatch):
    """Tokens are written while the corpus is still being read: never the whole corpus in memory."""
    prep = importlib.import_module("llmkit.data.prepare")  # the module (llmkit.data.prepare is the function)
    lines = [f"line {i} {EN_OTHER[i % 40 :]}" for i in range(2000)]
    (tmp_path / "big.txt").write_text("\n".join(lines) + "\n")
    read = {"docs": 0, "at_first_write": None}
    original_iter, original_flush = prep.iter_documents, prep._ShardWriter._flush

    def counting_iter(*args, **kwargs):
        for doc in original_iter(*args, **kwargs):
            read["docs"] += 1
            yield doc

    def recording_flush(self, split):
        if read["at_first_write"] is None and self.buffers[split]:
            read["at_first_write"] = read["docs"]
        original_flush(self, split)

    monkeypatch.setattr(prep, "iter_documents", counting_iter)
    monkeypatch.setattr(prep._ShardWriter, "_flush", recording_flush)
    monkeypatch.setattr(prep, "FLUSH_TOKENS", 1000)
    m = prep.prepare(
        tmp_path / "big.txt",
        bpe_dir,
        tmp_path / "out",
        doc_boundary="line",
        val_fraction=0,
        near_dup_threshold=None,
        progress=False,
    )
    assert m["splits"]["train"]["documents"] == 2000 and read["docs"] == 2000
    assert read["at_first_write"] <= 512  # one or two chunks of 256 documents, not the whole file


def test_char_tokenizer_tail_split_and_uint32(tmp_path):
    text = SHAKESPEARE.read_text()[:20_000] if SHAKESPEARE.exists() else (EN + "\n") * 100
    (tmp_path / "input.txt").write_text(text)
    tok = train_char_from_iterator([text], tmp_path / "char")
    m = prepare(tmp_path / "input.txt", tmp_path / "char", tmp_path / "out", val_fraction=0.1, progress=False)
    # One document cannot be split by documents: the last 10% of tokens become val (nanoGPT's split).
    assert m["split"]["mode"] == "tail" and m["dtype"] == "uint16"
    train, val = TokenShards(tmp_path / "out", "train"), TokenShards(tmp_path / "out", "val")
    n = len(clean_text(text)) + 1
    assert len(train) + len(val) == n and len(val) == round(0.1 * n)
    assert tok.decode(np.concatenate([train.tokens, val.tokens]).tolist()) == clean_text(text) + "<|endoftext|>"
    assert train.vocab_size == tok.vocab_size and train.eos_token_id == 0
    # nanoGPT fidelity: no normalisation at all keeps the text exactly (a Tokenizer object works too).
    text = "And  \nTwice being  \n\n\n\nWas   " + text
    (tmp_path / "input.txt").write_text(text)
    prepare(
        tmp_path / "input.txt",
        tok,
        tmp_path / "raw",
        val_fraction=0.1,
        split="tail",
        normalization="none",
        normalize_whitespace=False,
        progress=False,
    )
    raw = np.concatenate([load_tokens(tmp_path / "raw", "train"), load_tokens(tmp_path / "raw", "val")])
    assert tok.decode(raw.tolist()) == text + "<|endoftext|>"

    # More than 65536 distinct symbols: ids no longer fit uint16.
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    big = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 20_000)) + "".join(chr(c) for c in range(0x20000, 0x2C000))
    train_char_from_iterator([big], tmp_path / "bigchar")
    (tmp_path / "zh.txt").write_text(ZH + chr(0x2BFFF))
    m = prepare(tmp_path / "zh.txt", tmp_path / "bigchar", tmp_path / "out32", val_fraction=0, progress=False)
    tokens = load_tokens(tmp_path / "out32", "train")
    assert m["dtype"] == "uint32" and m["vocab_size"] > 65536 and tokens.dtype == np.uint32
    assert int(tokens[-2]) > 65535  # the last character's id really needs 32 bits


def test_readers(tmp_path, bpe_dir):
    (tmp_path / "in.txt").write_text((EN + "\n\n" + ZH_OTHER + "\n\n") * 3 + EN_OTHER)
    prepare(tmp_path / "in.txt", bpe_dir, tmp_path / "d", val_fraction=0, progress=False)
    tokens = load_tokens(tmp_path / "d", "train")
    x, y = get_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    ix = torch.randint(len(tokens) - 16, (4,), generator=torch.Generator().manual_seed(0)).tolist()
    assert [x[b].tolist() for b in range(4)] == [tokens[i : i + 16].tolist() for i in ix]
    x2, _ = TokenShards(tmp_path / "d").get_batch(4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)

    seq = SequentialBatches(tokens, 2, 8)
    batches = [next(seq) for _ in range(5)]
    assert batches[0][0].flatten().tolist() == tokens[0:8].tolist() + tokens[8:16].tolist()
    resumed = SequentialBatches(tokens, 2, 8)
    resumed.load_state_dict(json.loads(json.dumps(seq.state_dict())))
    assert torch.equal(next(resumed)[0], next(seq)[0])
    # Two ranks read disjoint windows that together equal the single-process stream.
    r0, r1 = SequentialBatches(tokens, 1, 8, 0, 2), SequentialBatches(tokens, 1, 8, 1, 2)
    assert torch.equal(torch.cat([next(r0)[0], next(r1)[0]]), batches[0][0])
    with pytest.raises(InputError, match="seq_len"):
        get_batch(tokens, 1, len(tokens))
    with pytest.raises(InputError, match="unknown split"):
        load_tokens(tmp_path / "d", "test")
    with open(tmp_path / "d" / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(InputError, match="truncated"):
        load_tokens(tmp_path / "d", "train")
    with pytest.raises(InputError, match="not a prepared data folder"):
        TokenShards(tmp_path)


def test_bad_inputs(tmp_path, bpe_dir):
    good = tmp_path / "good.txt"
    good.write_text(EN)
    prepare(good, bpe_dir, tmp_path / "out", val_fraction=0, progress=False)
    before = (tmp_path / "out" / "train.bin").read_bytes()

    (tmp_path / "empty.txt").write_text("  \n\x00\n")
    with pytest.raises(InputError, match="corpus is empty"):
        prepare(tmp_path / "empty.txt", bpe_dir, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "train.bin").read_bytes() == before  # the good dataset survived
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no staging debris

    with pytest.raises(InputError, match="does not exist"):
        prepare(tmp_path / "missing.txt", bpe_dir, tmp_path / "o", progress=False)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(InputError, match="not UTF-8"):
        prepare(tmp_path / "bin.txt", bpe_dir, tmp_path / "o", progress=False)
    (tmp_path / "no_field.jsonl").write_text('{"content": "hello"}\n')
    with pytest.raises(InputError, match="no field 'text'.*content"):
        prepare(tmp_path / "no_field.jsonl", bpe_dir, tmp_path / "o", progress=False)
    m = prepare(
        tmp_path / "no_field.jsonl", bpe_dir, tmp_path / "o", text_field="content", val_fraction=0, progress=False
    )
    assert m["splits"]["train"]["documents"] == 1
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(InputError, match="broken.jsonl:2: not valid JSON"):
        prepare(tmp_path / "broken.jsonl", bpe_dir, tmp_path / "o", progress=False, workers=2)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="holds no text files"):
        prepare(tmp_path / "empty_dir", bpe_dir, tmp_path / "o", progress=False)
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("x")
    with pytest.raises(InputError, match="refusing to overwrite"):
        prepare(good, bpe_dir, tmp_path / "keep", progress=False)
    assert (tmp_path / "keep" / "precious.txt").read_text() == "x"
    with pytest.raises(InputError, match="val_fraction"):
        prepare(good, bpe_dir, tmp_path / "o", val_fraction=1.5)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.txt"
        locked.write_text(EN)
        locked.chmod(0)
        with pytest.raises(InputError, match="not readable"):
            prepare(locked, bpe_dir, tmp_path / "o", progress=False)


def test_cli(tmp_path, bpe_dir, capsys):
    from llmkit.cli import main

    _write_corpus(tmp_path / "in")
    rc = main(
        [
            "data",
            "prepare",
            "--input",
            str(tmp_path / "in"),
            "--tokenizer",
            str(bpe_dir),
            "--out",
            str(tmp_path / "out"),
            "--min-chars",
            "10",
            "--val-fraction",
            "0",
            "--quiet",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "removed: empty=1, too_short=1, exact_duplicate=2, near_duplicate=2" in out
    assert "near_duplicate: " in out and "zh_near.txt" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dedup"]["report"]["kept_documents"] == 6
    assert main(["data", "info", str(tmp_path / "out")]) == 0
    assert f"train: {manifest['splits']['train']['tokens']:,} tokens, 6 documents" in capsys.readouterr().out
    assert (
        main(
            [
                "data",
                "prepare",
                "--input",
                str(tmp_path / "nope"),
                "--tokenizer",
                str(bpe_dir),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
