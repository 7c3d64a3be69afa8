"""Arguments the alignment commands (rm, dpo, ppo, grpo) share with `llmkit finetune`."""

from __future__ import annotations

import argparse
from typing import Any

from llmkit.cli._train_args import add_lora_args, add_run_args


def add_common(p: argparse.ArgumentParser, lr_help: str) -> None:
    p.add_argument("--method", choices=["full", "lora"], default="full")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_argument_group("schedule")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: one pass over the data)")
    g.add_argument("--lr", type=float, help=lr_help)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--warmup-steps", type=int)
    add_run_args(g)
    add_lora_args(p, dropout=0.0)
    p.add_argument("--no-progress", action="store_true")


def common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(method=args.method, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
                resume=args.resume, overwrite=args.overwrite, eval_interval=args.eval_interval,
                warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed, device=args.device,
                dtype=args.dtype, num_threads=args.num_threads, progress=not args.no_progress, lora_r=args.lora_r,
                lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_targets=args.lora_targets)


def add_rl(p: argparse.ArgumentParser, algo: str) -> None:
    p.add_argument("--model", required=True, help="the SFT policy to start from (model folder)")
    p.add_argument("--reward", required=True,
                   help="a reward model folder (llmkit rm train) or module:function, e.g. examples.align_task:reward; "
                        "called as fn(prompt, completion, **other_fields_of_the_line) -> float")
    p.add_argument("--prompts", required=True, nargs="+", help="prompt JSONL: {'prompt': str | messages, ...}")
    p.add_argument("--val-prompts", nargs="+", help="held-out prompts, decoded greedily at each eval")
    add_common(p, "peak learning rate (default: full 1e-5, lora 1e-4)")
    p.add_argument("--max-minutes", type=float,
                   help="time budget: stop once it is spent (evaluations included), whatever --max-steps says")
    r = p.add_argument_group("rollouts")
    r.add_argument("--group-size", type=int, default=4 if algo == "grpo" else 1, help="samples per prompt (G)")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--truncation-penalty", type=float,
                   help="reward given to responses cut at --max-new-tokens (default: keep their reward)")
    r.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts per evaluation")
    u = p.add_argument_group("update")
    u.add_argument("--ppo-epochs", type=int,
                   help=f"passes over each rollout batch (default {4 if algo == 'ppo' else 1})")
    u.add_argument("--num-minibatches", type=int, default=1)
    u.add_argument("--clip-range", type=float, default=0.2)
    if algo == "ppo":
        u.add_argument("--kl-coef", type=float, default=0.05, help="per-token KL penalty (initial, if adaptive)")
        u.add_argument("--kl-target", type=float, help="adapt --kl-coef toward this KL per sequence")
        u.add_argument("--kl-horizon", type=int, default=10000)
        u.add_argument("--gamma", type=float, default=1.0)
        u.add_argument("--lam", type=float, default=0.95)
        u.add_argument("--vf-coef", type=float, default=0.1)
        u.add_argument("--clip-range-value", type=float, default=0.2)
        u.add_argument("--ent-coef", type=float, default=0.0)
        u.add_argument("--no-whiten", action="store_true", help="do not whiten advantages")
        u.add_argument("--whiten-rewards", action="store_true",
                       help="scale each batch's per-token rewards to unit variance (trl's whiten_rewards)")
        u.add_argument("--value-model", choices=["shared", "reward", "policy"], default="shared",
                       help="the critic: a head on the policy's trunk (shared), a separate copy of the reward "
                            "model (reward, as trl), or a separate copy of the SFT model with a new head (policy)")
        u.add_argument("--group-baseline", action="store_true",
                       help="subtract each prompt's mean score over its --group-size samples (needs G >= 2)")
        u.add_argument("--value-warmup-steps", type=int, default=0,
                       help="first steps train only the critic (the policy does not move)")
    else:
        u.add_argument("--beta", type=float, default=0.04, help="weight of the k3 KL to the reference (0 = none)")
        u.add_argument("--no-scale-rewards", action="store_true", help="do not divide advantages by the group std")
        u.add_argument("--loss-type", choices=["grpo", "dapo", "dr_grpo"], default="grpo",
                       help="loss normalisation: per answer then batch (grpo), per token over the batch (dapo), "
                            "a constant N x max-new-tokens (dr_grpo)")


def rl_kwargs(args: argparse.Namespace, algo: str) -> dict[str, Any]:
    kw = common_kwargs(args)
    kw.update(val_prompts=args.val_prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_k=args.top_k, truncation_penalty=args.truncation_penalty,
              eval_prompts=args.eval_prompts, ppo_epochs=args.ppo_epochs, num_minibatches=args.num_minibatches,
              clip_range=args.clip_range, max_minutes=args.max_minutes)
    if algo == "ppo":
        kw.update(kl_coef=args.kl_coef, kl_target=args.kl_target, kl_horizon=args.kl_horizon, gamma=args.gamma,
                  lam=args.lam, vf_coef=args.vf_coef, clip_range_value=args.clip_range_value,
                  ent_coef=args.ent_coef, whiten_advantages=not args.no_whiten, whiten_rewards=args.whiten_rewards,
                  value_model=args.value_model, value_warmup_steps=args.value_warmup_steps,
                  group_baseline=args.group_baseline)
    else:
        kw.update(beta=args.beta, scale_rewards=not args.no_scale_rewards, loss_type=args.loss_type)
    return kw


def rl_report(r: Any, algo: str) -> str:
    val = f"held-out reward {r.val_reward:.4f}, " if getattr(r, "val_reward", None) is not None else ""
    return f"done: {algo} step {r.step}, {val}{r.wall_time:.1f} s wall; saved to {r.out_dir} (metrics.jsonl, rl.png)"
