"""LoRA training speed and memory: llmkit versus `peft` + `transformers` on the same model and data.

Model: Llama-shaped, hidden 256, 4 layers, 8 heads (GQA, 4 KV heads), intermediate 688, vocab 8192,
random init, fp32, CPU. LoRA r=16, alpha=32, dropout 0.05, on all linear projections (q, k, v, o,
gate, up, down), AdamW lr 1e-4, batches of 8 x 256 random tokens with the loss on every position.
Each side trains as its library does: llmkit through `finetune`'s own `apply_method` and `sft_loss`
(what `llmkit finetune --method lora` runs: frozen projections through oneDNN, LoRA's backward by
hand, fused chunked head + cross-entropy), peft + transformers with `F.cross_entropy` over the
model's logits (the computation of transformers' own `labels=` loss). Speed: both models in this
process, one optimizer step of each in turn (so a loaded machine slows both alike), `--steps` timed
steps after 2 warm-up steps; the median step time gives tokens/s. Memory: each side alone in a child
process for 3 steps; training memory = peak resident set minus the resident set just before the
first step (activations, gradients, optimizer state; the weights are the same on both sides).

    python benchmarks/bench_lora.py                    # 8 steps, 2 threads
    python benchmarks/bench_lora.py --steps 12 --threads 1
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


def build_side(side: str, folder: str):
    """(model, loss function of a [B, T+1] batch, trainable parameters) for llmkit or peft."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if side == "llmkit":
        import llmkit
        from llmkit.train.finetune import FinetuneConfig, apply_method, sft_loss

        model = llmkit.load_model(folder)  # exactly what `llmkit finetune --method lora` trains and computes
        apply_method(model, FinetuneConfig(model=folder, data=["-"], method="lora", lora_r=R, lora_alpha=ALPHA,
                                           lora_dropout=DROPOUT, lora_targets="all-linear"))
        model.check_inputs = False

        def loss_of(x):
            return sft_loss(model, {"input_ids": x[:, :-1]}, x[:, 1:])
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
    return model, loss_of, params


def batches(n: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g) for _ in range(n)]


def child(side: str, folder: str, steps: int, threads: int) -> dict:
    """Training memory of one side alone: peak RSS during `steps` steps minus RSS before them."""
    import torch

    torch.set_num_threads(threads)
    model, loss_of, params = build_side(side, folder)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    base_rss = rss_bytes()
    for x in batches(steps):
        loss_of(x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"train_mem_mib": (peak - base_rss) / 2**20, "trainable": sum(p.numel() for p in params)}


def speed(folder: str, steps: int, threads: int) -> dict[str, list[float]]:
    """Seconds per optimizer step of each side, the two sides alternating step by step in this
    process (so both see the same machine load)."""
    import torch

    torch.set_num_threads(threads)
    sides = {s: build_side(s, folder) for s in ("llmkit", "peft")}
    opts = {s: torch.optim.AdamW(v[2], lr=1e-4, weight_decay=0.0) for s, v in sides.items()}
    times: dict[str, list[float]] = {s: [] for s in sides}
    for i, x in enumerate(batches(steps + 2)):
        for s, (_, loss_of, _) in sides.items():
            t0 = time.perf_counter()
            loss_of(x).backward()
            opts[s].step()
            opts[s].zero_grad(set_to_none=True)
            if i >= 2:  # two warm-up steps
                times[s].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="timed steps per side (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["llmkit", "peft"])
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.steps, args.threads)))
        return
    folder = tempfile.mkdtemp(prefix="bench_lora_")
    build(folder)
    mem: dict[str, dict] = {}
    for side in ("llmkit", "peft"):
        out = subprocess.run([sys.executable, __file__, "--child", side, "--folder", folder, "--steps", "3",
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        mem[side] = json.loads(out.stdout.strip().splitlines()[-1])
    assert mem["llmkit"]["trainable"] == mem["peft"]["trainable"], "different trainable parameter counts"
    times = speed(folder, args.steps, args.threads)
    tok = BATCH * SEQ
    med = {s: statistics.median(v) for s, v in times.items()}
    for s, v in times.items():
        print(f"{s:6s}: step times {', '.join(f'{t:.2f}' for t in v)} s; median {tok / med[s]:,.0f} tok/s; "
              f"training memory {mem[s]['train_mem_mib']:,.0f} MiB")
    print(f"trainable parameters: {mem['llmkit']['trainable']:,} (both)")
    print(f"llmkit {tok / med['llmkit']:,.0f} tok/s, peft+transformers {tok / med['peft']:,.0f} tok/s: "
          f"ratio {med['peft'] / med['llmkit']:.2f}x")
    print(f"training memory: llmkit {mem['llmkit']['train_mem_mib']:,.0f} MiB, peft+transformers "
          f"{mem['peft']['train_mem_mib']:,.0f} MiB: ratio "
          f"{mem['llmkit']['train_mem_mib'] / max(mem['peft']['train_mem_mib'], 1e-9):.2f}x")
    print(f"load average: {os.getloadavg()}")

if __name__ == "__main__":
    main()
