"""`llmkit embed --model DIR TEXT...`: L2-normalised sentence embeddings as JSON lines."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="sentence embeddings from an encoder model folder")
    p.add_argument("--model", required=True, help="encoder folder, e.g. a sentence-transformers BERT")
    p.add_argument("texts", nargs="*", help="texts to embed (default: one per line on stdin)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import llmkit

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for text, vec in zip(texts, llmkit.embed(args.model, texts).tolist()):
        print(json.dumps({"text": text, "embedding": [round(x, 7) for x in vec]}))
    return 0
