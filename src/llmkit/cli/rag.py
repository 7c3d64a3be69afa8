"""`llmkit rag index|query|ask|eval`: retrieval-augmented generation over a store (docs/rag.md)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rag", help="index documents, retrieve chunks, answer with citations, evaluate retrieval")
    rs = p.add_subparsers(dest="rag_command", metavar="SUBCOMMAND", required=True)

    def store_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--store", required=True, help="a folder (embedded store) or a postgresql:// URI")
        q.add_argument("--embed-model", default=None, help="encoder folder (default: the store's, else MiniLM)")
        q.add_argument("--embed-url", default=None, help="OpenAI-compatible server for /v1/embeddings")
        q.add_argument("--embed-name", default=None, help="model id at --embed-url (default: the first that embeds)")

    def retrieval_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("-k", type=int, default=5, help="how many chunks (default 5)")
        q.add_argument("--mode", choices=["hybrid", "dense", "bm25"], default="hybrid")
        q.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                       help="keep chunks whose source, page or metadata field equals VALUE (repeatable)")

    q = rs.add_parser("index", help="add new/changed documents to a store, drop deleted ones")
    q.add_argument("--docs", nargs="+", required=True, metavar="PATH", help="files or folders (searched recursively)")
    store_args(q)
    q.add_argument("--chunk-size", type=int, default=200, help="max tokens per chunk (default 200)")
    q.add_argument("--chunk-overlap", type=int, default=20, help="tokens shared by consecutive chunks (default 20)")
    q.add_argument("--text-field", default="text", help="the text field of .jsonl records (default: text)")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q.set_defaults(func=run_index)

    q = rs.add_parser("query", help="retrieve the best chunks for a question")
    q.add_argument("question")
    store_args(q)
    retrieval_args(q)
    q.add_argument("--mmr", action="store_true", help="diversify the results (maximal marginal relevance)")
    q.add_argument("--json", action="store_true", help="print one JSON list, best first")
    q.set_defaults(func=run_query)

    q = rs.add_parser("ask", help="answer a question from retrieved chunks, citing them as [n]")
    q.add_argument("question")
    store_args(q)
    retrieval_args(q)
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", default=None, help="model folder, generated with llmkit's engine")
    g.add_argument("--base-url", default=None, help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    q.add_argument("--served-model", default=None, help="model id at --base-url (default: the first listed)")
    q.add_argument("--max-tokens", type=int, default=256)
    q.add_argument("--temperature", type=float, default=None)
    q.add_argument("--json", action="store_true", help="print answer, citations and context as one JSON object")
    q.set_defaults(func=run_ask)

    q = rs.add_parser("eval", help="recall@k, MRR and nDCG@10 of dense, bm25 and hybrid retrieval on a qrels file")
    store_args(q)
    q.add_argument("--qrels", required=True, help='JSONL: {"query": "...", "relevant": ["doc path", ...]} a line')
    q.add_argument("-k", type=int, default=10, help="the k of recall@k (default 10)")
    q.add_argument("--mode", nargs="+", choices=["hybrid", "dense", "bm25"], default=["dense", "bm25", "hybrid"])
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_eval)


def _index(args):
    from llmkit.rag import Index

    return Index(args.store, args.embed_model, args.embed_url, args.embed_name)


def run_index(args) -> int:
    with _index(args) as idx:
        s = idx.add(args.docs, args.chunk_size, args.chunk_overlap, text_field=args.text_field)
    if args.json:
        print(json.dumps(s))
    else:
        print(f"{s['documents']} documents ({s['indexed']} indexed, {s['unchanged']} unchanged, {s['deleted']} "
              f"deleted), {s['chunks']} chunks, {s['tokens']} tokens, {s['seconds']:.1f} s; "
              f"the store holds {s['store_chunks']} chunks")
    return 0


def _print_hit(h, width: int = 300) -> None:
    where = h.source + (f" p.{h.page}" if h.page is not None else "")
    trail = f"  [{' > '.join(h.headings)}]" if h.headings else ""
    text = " ".join(h.text.split())
    print(f"{h.rank}. {h.score:.4f}  {where}{trail}\n   {text[:width]}{'...' if len(text) > width else ''}")


def run_query(args) -> int:
    with _index(args) as idx:
        hits = idx.query(args.question, args.k, args.mode, args.filter, use_mmr=args.mmr)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False))
    else:
        for h in hits:
            _print_hit(h)
    return 0


def run_ask(args) -> int:
    from llmkit.rag.answer import Answer, citations

    sampling = {} if args.temperature is None else {"temperature": args.temperature}
    with _index(args) as idx:
        hits, deltas = idx.ask_stream(args.question, model=args.model, base_url=args.base_url, k=args.k,
                                      mode=args.mode, filters=args.filter, max_tokens=args.max_tokens,
                                      served_model=args.served_model, **sampling)
        parts = []
        for d in deltas:
            parts.append(d)
            if not args.json:
                sys.stdout.write(d)
                sys.stdout.flush()
    text = "".join(parts)
    ans = Answer(text, hits, citations(text, len(hits)))
    if args.json:
        print(json.dumps(ans.to_dict(), ensure_ascii=False))
        return 0
    print("\n\nSources:" if ans.cited else "\n\nContext (not cited):")
    for n, h in ans.sources() if ans.cited else enumerate(hits, 1):
        print(f"[{n}] {h.citation()}")
    return 0


def run_eval(args) -> int:
    with _index(args) as idx:
        res = idx.evaluate(args.qrels, k=args.k, modes=args.mode)
    if args.json:
        print(json.dumps(res))
        return 0
    names = [n for n in next(iter(res.values())) if n != "questions"]
    print(f"{next(iter(res.values()))['questions']} questions")
    print(f"{'mode':8s}" + "".join(f"{n:>10s}" for n in names))
    for mode, m in res.items():
        print(f"{mode:8s}" + "".join(f"{m[n]:10.4f}" for n in names))
    return 0
