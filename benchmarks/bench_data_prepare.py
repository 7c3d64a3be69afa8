"""Benchmark: `llmkit data prepare` throughput and tokenizer speed against their peers.

1. prepare on tinyshakespeare split into paragraphs (~7k documents, cleaning + exact/near dedup +
   tokenizing + packing) with 1 worker vs N workers: MB/s and the speed-up ratio.
2. encoding the same documents with llmkit's Tokenizer.encode_batch vs transformers' AutoTokenizer
   (both run the `tokenizers` library; the ratio shows llmkit adds no overhead).

    python benchmarks/bench_data_prepare.py [--text ../shared/data/tinyshakespeare/input.txt] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from llmkit.data import prepare
from llmkit.text.sources import iter_documents
from llmkit.tokenizer import load_tokenizer, train_bpe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default="../shared/data/tinyshakespeare/input.txt")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
    text = Path(args.text)
    mb = text.stat().st_size / 1e6

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train_bpe([text], args.vocab_size, f"{tmp}/tok", show_progress=False)
        print(f"train_bpe vocab {args.vocab_size}: {time.perf_counter() - t0:.2f} s for {mb:.2f} MB")

        timings = {}
        for workers in sorted({1, args.workers}):
            t0 = time.perf_counter()
            m = prepare(
                text, f"{tmp}/tok", f"{tmp}/data{workers}", doc_boundary="blank-line", workers=workers, progress=False
            )
            timings[workers] = time.perf_counter() - t0
            rep = m["dedup"]["report"]
            print(
                f"prepare workers={workers}: {timings[workers]:.2f} s = {mb / timings[workers]:.2f} MB/s "
                f"({rep['input_documents']} docs, removed {rep['removed']}, "
                f"{m['splits']['train']['tokens'] + m['splits']['val']['tokens']:,} tokens)"
            )
        if args.workers > 1:
            print(f"speed-up workers={args.workers} / workers=1: {timings[1] / timings[args.workers]:.2f}x")

        from transformers import AutoTokenizer

        docs = [d.text for d in iter_documents([text], doc_boundary="blank-line")]
        ours, ref = load_tokenizer(f"{tmp}/tok"), AutoTokenizer.from_pretrained(f"{tmp}/tok")
        best = {}
        for name, fn in (("llmkit", lambda: ours.encode_batch(docs)), ("transformers", lambda: ref(docs)["input_ids"])):
            best[name] = min(_timed(fn) for _ in range(3))
            print(f"encode {len(docs)} docs with {name}: {best[name]:.3f} s ({mb / best[name]:.2f} MB/s)")
        assert ours.encode_batch(docs) == ref(docs)["input_ids"]
        print(f"ratio llmkit / transformers time: {best['llmkit'] / best['transformers']:.2f}")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
