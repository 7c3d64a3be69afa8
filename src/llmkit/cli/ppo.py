"""`llmkit ppo`: RLHF with PPO (value head, per-token KL penalty, GAE) on a reward model or function."""

from __future__ import annotations

import argparse

from llmkit.cli._align_args import add_rl, rl_kwargs, rl_report


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ppo", help="PPO (RLHF): value head, per-token KL to the reference, GAE, clipped losses",
        description="PPO from an SFT model. Rewards come from a reward-model folder (llmkit rm train) or "
                    "--reward module:function; rollouts use llmkit's batched, KV-cached generation.")
    add_rl(p, "ppo")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.train.rl import ppo

    print(rl_report(ppo(args.model, args.reward, args.prompts, args.out, **rl_kwargs(args, "ppo")), "ppo"))
    return 0
