"""A small synthetic instruction task with an exact-match answer: sort 3-6 words alphabetically
(or, `--task reverse`, a text-to-text task for encoder-decoders: reverse the order of 3-4 words).

    python examples/sft_task.py make --out out/sort            # train.jsonl + val.jsonl (chat format)
    python examples/sft_task.py make --task reverse --out out/reverse   # prompt/completion format
    python examples/sft_task.py eval --model BASE [--adapter DIR] --data out/sort/val.jsonl

`make` draws words from a fixed list of 50 common words of Shakespeare's plays; the train and
held-out files share no word set. `eval` greedy-decodes each held-out prompt with llmkit and
prints the exact-match rate (the answer must equal the reference after stripping whitespace). A
decoder reads the prompt through the chat template; an encoder-decoder (T5) reads its plain text.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

# 50 common words of Shakespeare's plays, each a single token (with its leading space) of a BPE
# trained on tiny Shakespeare, so the task tests ordering, not spelling. The answer starts with
# "Sorted:" so that its first word has a leading space too (without one, 41 of the 50 words split
# into sub-word pieces); train and held-out examples never share a word set.
WORDS = """
all am and any arm art bear blood both brother call child come day dead down ear fair fear friend
good grace great hand hat head heart heaven honour house king long lord love man mother name night
noble old poor queen son soul sweet time true war word world
""".split()


def make_example(rng: random.Random) -> tuple[list[str], dict]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    prompt = "Sort these words alphabetically: " + " ".join(words)
    answer = "Sorted: " + " ".join(sorted(words))  # every word after a space: one token each
    return words, {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def make_reverse_example(rng: random.Random) -> tuple[list[str], dict]:
    """Text-to-text: "reverse: king good night" -> "night good king" (short enough for a 64-token char context)."""
    words = rng.sample(WORDS, rng.randint(3, 4))
    return words, {"prompt": "reverse: " + " ".join(words), "completion": " ".join(reversed(words))}


def make(out: str, n_train: int = 2000, n_val: int = 200, seed: int = 0, task: str = "sort") -> tuple[Path, Path]:
    """Write out/train.jsonl and out/val.jsonl; no held-out word set appears in training."""
    rng = random.Random(seed)
    seen: set[frozenset[str]] = set()
    rows: dict[str, list[dict]] = {"val": [], "train": []}
    draw = make_reverse_example if task == "reverse" else make_example
    for split, n in (("val", n_val), ("train", n_train)):
        while len(rows[split]) < n:
            words, ex = draw(rng)
            key = frozenset(words)
            if key in seen:
                continue
            seen.add(key)
            rows[split].append(ex)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    for split, ex in rows.items():
        (d / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ex))
    return d / "train.jsonl", d / "val.jsonl"


def exact_match(model, tokenizer, path: str, batch_size: int = 32, limit: int | None = None,
                max_new_tokens: int = 24) -> tuple[float, list]:
    """Greedy answers to each held-out prompt; the fraction equal to the reference, and the samples."""
    import llmkit
    from llmkit.data.sft import chat_ids
    from llmkit.infer.generate import eos_token_ids

    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:limit]
    prompts, refs = [], []
    for r in records:
        msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": r["completion"]}]
        if getattr(model, "is_encoder_decoder", False):  # as finetune trains it: the plain prompt text
            prompts.append(tokenizer.encode("\n".join(m["content"] for m in msgs[:-1])))
        else:
            prompts.append(chat_ids(tokenizer, msgs[:-1], add_generation_prompt=True))
        refs.append(msgs[-1]["content"].strip())
    stop = eos_token_ids(model, tokenizer)  # includes the chat template's end-of-turn token
    outs = []
    for i in range(0, len(prompts), batch_size):
        gen = llmkit.generate(model, prompts[i : i + batch_size], max_new_tokens=max_new_tokens, eos_token_ids=stop)
        outs += [tokenizer.decode(g, skip_special_tokens=True).strip() for g in gen]
    hits = sum(o == r for o, r in zip(outs, refs))
    return hits / max(1, len(refs)), list(zip(refs, outs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write train.jsonl and val.jsonl")
    m.add_argument("--out", required=True)
    m.add_argument("--n-train", type=int, default=2000)
    m.add_argument("--n-val", type=int, default=200)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--task", choices=("sort", "reverse"), default="sort")
    e = sub.add_parser("eval", help="held-out exact match of a model (optionally with an adapter)")
    e.add_argument("--model", required=True)
    e.add_argument("--adapter")
    e.add_argument("--data", required=True)
    e.add_argument("--limit", type=int)
    e.add_argument("--max-new-tokens", type=int, default=24, help="per answer (a char tokenizer needs ~40)")
    e.add_argument("--show", type=int, default=3, help="print this many (reference, output) pairs")
    args = ap.parse_args(argv)
    if args.cmd == "make":
        tr, va = make(args.out, args.n_train, args.n_val, args.seed, args.task)
        print(f"wrote {tr} ({args.n_train} examples) and {va} ({args.n_val})")
        return 0
    import llmkit

    model = llmkit.load_model(args.model, adapter=args.adapter)
    tokenizer = llmkit.load_tokenizer(args.model)
    t0 = time.perf_counter()
    em, pairs = exact_match(model, tokenizer, args.data, limit=args.limit, max_new_tokens=args.max_new_tokens)
    for ref, out in pairs[: args.show]:
        print(f"  reference {ref!r}\n  output    {out!r}")
    print(f"exact match {100 * em:.1f}% on {len(pairs)} held-out examples ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
