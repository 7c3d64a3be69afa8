"""Text samples from a freshly trained model (uses llmkit.infer when it is there)."""

from __future__ import annotations

import torch


@torch.no_grad()
def sample_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int | None = None,
) -> list[int]:
    """Plain ancestral sampling with temperature and top-k (no KV cache): prompt + new ids."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    block = model.config.block_size
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, T]
    for _ in range(max_new_tokens):
        logits = model(ids[:, -block:])[:, -1, :].float().cpu()  # [1, V]
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        ids = torch.cat([ids, nxt.to(device)], dim=1)
    return ids[0].tolist()


def sample_text(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    """Continue `prompt`; returns prompt + continuation."""
    model.eval()
    n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    max_new_tokens = max(1, min(max_new_tokens, model.config.block_size - n_prompt))  # stay in context
    try:  # the inference package's sampler (KV cache) when it is installed
        from llmkit.infer.generate import generate_text

        out = generate_text(
            model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed
        )
        return prompt + out if not out.startswith(prompt) else out
    except ImportError:
        pass
    ids = tokenizer.encode(prompt, add_special_tokens=False) or [tokenizer.eos_token_id or 0]
    return tokenizer.decode(sample_ids(model, ids, max_new_tokens, temperature, top_k, seed))
