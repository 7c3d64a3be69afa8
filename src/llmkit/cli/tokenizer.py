"""`llmkit tokenizer`: train a BPE / character tokenizer, encode and decode text, render chat templates."""

from __future__ import annotations

import argparse
import json
import sys

from llmkit.errors import InputError


def _train(args: argparse.Namespace) -> int:
    from llmkit.tokenizer import train_bpe, train_char

    special = args.special_tokens.split(",") if args.special_tokens is not None else None
    if args.kind == "char":
        tok = train_char(args.files, args.out, special_tokens=special, text_field=args.text_field)
    else:
        if args.vocab_size is None:
            raise InputError("--vocab-size is required for --kind bpe (e.g. --vocab-size 8192)")
        tok = train_bpe(
            args.files,
            args.vocab_size,
            args.out,
            special_tokens=special,
            min_frequency=args.min_frequency,
            show_progress=sys.stderr.isatty(),
            text_field=args.text_field,
        )
    print(f"saved {args.kind} tokenizer with {tok.vocab_size} tokens to {args.out}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from llmkit.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = args.text if args.text is not None else sys.stdin.read()
    ids = tok.encode(text, add_special_tokens=not args.no_special_tokens)
    if args.tokens:
        print(json.dumps([tok.id_to_token(i) for i in ids], ensure_ascii=False))
    print(json.dumps(ids))
    print(f"{len(ids)} tokens, {len(text)} characters", file=sys.stderr)
    return 0


def _decode(args: argparse.Namespace) -> int:
    from llmkit.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    print(tok.decode(args.ids, skip_special_tokens=args.skip_special_tokens))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from llmkit.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    try:
        messages = json.loads(args.messages)
    except json.JSONDecodeError as e:
        raise InputError(f"--messages must be a JSON list of {{'role', 'content'}} objects: {e.msg}") from None
    sys.stdout.write(tok.apply_chat_template(messages, add_generation_prompt=not args.no_generation_prompt))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tokenizer",
        help="train, inspect and use tokenizers",
        description="Train a byte-level BPE or character tokenizer; encode/decode text.",
    )
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train a tokenizer on text files and save a Hugging Face folder")
    t.add_argument("--files", nargs="+", required=True, help="text files, JSONL files or folders (read lazily)")
    t.add_argument("--out", required=True, help="output folder (tokenizer.json + tokenizer_config.json)")
    t.add_argument("--kind", choices=["bpe", "char"], default="bpe")
    t.add_argument("--vocab-size", type=int, help="BPE vocabulary size incl. 256 bytes and special tokens")
    t.add_argument("--min-frequency", type=int, default=2, help="BPE: minimum pair count to merge")
    t.add_argument(
        "--special-tokens",
        help="comma-separated; the first is eos/bos/pad (default: <|endoftext|>,<|im_start|>,<|im_end|>)",
    )
    t.add_argument("--text-field", default="text", help="JSONL field holding the text")
    t.set_defaults(func=_train)

    e = sub.add_parser("encode", help="print the token ids of a text")
    e.add_argument("--tokenizer", required=True, help="tokenizer folder")
    e.add_argument("--text", help="text to encode (default: stdin)")
    e.add_argument("--no-special-tokens", action="store_true", help="do not add BOS/EOS etc.")
    e.add_argument("--tokens", action="store_true", help="also print the token strings")
    e.set_defaults(func=_encode)

    d = sub.add_parser("decode", help="print the text of token ids")
    d.add_argument("--tokenizer", required=True, help="tokenizer folder")
    d.add_argument("ids", nargs="+", type=int)
    d.add_argument("--skip-special-tokens", action="store_true")
    d.set_defaults(func=_decode)

    c = sub.add_parser("chat", help="render messages with the tokenizer's chat template")
    c.add_argument("--tokenizer", required=True, help="tokenizer folder")
    c.add_argument("--messages", required=True, help='JSON, e.g. \'[{"role": "user", "content": "hi"}]\'')
    c.add_argument("--no-generation-prompt", action="store_true")
    c.set_defaults(func=_chat)
