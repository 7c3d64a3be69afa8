"""Alignment data and rewards for the sort-words task of `sft_task.py` (exact checker: the sorted words).

    python examples/align_task.py prompts --data out/sort/train.jsonl --out out/align/prompts.jsonl
    python examples/align_task.py prefs   --data out/sort/train.jsonl --out out/align/prefs.jsonl [--model SFT]
    python examples/align_task.py kl      --model out/al/grpo --ref SFT --prompts out/align/val_prompts.jsonl
    python examples/align_task.py rmcheck --model POLICY --rm RM --data out/sort/val.jsonl [--samples 4]

`prompts` writes RL prompts ({"prompt", "answer"}). `prefs` writes preference pairs: chosen = the
correct answer, rejected = a wrong one: the SFT model's own wrong greedy/sampled answer when
--model is given (on-policy pairs), else a corrupted answer (two words swapped, a word dropped or
repeated). `kl` measures KL(policy || SFT) per token on the policy's own samples. `reward` is the
verifiable reward for `--reward examples.align_task:reward`. `rmcheck`
samples a policy's answers and tells how well a reward model's scores on them agree with the
checker (AUC of correct vs wrong, the same within each prompt, and what the top-scored wrong
answers look like): the reward-hacking check of docs/align.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def reward(prompt: str, completion: str, answer: str = "", **row) -> float:
    """1.0 when the completion is exactly the sorted words, else 0.0."""
    return float(completion.strip() == answer.strip())


def _records(path: str) -> list[tuple[str, str]]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            msgs = json.loads(line)["messages"]
            out.append((msgs[0]["content"], msgs[-1]["content"]))
    return out


def corrupt(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: two words swapped, one dropped, or one repeated."""
    w = answer.split()
    kind = rng.choice(["swap", "drop", "repeat"]) if len(w) > 2 else "swap"
    if kind == "swap":
        i, j = sorted(rng.sample(range(len(w)), 2))
        w[i], w[j] = w[j], w[i]
    elif kind == "drop":
        w.pop(rng.randrange(len(w)))
    else:
        i = rng.randrange(len(w))
        w.insert(i, w[i])
    return " ".join(w)


def substitute(answer: str, vocab: list[str], rng: random.Random) -> str:
    """A sorted answer with one word replaced by another word of the task: looks right, checks wrong."""
    head, _, rest = answer.rpartition(": ") if ": " in answer else ("", "", answer)
    w = rest.split()
    w[rng.randrange(len(w))] = rng.choice([v for v in vocab if v not in w])
    return (head + ": " if head else "") + " ".join(sorted(w))


def write_prompts(data: str, out: str, limit: int | None = None) -> Path:
    rows = [{"prompt": p, "answer": a} for p, a in _records(data)][:limit]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(out)


def write_prefs(data: str, out: str, model: str | None = None, limit: int | None = None, seed: int = 0,
                samples: int = 4, temperature: float = 0.5, substitutes: int = 0) -> tuple[Path, int]:
    """Pairs (correct, wrong); with `model`, wrong answers are the model's own mistakes (greedy first, then
    samples at `temperature`) when it makes any, else corrupted answers; `substitutes` more pairs per prompt
    reject the answer with one word swapped for another word of the task (still sorted). Returns the path
    and how many rejected answers came from the model."""
    rng = random.Random(seed)
    recs = _records(data)[:limit]
    wrong: dict[int, str] = {}
    if model:
        import llmkit
        from llmkit.data.sft import chat_ids
        from llmkit.infer.generate import eos_token_ids

        m, tok = llmkit.load_model(model), llmkit.load_tokenizer(model)
        stop = eos_token_ids(m, tok)
        ids = [chat_ids(tok, [{"role": "user", "content": p}], True) for p, _ in recs]
        for k in range(samples):
            for i in range(0, len(ids), 64):
                outs = llmkit.generate(m, ids[i : i + 64], max_new_tokens=24, eos_token_ids=stop,
                                       temperature=0.0 if k == 0 else temperature)
                for j, g in enumerate(outs):
                    text = tok.decode(g, skip_special_tokens=True).strip()
                    if text != recs[i + j][1] and i + j not in wrong:
                        wrong[i + j] = text
    rows = [{"prompt": p, "chosen": a, "rejected": wrong.get(i) or corrupt(a, rng)} for i, (p, a) in enumerate(recs)]
    vocab = sorted({w for _, a in recs for w in a.partition(": ")[2].split()})
    rows += [{"prompt": p, "chosen": a, "rejected": substitute(a, vocab, rng)}
             for p, a in recs for _ in range(substitutes)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(out), len(wrong)


def reference_kl(model: str, ref: str, prompts: str, samples: int = 8, temperature: float = 0.5,
                 limit: int | None = 200, seed: int = 0) -> dict[str, float]:
    """KL(model || ref) on answers `model` samples (`samples` per prompt at `temperature`) for the
    prompts of a `prompts` file: k1 = log p - log ref and k3 per answer token, with both models'
    log-probs of logits / temperature (the sampling distributions, as GRPO's `kl`)."""
    import torch

    import llmkit
    from llmkit.data.sft import chat_ids
    from llmkit.infer.generate import eos_token_ids
    from llmkit.train.align_losses import k3_kl, token_logps

    torch.manual_seed(seed)
    pol, base, tok = llmkit.load_model(model).eval(), llmkit.load_model(ref).eval(), llmkit.load_tokenizer(model)
    rows = [json.loads(x) for x in Path(prompts).read_text().splitlines() if x.strip()][:limit]
    k1 = k3 = n = 0.0
    for i in range(0, len(rows), 25):
        ids = [chat_ids(tok, [{"role": "user", "content": r["prompt"]}], True) for r in rows[i : i + 25]]
        ids = [p for p in ids for _ in range(samples)]
        outs = llmkit.generate(pol, ids, max_new_tokens=24, eos_token_ids=eos_token_ids(pol, tok),
                               temperature=temperature)
        for p, o in zip(ids, outs):
            x, y = torch.tensor([p + o]), torch.tensor([o])
            with torch.no_grad():
                lp, lr = (token_logps(m(x)[:, len(p) - 1 : -1] / temperature, y)[0] for m in (pol, base))
            k1, k3, n = k1 + float((lp - lr).sum()), k3 + float(k3_kl(lp, lr).sum()), n + len(o)
    return {"answers": len(rows) * samples, "tokens": int(n), "k1_per_token": k1 / n,
            "k1_per_answer": k1 / (len(rows) * samples), "k3_per_token": k3 / n}
def kind_of_mistake(completion: str, answer: str) -> str:
    """What is wrong with a completion: 'ok', 'order' (same words, misordered), 'missing' (sorted,
    a word dropped), 'extra' (a word added or repeated) or 'other'."""
    got, want = completion.strip().split(), answer.strip().split()
    if got == want:
        return "ok"
    if sorted(got) == sorted(want):
        return "order"
    if len(got) < len(want) and set(got) <= set(want):
        return "missing"
    if len(got) > len(want) and set(want) <= set(got):
        return "extra"
    return "other"


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a positive outscores a negative), ties half (the Mann-Whitney statistic)."""
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def rm_check(model: str, rm: str, data: str, limit: int = 200, samples: int = 4, temperature: float = 0.5,
             adapter: str | None = None) -> dict:
    """Sample `samples` answers per held-out prompt from `model` and compare the RM's scores with the checker."""
    import llmkit
    from llmkit.data.sft import chat_ids
    from llmkit.infer.generate import eos_token_ids
    from llmkit.model.reward import load_reward_model, score_ids

    recs = _records(data)[:limit]
    m, tok = llmkit.load_model(model, adapter=adapter), llmkit.load_tokenizer(model)
    stop = eos_token_ids(m, tok)
    r, rtok = load_reward_model(rm), llmkit.load_tokenizer(rm)
    rows = []  # (prompt index, completion, correct, kind)
    for k in range(samples):
        ids = [chat_ids(tok, [{"role": "user", "content": p}], True) for p, _ in recs]
        for i in range(0, len(ids), 64):
            outs = llmkit.generate(m, ids[i : i + 64], max_new_tokens=24, eos_token_ids=stop,
                                   temperature=0.0 if k == 0 and samples == 1 else temperature)
            for j, g in enumerate(outs):
                text = tok.decode(g, skip_special_tokens=True)
                kind = kind_of_mistake(text, recs[i + j][1])
                rows.append((i + j, text, kind == "ok", kind))
    scores = score_ids(r, [chat_ids(rtok, [{"role": "user", "content": recs[i][0]},
                                          {"role": "assistant", "content": c}], False)
                           for i, c, _, _ in rows], batch_size=64)
    pos = [s for s, row in zip(scores, rows) if row[2]]
    neg = [s for s, row in zip(scores, rows) if not row[2]]
    within = []
    for i in range(len(recs)):
        ps = [s for s, row in zip(scores, rows) if row[0] == i and row[2]]
        ns = [s for s, row in zip(scores, rows) if row[0] == i and not row[2]]
        if ps and ns:
            within.append(auc(ps, ns))
    kinds: dict[str, list[float]] = {}
    for s, row in zip(scores, rows):
        kinds.setdefault(row[3], []).append(s)
    top_wrong = sorted(((s, row) for s, row in zip(scores, rows) if not row[2]), key=lambda x: -x[0])[:5]
    return {"samples": len(rows), "exact_match": len(pos) / len(rows), "auc": auc(pos, neg),
            "within_prompt_auc": sum(within) / len(within) if within else float("nan"), "mixed_prompts": len(within),
            "mean_score_correct": sum(pos) / max(len(pos), 1), "mean_score_wrong": sum(neg) / max(len(neg), 1),
            "kinds": {k: (len(v), sum(v) / len(v)) for k, v in sorted(kinds.items())},
            "top_wrong": [(round(s, 3), recs[row[0]][1], row[1].strip()) for s, row in top_wrong]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int)
    q = sub.add_parser("prefs")
    q.add_argument("--data", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--model", help="take rejected answers from this model's mistakes")
    q.add_argument("--limit", type=int)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--temperature", type=float, default=0.5, help="sampling temperature of the model's answers")
    k = sub.add_parser("kl", help="KL(--model || --ref) per token on answers --model samples for --prompts")
    k.add_argument("--model", required=True)
    k.add_argument("--ref", required=True)
    k.add_argument("--prompts", required=True)
    k.add_argument("--samples", type=int, default=8)
    k.add_argument("--temperature", type=float, default=0.5)
    k.add_argument("--limit", type=int, default=200)
    q.add_argument("--substitutes", type=int, default=0,
                   help="extra pairs per prompt rejecting the answer with one word replaced (still sorted)")
    c = sub.add_parser("rmcheck")
    c.add_argument("--model", required=True, help="the policy whose answers are scored")
    c.add_argument("--adapter")
    c.add_argument("--rm", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--limit", type=int, default=200)
    c.add_argument("--samples", type=int, default=4, help="answers per prompt (1 = the greedy answer)")
    c.add_argument("--temperature", type=float, default=0.5)
    args = ap.parse_args(argv)
    if args.cmd == "rmcheck":
        out = rm_check(args.model, args.rm, args.data, args.limit, args.samples, args.temperature, args.adapter)
        print(json.dumps({k: v for k, v in out.items() if k != "top_wrong"}))
        for s, want, got in out["top_wrong"]:
            print(f"  {s:+.3f}  want {want!r}  got {got!r}")
    elif args.cmd == "prompts":
        print(f"wrote {write_prompts(args.data, args.out, args.limit)}")
    elif args.cmd == "kl":
        print(json.dumps(reference_kl(args.model, args.ref, args.prompts, args.samples, args.temperature, args.limit)))
    else:
        path, n = write_prefs(args.data, args.out, args.model, args.limit, args.seed,
                              temperature=args.temperature, substitutes=args.substitutes)
        print(f"wrote {path} ({n} rejected answers from the model, the rest corrupted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
