"""Per family (random-initialised transformers model): logits parity error, greedy-token match of
`llmkit.generate` and of the continuous-batching `Engine`, and batch-1 decode tokens/s of
`llmkit.generate` vs transformers `generate` (alternating runs, medians).

    PYTHONPATH=src python benchmarks/bench_families.py [--new 48] [--reps 3] [--families t5,llama]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers as T

import llmkit
from llmkit.infer.engine import Engine
from llmkit.infer.sampling import SamplingParams

V = 2048
DEC = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
           vocab_size=V, max_position_embeddings=512, bos_token_id=0, eos_token_id=None, pad_token_id=0)
LONGROPE = dict(rope_type="longrope", short_factor=[1.0] * 16, long_factor=[2.0] * 16,
                original_max_position_embeddings=256, rope_theta=1e4)
FAMILIES = {
    "llama": (T.LlamaConfig, DEC),
    "qwen3": (T.Qwen3Config, dict(DEC, head_dim=32)),
    "gemma2": (T.Gemma2Config, dict(DEC, head_dim=32, sliding_window=64, query_pre_attn_scalar=32)),
    "gemma3_text": (T.Gemma3TextConfig, dict(DEC, head_dim=32, sliding_window=64, query_pre_attn_scalar=32)),
    "phi3": (T.Phi3Config, dict(DEC, original_max_position_embeddings=256, rope_parameters=LONGROPE)),
    "t5": (T.T5Config, dict(vocab_size=V, d_model=256, d_kv=32, d_ff=512, num_layers=4, num_heads=8,
                            decoder_start_token_id=0, eos_token_id=None, dropout_rate=0.0)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset")
    args = ap.parse_args()
    print("| family | max abs logit error | greedy tokens equal (generate / engine) | llmkit tok/s | "
          "transformers tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.families.split(","):
        C, kw = FAMILIES[name]
        torch.manual_seed(0)
        seq2seq = name == "t5"
        auto = T.AutoModelForSeq2SeqLM if seq2seq else T.AutoModelForCausalLM
        ref = auto.from_config(C(**kw), attn_implementation="eager").eval()
        ref.generation_config.eos_token_id = None
        with tempfile.TemporaryDirectory() as d:
            ref.save_pretrained(d)
            model = llmkit.load_model(d)
        ids = torch.randint(1, V, (1, 64))
        with torch.no_grad():
            if seq2seq:
                err = (ref(input_ids=ids, decoder_input_ids=ids).logits - model(ids, decoder_input_ids=ids)).abs().max()
            else:
                err = (ref(ids).logits - model(ids)).abs().max()
        prompt = ids[0, :32].tolist()
        ours_t, hf_t = [], []
        for _ in range(args.reps):  # alternate: the box is shared
            t = time.perf_counter()
            got = llmkit.generate(model, prompt, max_new_tokens=args.new)
            ours_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.no_grad():
                out = ref.generate(torch.tensor([prompt]), max_new_tokens=args.new, do_sample=False)
            hf_t.append(time.perf_counter() - t)
        want = out[0, 1:].tolist() if seq2seq else out[0, len(prompt):].tolist()
        with Engine(model, max_batch_size=2) as engine:  # batched with a shorter prompt
            greedy = SamplingParams(max_new_tokens=args.new, temperature=0.0)
            hs = [engine.submit(p, greedy) for p in (prompt, prompt[:9])]
            eng = hs[0].result().token_ids
        o, h = args.new / statistics.median(ours_t), args.new / statistics.median(hf_t)
        print(f"| `{name}` | {err.item():.1e} | {got == want} / {eng == want} | {o:.0f} | {h:.0f} | {o / h:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
