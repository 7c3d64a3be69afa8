"""Alignment data and rewards for the sort-words task of `sft_task.py` (exact checker: the sorted words).

    python examples/align_task.py prompts --data out/sort/train.jsonl --out out/align/prompts.jsonl
    python examples/align_task.py prefs   --data out/sort/train.jsonl --out out/align/prefs.jsonl [--model SFT]
    python examples/align_task.py kl      --model out/al/grpo --ref SFT --prompts out/align/val_prompts.jsonl

`prompts` writes RL prompts ({"prompt", "answer"}). `prefs` writes preference pairs: chosen = the
correct answer, rejected = a wrong one: the SFT model's own wrong greedy/sampled answer when
--model is given (on-policy pairs), else a corrupted answer (two words swapped, a word dropped or
repeated). `kl` measures KL(policy || SFT) per token on the policy's own samples. `reward` is the
verifiable reward for `--reward examples.align_task:reward`.
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


def write_prompts(data: str, out: str, limit: int | None = None) -> Path:
    rows = [{"prompt": p, "answer": a} for p, a in _records(data)][:limit]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(out)


def write_prefs(data: str, out: str, model: str | None = None, limit: int | None = None, seed: int = 0,
                samples: int = 4, temperature: float = 0.5) -> tuple[Path, int]:
    """Pairs (correct, wrong); with `model`, wrong answers are the model's own mistakes (greedy first, then
    samples at `temperature`) when it makes any, else corrupted answers. Returns the path and how many
    rejected answers came from the model."""
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
    args = ap.parse_args(argv)
    if args.cmd == "prompts":
        print(f"wrote {write_prompts(args.data, args.out, args.limit)}")
    elif args.cmd == "kl":
        print(json.dumps(reference_kl(args.model, args.ref, args.prompts, args.samples, args.temperature, args.limit)))
    else:
        path, n = write_prefs(args.data, args.out, args.model, args.limit, args.seed,
                              temperature=args.temperature)
        print(f"wrote {path} ({n} rejected answers from the model, the rest corrupted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
