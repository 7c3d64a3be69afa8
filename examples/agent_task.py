"""Arithmetic a tiny model cannot do alone, solved by calling the calculator tool (docs/agents.md).

    python examples/agent_task.py make --out out/calc                 # train.jsonl, val.jsonl (chat + tool calls)
    python examples/agent_task.py eval --model DIR --data out/calc/val.jsonl --mode alone   # the model alone
    python examples/agent_task.py eval --model DIR --data out/calc/val.jsonl --mode agent   # llmkit's agent loop

Questions are 3-4-digit multiplications ("What is 4821 * 397?") and mixed expressions
("What is (352 + 4817) * 23 - 998?"). Each training record is an OpenAI-style chat with the calculator's
schema in `tools`; per question: the user's question, an assistant `tool_calls` message calling
`calculator` with the expression, the `tool` message with the calculator's result (computed by llmkit's
calculator), and the final assistant answer, which is the result. Training chats hold `--per-chat`
questions (default 3: the tools prompt is long and shared); held-out chats hold one question, and share no
expression with training.

`eval --mode alone` asks the model for the answer directly (greedy, no tools) and scores exact match;
`--mode agent` runs `llmkit.agent.Agent(model, tools=["calculator"])` on each question and scores its
final answer. Both print the accuracy and the wall time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def make_question(rng: random.Random) -> str:
    """An expression: a 3-4 digit multiplication, or a mixed expression with + - * and parentheses."""
    kind = rng.random()
    n = lambda lo, hi: rng.randint(lo, hi)  # noqa: E731
    if kind < 0.5:
        return f"{n(100, 9999)} * {n(100, 9999)}"
    if kind < 0.75:
        return f"({n(10, 9999)} + {n(10, 9999)}) * {n(10, 99)} - {n(10, 999)}"
    return f"{n(100, 999)} * {n(10, 99)} + {n(100, 9999)} - {n(10, 999)}"


def make_record(exprs: list[str], first_id: int) -> dict:
    """One chat with the calculator's schema: per question, the call, the tool's result and the answer."""
    from llmkit.agent.builtin import calculate, calculator

    messages = []
    for i, expr in enumerate(exprs):
        result, call_id = str(calculate(expr)), f"call_{first_id + i}"
        call = {"id": call_id, "type": "function",
                "function": {"name": "calculator", "arguments": json.dumps({"expression": expr})}}
        messages += [
            {"role": "user", "content": f"What is {expr}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": result},
            {"role": "assistant", "content": result},
        ]
    return {"tools": [calculator.schema], "messages": messages}


def make(out: str, n_train: int = 2000, n_val: int = 100, seed: int = 0, per_chat: int = 3) -> tuple[Path, Path]:
    """Write out/train.jsonl (`n_train` questions, `per_chat` to a conversation so the long tools prompt is
    shared) and out/val.jsonl (`n_val` one-question chats); no held-out expression appears in training."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: dict[str, list[dict]] = {"val": [], "train": []}
    for split, n, k in (("val", n_val, 1), ("train", n_train, per_chat)):
        done = 0
        while done < n:
            exprs = []
            while len(exprs) < min(k, n - done):
                expr = make_question(rng)
                if expr not in seen:
                    seen.add(expr)
                    exprs.append(expr)
            rows[split].append(make_record(exprs, len(seen)))
            done += len(exprs)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    for split, recs in rows.items():
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d / "train.jsonl", d / "val.jsonl"


def copy_text(out: str, n_lines: int = 40000, seed: int = 0) -> Path:
    """A pretraining text that requires copying (no questions, no tool calls): each line is a random span
    (printable ASCII, or numbers with operators) and 2-3 copies of it after short random fillers. A small
    model pretrained on it forms induction heads (attend to the earlier occurrence, copy what followed),
    which the tool-call task needs twice: the question's digits into the call, the result into the answer."""
    import string

    rng = random.Random(seed)
    chars = string.ascii_letters + string.digits + string.punctuation + " "

    def span() -> str:
        if rng.random() < 0.7:  # arithmetic-looking: numbers (up to 8 digits, as results are), operators
            nums = [str(rng.randint(0, 10 ** rng.randint(1, 8))) for _ in range(rng.randint(1, 4))]
            text = nums[0] + "".join(f" {rng.choice('+-*/')} {x}" for x in nums[1:])
            return f"({text})" if rng.random() < 0.2 else text
        return "".join(rng.choice(chars) for _ in range(rng.randint(2, 30)))

    def filler() -> str:
        return "".join(rng.choice(chars) for _ in range(rng.randint(0, 8)))

    lines = []
    for _ in range(n_lines):  # the span, then 2-3 copies after short fillers: most characters are copies
        s = span()
        lines.append(s + "".join(f" {filler()} {s}" for _ in range(rng.randint(2, 3))) + "\n")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


def copy_probe(model_dir: str, n: int = 20, seed: int = 123) -> float:
    """The copy probe: greedy continuation of `"4285 * 5974 xq! 4285 * 5974 Bz "` style prompts (a span of
    digits and operators, then a copy after a random filler, then a filler); a hit is the span copied exactly.
    A base model that passes (~all n) has the induction heads the tool-call task needs."""
    import string

    import llmkit

    rng = random.Random(seed)
    model, tokenizer = llmkit.load_model(model_dir), llmkit.load_tokenizer(model_dir)
    fill = lambda: "".join(rng.choice(string.ascii_letters + "!#?") for _ in range(rng.randint(2, 6)))  # noqa: E731
    hits = 0
    for i in range(n):
        span = make_question(rng)
        out = llmkit.generate_text(model, tokenizer, f"{span} {fill()} {span} {fill()} ", max_new_tokens=len(span))
        hits += out == span
        if i < 3:
            print(f"  {span!r} -> {out!r}")
    print(f"copy probe: {hits}/{n} spans copied exactly")
    return hits / n


def load(path: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(question, reference answer) pairs of a file written by `make`."""
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:limit]
    return [(r["messages"][0]["content"], r["messages"][-1]["content"].strip()) for r in recs]


def answer_alone(model, tokenizer, question: str) -> str:
    """The model's greedy answer without tools (no tool schema in the prompt)."""
    import llmkit
    from llmkit.data.sft import chat_ids

    ids = chat_ids(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    return llmkit.generate_text(model, tokenizer, ids, max_new_tokens=32).strip()


def evaluate(model_dir: str, data: str, mode: str, limit: int | None = None, max_steps: int = 4,
             trace_dir: str | None = None, show: int = 3, max_tokens: int = 128) -> dict:
    """Exact-match accuracy of `mode` ('alone' or 'agent') on the held-out questions, and the wall time."""
    import llmkit
    from llmkit.agent import Agent

    pairs = load(data, limit)
    model, tokenizer = llmkit.load_model(model_dir), llmkit.load_tokenizer(model_dir)
    agent = Agent(model, tools=["calculator"], tokenizer=tokenizer, max_steps=max_steps, max_tokens=max_tokens) \
        if mode == "agent" else None
    t0 = time.perf_counter()
    hits, outs = 0, []
    for i, (q, ref) in enumerate(pairs):
        if agent is None:
            out = answer_alone(model, tokenizer, q)
        else:
            trace = Path(trace_dir) / f"{i:04d}.jsonl" if trace_dir else None
            out = agent.run(q, trace=trace).answer or ""
        hits += out == ref
        outs.append((q, ref, out))
    seconds = time.perf_counter() - t0
    for q, ref, out in outs[:show]:
        print(f"  {q}  reference {ref!r}  answer {out!r}")
    acc = hits / max(1, len(pairs))
    print(f"{mode}: exact match {100 * acc:.1f}% ({hits}/{len(pairs)}) in {seconds:.1f} s")
    return {"mode": mode, "accuracy": acc, "n": len(pairs), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write train.jsonl and val.jsonl")
    m.add_argument("--out", required=True)
    m.add_argument("--n-train", type=int, default=2000)
    m.add_argument("--n-val", type=int, default=100)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--per-chat", type=int, default=3, help="questions per training conversation (default 3)")
    c = sub.add_parser("copytext", help="write a pretraining text that requires copying (induction heads)")
    c.add_argument("--out", required=True)
    c.add_argument("--lines", type=int, default=40000)
    c.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("probe", help="the copy probe: can the base model copy a span of digits it saw before?")
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=20)
    e = sub.add_parser("eval", help="held-out exact match of the model alone or of the agent with the calculator")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--mode", choices=["alone", "agent"], default="agent")
    e.add_argument("--limit", type=int)
    e.add_argument("--max-steps", type=int, default=4)
    e.add_argument("--max-tokens", type=int, default=128, help="new tokens per model call (a char-level call is ~90)")
    e.add_argument("--traces", default=None, help="write one agent trace per question into this folder")
    args = ap.parse_args(argv)
    if args.cmd == "make":
        tr, va = make(args.out, args.n_train, args.n_val, args.seed, args.per_chat)
        print(f"wrote {tr} ({args.n_train} questions) and {va} ({args.n_val})")
        return 0
    if args.cmd == "copytext":
        path = copy_text(args.out, args.lines, args.seed)
        print(f"wrote {path} ({args.lines} lines, {path.stat().st_size} characters)")
        return 0
    if args.cmd == "probe":
        copy_probe(args.model, args.n)
        return 0
    evaluate(args.model, args.data, args.mode, args.limit, args.max_steps, args.traces, max_tokens=args.max_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
