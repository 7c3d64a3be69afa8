"""Sampling options shared by `llmkit generate` and `llmkit chat`."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (config.json + safetensors + tokenizer.json)")
    p.add_argument("--adapter", help="PEFT adapter folder (LoRA or prompt tuning) to apply to --model")
    p.add_argument("--tokenizer", help="tokenizer folder if not the model folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as saved)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights on load (RTN, CPU kernels)")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * p(top) (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", help=r"stop string (repeatable; \n and \t are unescaped)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past EOS until --max-new-tokens")


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding", "propose tokens cheaply, verify them in one forward "
                             "(docs/inference.md); greedy output is unchanged")
    g.add_argument("--speculative-method", choices=["ngram", "draft_model"],
                   help="ngram: prompt lookup, no second model; draft_model: --draft-model proposes")
    g.add_argument("--draft-model", metavar="DIR", help="a smaller model with the same tokenizer that proposes tokens")
    g.add_argument("--num-speculative-tokens", type=int, help="tokens proposed per step (default 4)")
    g.add_argument("--prompt-lookup-max", type=int, help="ngram: longest suffix looked up (default 4)")
    g.add_argument("--prompt-lookup-min", type=int, help="ngram: shortest suffix looked up (default 1)")


def speculative_kwargs(args: argparse.Namespace) -> dict[str, Any] | None:
    """The `SpeculativeConfig` fields the flags set (None: no speculative decoding)."""
    from llmkit.errors import ConfigError

    method = args.speculative_method or ("draft_model" if args.draft_model else None)
    extra = {k: getattr(args, k) for k in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
             if getattr(args, k) is not None}
    if method is None:
        if extra:
            raise ConfigError(f"--{next(iter(extra)).replace('_', '-')} needs --speculative-method or --draft-model")
        return None
    if method == "draft_model" and not args.draft_model:
        raise ConfigError("--speculative-method draft_model needs --draft-model DIR")
    if method == "ngram" and args.draft_model:
        raise ConfigError("--draft-model was given with --speculative-method ngram; drop one of them")
    return {"method": method, **({"draft_model": args.draft_model} if args.draft_model else {}), **extra}


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=[s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop] if args.stop else None,
        ignore_eos=args.ignore_eos,
    )


def load_model_and_tokenizer(args: argparse.Namespace):
    import torch

    import llmkit

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = llmkit.load_model(args.model, dtype=dtype, device=args.device, quantize=getattr(args, "quantize", None),
                              adapter=getattr(args, "adapter", None))
    tokenizer = llmkit.load_tokenizer(args.tokenizer or args.model)
    return model, tokenizer
