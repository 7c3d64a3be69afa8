"""`llmkit grpo`: group relative policy optimisation with a reward model or a Python reward function."""

from __future__ import annotations

import argparse

from llmkit.cli._align_args import add_rl, rl_kwargs, rl_report


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "grpo", help="GRPO: G samples per prompt, group-normalised rewards, k3 KL to the reference",
        description="GRPO (Shao et al., 2024) from an SFT model. Rewards come from a reward-model folder or "
                    "--reward module:function; rollouts use llmkit's batched, KV-cached generation.")
    add_rl(p, "grpo")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.train.rl import grpo

    kw = rl_kwargs(args, "grpo")
    group = kw.pop("group_size")
    print(rl_report(grpo(args.model, args.reward, args.prompts, args.out, group_size=group, **kw), "grpo"))
    return 0
