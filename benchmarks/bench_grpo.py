"""GRPO step time: llmkit's `grpo` versus trl's `GRPOTrainer` on the same model, prompts, G and lengths.

Model: Llama-shaped, hidden 128, 4 layers, 4 heads, intermediate 352, a 1024-token BPE tokenizer with
ChatML, random init, fp32, CPU (a random model rarely emits end-of-turn, so both sides generate
the full completion length). Each step: `--prompts-per-step` prompts x G samples, up to
`--new-tokens` new tokens at temperature 1, rewards from the same Python function, beta 0.04
(both compute reference log-probs), one optimizer step (lr 1e-5). Each side runs in its own child
process, alternating llmkit / trl for `--rounds` rounds; each round times `--steps` steps after one
warm-up step. Reports the median step time of each and the ratio, and the same for the CPU time
of a step (the process's, less sensitive to other load on a shared machine).

    python benchmarks/bench_grpo.py                      # 3 rounds, 4 steps, 1 thread
    python benchmarks/bench_grpo.py --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

WORDS = "apple bear cat dog eel fig goat hen ink jam kite lion moon nut owl pear".split()


def reward_fn(prompt, completion, **row) -> float:
    """Shared by both sides: a cheap verifiable reward (the completion's share of distinct words)."""
    text = completion if isinstance(completion, str) else completion[-1]["content"]
    w = text.split()
    return len(set(w)) / max(1, len(w))


def build(folder: str) -> None:
    import torch

    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer
    from llmkit.tokenizer import train_bpe_from_iterator

    texts = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(8)) for i in range(400)]
    tok = train_bpe_from_iterator(texts + ["sort the words, system user assistant"] * 20, vocab_size=1024,
                                  show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_embd=128,
                      intermediate_size=352, block_size=256, eos_token_id=tok.eos_token_id)
    Transformer(cfg).save_pretrained(folder)
    tok.save(folder)
    with open(os.path.join(folder, "prompts.jsonl"), "w") as f:
        for i in range(64):
            words = " ".join(WORDS[(i * 5 + k * 3) % 16] for k in range(5))
            f.write(json.dumps({"prompt": "Sort these words: " + words}) + "\n")


def child(side: str, folder: str, steps: int, threads: int, prompts_per_step: int, G: int, new_tokens: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    prompts = os.path.join(folder, "prompts.jsonl")
    if side == "llmkit":
        from llmkit.train import rl

        times: list[float] = []
        cpu: list[float] = []
        real = rl.RLTrainer.train_step

        def timed(self):
            t0, c0 = time.perf_counter(), time.process_time()
            out = real(self)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            return out

        rl.RLTrainer.train_step = timed
        with tempfile.TemporaryDirectory() as out:
            rl.grpo(folder, f"{__file__}:reward_fn", prompts, out, group_size=G, batch_size=prompts_per_step,
                    max_steps=steps + 1, lr=1e-5, beta=0.04, max_new_tokens=new_tokens, eval_interval=10**6,
                    progress=False, num_threads=threads, eval_prompts=1)
        return {"step_times": times[1:], "cpu_times": cpu[1:]}

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(x) for x in open(prompts)]
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    times, cpu = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)

    def trl_reward(prompts, completions, **kw):
        return [reward_fn(p, c) for p, c in zip(prompts, completions)]

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=prompts_per_step * G, num_generations=G,
                         max_completion_length=new_tokens, max_steps=steps + 1, learning_rate=1e-5, beta=0.04,
                         use_cpu=True, report_to="none", logging_steps=10**6, save_strategy="no", temperature=1.0,
                         loss_type="grpo", disable_tqdm=True, dataloader_num_workers=0, seed=0)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder)
        tr = GRPOTrainer(model=model, reward_funcs=trl_reward, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[Timer()])
        tr.train()
    return {"step_times": times[1:], "cpu_times": cpu[1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = (args.steps, args.threads, args.prompts_per_step, args.group_size, args.new_tokens)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], *shape)))
        return
    with tempfile.TemporaryDirectory() as d:
        build(d)
        res: dict[str, list[float]] = {"llmkit": [], "trl": []}
        cpu: dict[str, list[float]] = {"llmkit": [], "trl": []}
        for r in range(args.rounds):
            for side in ("llmkit", "trl"):
                cmd = [sys.executable, __file__, "--child", side, d, "--steps", str(args.steps), "--threads",
                       str(args.threads), "--prompts-per-step", str(args.prompts_per_step), "--group-size",
                       str(args.group_size), "--new-tokens", str(args.new_tokens)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    sys.exit(f"{side} failed:\n{p.stderr[-3000:]}")
                out = json.loads(p.stdout.strip().splitlines()[-1])
                t = out["step_times"]
                res[side] += t
                cpu[side] += out["cpu_times"]
                print(f"round {r + 1} {side:6s}: median step {statistics.median(t):.3f} s over {len(t)} steps "
                      f"(CPU {statistics.median(out['cpu_times']):.3f} s)", flush=True)
    a, b = statistics.median(res["llmkit"]), statistics.median(res["trl"])
    ca, cb = statistics.median(cpu["llmkit"]), statistics.median(cpu["trl"])
    print(f"GRPO step ({args.prompts_per_step} prompts x G={args.group_size}, {args.new_tokens} new tokens, "
          f"{args.threads} thread(s)): llmkit {a:.3f} s, trl {b:.3f} s -> llmkit {b / a:.2f}x faster "
          f"(CPU time per step: llmkit {ca:.3f} s, trl {cb:.3f} s, {cb / ca:.2f}x); "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
