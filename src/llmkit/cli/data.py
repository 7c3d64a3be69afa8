"""`llmkit data`: prepare token shards from raw text; inspect a prepared folder."""

from __future__ import annotations

import argparse
import json


def _prepare(args: argparse.Namespace) -> int:
    from llmkit.data import format_report, prepare

    manifest = prepare(
        args.input,
        args.tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        min_chars=args.min_chars,
        near_dup_threshold=args.near_dup_threshold or None,
        text_field=args.text_field,
        workers=args.workers,
        normalization=args.normalization,
        normalize_whitespace=not args.keep_whitespace,
        doc_boundary=args.doc_boundary,
        split=args.split,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(format_report(manifest))
    print(f"wrote {args.out}/train.bin, val.bin, manifest.json, report.json")
    return 0


def _info(args: argparse.Namespace) -> int:
    from llmkit.data import read_manifest

    m = read_manifest(args.dir)
    if args.json:
        print(json.dumps(m, indent=2, ensure_ascii=False))
        return 0
    for split, info in m["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens, {info['documents']:,} documents ({info['file']})")
    print(
        f"dtype {m['dtype']}, vocab_size {m['vocab_size']}, eos {m['eos_token_id']}, "
        f"split {m['split']['mode']}, tokenizer {m['tokenizer']['path']}"
    )
    print("removed: " + ", ".join(f"{k}={v}" for k, v in m["dedup"]["report"]["removed"].items()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data",
        help="prepare token shards from raw text",
        description="Clean, deduplicate, tokenize and pack text into train/val token shards.",
    )
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    q = sub.add_parser("prepare", help="text files / folders / JSONL -> train.bin, val.bin, manifest.json")
    q.add_argument("--input", nargs="+", required=True, help="text files, folders (recursive) or .jsonl files")
    q.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.json)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--val-fraction", type=float, default=0.005, help="share of documents (or tokens) for val")
    q.add_argument("--min-chars", type=int, default=1, help="drop documents shorter than this after cleaning")
    q.add_argument(
        "--near-dup-threshold",
        type=float,
        default=0.8,
        help="MinHash Jaccard above which a document is a near duplicate (0 = off)",
    )
    q.add_argument("--text-field", default="text", help="JSONL field holding the text")
    q.add_argument("--workers", type=int, default=1, help="processes for cleaning / MinHash / tokenizing")
    q.add_argument("--normalization", choices=["NFC", "NFKC", "none"], default="NFC")
    q.add_argument(
        "--keep-whitespace", action="store_true", help="keep whitespace as is (default: tidy it, see README)"
    )
    q.add_argument(
        "--doc-boundary",
        choices=["file", "line", "blank-line"],
        default="file",
        help="what a document is inside a text file (JSONL: always one per record)",
    )
    q.add_argument(
        "--split",
        choices=["doc", "tail"],
        default="doc",
        help="doc: whole documents by seeded hash; tail: last fraction of the tokens (nanoGPT)",
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_prepare)

    i = sub.add_parser("info", help="print a prepared folder's manifest summary")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.set_defaults(func=_info)
