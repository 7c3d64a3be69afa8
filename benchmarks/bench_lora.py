"""LoRA training speed and memory: llmkit versus `peft` + `transformers` on the same model and data.

Model: Llama-shaped, hidden 256, 4 layers, 8 heads (GQA, 4 KV heads), intermediate 688, vocab
8192, random init, fp32, CPU. LoRA r=16, alpha=32, dropout 0.05, on all linear projections (q, k,
v, o, gate, up, down), AdamW lr 1e-4, batches of 8 x 256 random tokens with the loss on every
position. Each side runs in its own child process (so peak memory is its own), alternating
llmkit / peft for `--rounds` rounds; each round times `--steps` optimizer steps after 2 warm-up
steps. Reports the median tokens/s of each, their ratio, and the training memory of each: peak
resident set during training minus the resident set just before the first step (activations,
gradients and optimizer state; the weights are the same on both sides).

    python benchmarks/bench_lora.py                    # 3 rounds, 10 steps, 2 threads
    python benchmarks/bench_lora.py --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HIDDEN, LAYERS, HEADS, KV, INTER, VOCAB, BATCH, SEQ = 256, 4, 8, 4, 688, 8192, 8, 256
R, ALPHA, DROPOUT = 16, 32, 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(folder: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
                                   max_position_embeddings=SEQ, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(side: str, folder: str, steps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if side == "llmkit":
        import llmkit
        from llmkit.model.lora import LoRAConfig, add_lora

        model = llmkit.load_model(folder)
        model.requires_grad_(False)
        add_lora(model, LoRAConfig(r=R, alpha=ALPHA, dropout=DROPOUT, targets="all-linear"))
        model.check_inputs = False

        def loss_of(x):
            logits = model(x[:, :-1])
            return F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    else:
        import peft
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                        target_modules=TARGETS, task_type="CAUSAL_LM"))

        def loss_of(x):
            logits = model(input_ids=x[:, :-1]).logits
            return F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g) for _ in range(steps + 2)]
    base_rss = rss_bytes()
    t0 = 0.0
    for i, x in enumerate(batches):
        if i == 2:
            t0 = time.perf_counter()
        loss = loss_of(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_sec": steps * BATCH * SEQ / dt, "train_mem_mib": (peak - base_rss) / 2**20,
            "trainable": sum(p.numel() for p in params), "final_loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["llmkit", "peft"])
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.steps, args.threads)))
        return
    folder = tempfile.mkdtemp(prefix="bench_lora_")
    build(folder)
    res: dict[str, list[dict]] = {"llmkit": [], "peft": []}
    for r in range(args.rounds):
        for side in ("llmkit", "peft"):
            out = subprocess.run([sys.executable, __file__, "--child", side, "--folder", folder, "--steps",
                                  str(args.steps), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            res[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {side:6s}: {res[side][-1]['tokens_per_sec']:,.0f} tok/s, "
                  f"training memory {res[side][-1]['train_mem_mib']:,.0f} MiB", flush=True)
    med = {s: statistics.median(x["tokens_per_sec"] for x in v) for s, v in res.items()}
    mem = {s: statistics.median(x["train_mem_mib"] for x in v) for s, v in res.items()}
    assert res["llmkit"][0]["trainable"] == res["peft"][0]["trainable"], "different trainable parameter counts"
    print(f"trainable parameters: {res['llmkit'][0]['trainable']:,} (both)")
    print(f"llmkit {med['llmkit']:,.0f} tok/s, peft+transformers {med['peft']:,.0f} tok/s: "
          f"ratio {med['llmkit'] / med['peft']:.2f}x")
    print(f"training memory: llmkit {mem['llmkit']:,.0f} MiB, peft+transformers {mem['peft']:,.0f} MiB: "
          f"ratio {mem['llmkit'] / max(mem['peft'], 1e-9):.2f}x")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
