"""Text samples from a freshly trained model, through the one generation loop (`llmkit.infer`)."""

from __future__ import annotations

import torch

from llmkit.infer.generate import generate_text


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
    out = generate_text(
        model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed
    )
    return prompt + out if not out.startswith(prompt) else out
