"""Reinforcement learning from rewards: PPO (RLHF) and GRPO, on the fine-tuning trainer.

One step = rollouts + an update. Rollouts are `llmkit.generate` (batched, KV-cached, the decode fast
path when the model allows) on `batch_size` prompts, `group_size` samples each. Rewards come from a
reward-model folder or a Python function `module:function` called as `fn(prompt, completion, **row)`.

- PPO (Schulman et al., 2017; Ziegler et al., 2019; Ouyang et al., 2022): a value head on the
  policy's last hidden state; per-token reward -kl_coef * (log pi - log ref) plus the score on the
  last token; fixed or adaptive kl_coef; GAE(gamma, lambda); whitened advantages; clipped policy
  and value losses, an entropy bonus; `ppo_epochs` passes over shuffled minibatches.
- GRPO (Shao et al., 2024): G samples per prompt, advantages (r - mean_group) / std_group, no critic,
  the k3 KL estimator to the reference in the loss (weight `beta`), clipped ratio.

The reference is the starting policy: the base with its LoRA adapters off, or a frozen copy. The
schedule, checkpoints with exact resume (KL coefficient included), metrics.jsonl are the trainer's;
every step appends a record (rewards, KL, entropy, clip fraction, value loss, lengths, tokens/s)
and `rl.png` plots them.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from llmkit.data.prefs import PromptRecord, load_prompts
from llmkit.data.sft import IGNORE, chat_ids
from llmkit.errors import ConfigError, InputError
from llmkit.infer.generate import eos_token_ids, generate
from llmkit.model.attention import AttnMeta
from llmkit.model.hf import config_from_hf, load_model, read_config
from llmkit.model.linear import set_decode_packing
from llmkit.model.reward import add_score_head, is_reward_folder, load_reward_model, score_ids
from llmkit.tokenizer import load_tokenizer
from llmkit.train.align_losses import (
    GRPO_LOSSES,
    gae,
    group_advantages,
    grpo_reduce,
    k3_kl,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    token_logps_entropy,
    whiten,
)
from llmkit.train.config import OptimConfig
from llmkit.train.finetune import FinetuneConfig, Finetuner, split_val
from llmkit.train.metrics import plot_panels
from llmkit.train.preference import ListBatches, adapters_off, as_list
from llmkit.train.trainer import TrainResult

ALGOS = ("ppo", "grpo")
# PPO's critic: "shared" = a Linear head on the policy's last hidden state (one trunk, value-loss gradients reach
# the policy); "reward" = a separate copy of the reward model, trunk and score head (trl's PPOTrainer);
# "policy" = a separate copy of the starting model with a zero-initialised scalar head.
VALUE_MODELS = ("shared", "reward", "policy")
RL_PANELS = [
    ("reward", ["reward_mean", "reward_min", "reward_max"]),
    ("held-out reward (greedy)", ["val_reward"]),
    ("KL to reference", ["kl", "val_kl"]),
    ("entropy", ["entropy"]),
    ("clip fraction", ["clipfrac"]),
    ("value loss", ["value_loss"]),
    ("response length", ["response_length"]),
    ("tokens/s", ["rollout_tokens_per_sec", "update_tokens_per_sec"]),
]


# ---------------------------------------------------------------------------- rewards


RewardFn = Callable[[list[PromptRecord], list[str]], list[float]]


def load_reward(spec: str, device: str | torch.device = "cpu") -> RewardFn:
    """A batch reward `(prompts, completions) -> scores` from a reward-model folder or `module:function`.

    `module` is an importable name (the working directory is on the path) or a .py file.
    """
    if os.path.isdir(spec):
        if not is_reward_folder(spec):
            raise ConfigError(f"--reward {spec} is a folder but not a reward model (expected a "
                              "*ForSequenceClassification config.json, e.g. from `llmkit rm train`)")
        return _rm_reward(spec, device)
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise ConfigError(f"--reward {spec!r}: expected a reward model folder or module:function "
                          "(e.g. examples.align_task:reward or my_rewards.py:exact_match)")
    try:
        if mod_name.endswith(".py"):
            s = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
            if s is None or not Path(mod_name).is_file():
                raise ModuleNotFoundError(mod_name)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"--reward {spec!r}: cannot import {mod_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"--reward {spec!r}: {mod_name} has no function {fn_name!r}")

    def call(prompts: list[PromptRecord], completions: list[str]) -> list[float]:
        prompt_text = [p.row.get("prompt") if isinstance(p.row.get("prompt"), str) else p.text for p in prompts]
        return [fn(t, c, **p.row) for t, c, p in zip(prompt_text, completions, prompts)]

    return call


def _rm_reward(path: str, device) -> Callable:
    rm, tok = load_reward_model(path, device=device), load_tokenizer(path)

    def call(prompts: list[PromptRecord], completions: list[str]) -> list[float]:
        ids = [chat_ids(tok, p.messages + [{"role": "assistant", "content": c}], False)
               for p, c in zip(prompts, completions)]
        return score_ids(rm, ids, batch_size=64)

    return call


def check_rewards(rewards: list[Any], prompts: list[PromptRecord], completions: list[str]) -> list[float]:
    """Numbers only: a NaN/inf or non-number reward is an error naming the prompt and completion."""
    out = []
    for r, p, c in zip(rewards, prompts, completions):
        if not isinstance(r, int | float) or not math.isfinite(float(r)):
            raise InputError(f"the reward for prompt {p.text[:60]!r} / completion {c[:60]!r} is {r!r}; expected a "
                             "finite number (check the reward function or model)")
        out.append(float(r))
    return out


# ---------------------------------------------------------------------------- config


@dataclass
class RLConfig(FinetuneConfig):
    """Fine-tuning settings plus the RL algorithm's. `data` holds the prompt file(s)."""

    algo: str = "grpo"
    reward: str = ""
    group_size: int = 4  # G samples per prompt (GRPO; PPO defaults to 1)
    max_new_tokens: int = 64
    max_prompt_len: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    beta: float = 0.04  # GRPO: weight of the k3 KL term
    kl_coef: float = 0.05  # PPO: initial per-token KL penalty
    kl_target: float | None = None  # PPO: adaptive coefficient toward this KL (None = fixed)
    kl_horizon: int = 10000
    ppo_epochs: int | None = None  # passes over each rollout batch (PPO 4, GRPO 1)
    num_minibatches: int = 1
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    whiten_rewards: bool = False  # PPO: scale the per-token rewards to unit variance per batch (trl's whiten_rewards)
    value_model: str = "shared"  # PPO critic: shared | reward | policy (see VALUE_MODELS)
    value_warmup_steps: int = 0  # PPO: steps that train only the critic (the policy stays put)
    group_baseline: bool = False  # PPO: subtract each prompt's mean score over its G samples (RLOO-like)
    scale_rewards: bool = True  # GRPO: divide by the group's std
    loss_type: str = "grpo"  # GRPO loss normalisation: grpo | dapo | dr_grpo (trl's names)
    truncation_penalty: float | None = None  # reward given to responses cut at max_new_tokens
    eval_prompts: int = 64  # held-out prompts decoded greedily at each eval

    def check(self) -> None:
        super().check()
        if self.algo not in ALGOS:
            raise ConfigError(f"unknown algorithm {self.algo!r}; expected one of {', '.join(ALGOS)}")
        if self.method not in ("full", "lora"):
            raise ConfigError(f"--method {self.method} is not supported for RL; expected full or lora")
        if not self.reward:
            raise ConfigError("no reward given; expected --reward RM_DIR or --reward module:function")
        if self.loss_type not in GRPO_LOSSES:
            raise ConfigError(f"--loss-type {self.loss_type!r}: expected one of {', '.join(GRPO_LOSSES)}")
        if self.algo == "grpo" and self.group_size < 2:
            raise ConfigError(f"--group-size {self.group_size}: GRPO compares samples of one prompt, so it needs "
                              "at least 2")
        if self.group_size < 1 or self.max_new_tokens < 1 or self.num_minibatches < 1:
            raise ConfigError("--group-size, --max-new-tokens and --num-minibatches must be positive")
        if (self.ppo_epochs or 1) < 1:
            raise ConfigError(f"--ppo-epochs {self.ppo_epochs} must be positive")
        if self.algo == "ppo" and self.group_baseline and self.group_size < 2:
            raise ConfigError("--group-baseline compares the samples of a prompt; expected --group-size >= 2")
        if self.value_model not in VALUE_MODELS:
            raise ConfigError(f"--value-model {self.value_model!r}: expected one of {', '.join(VALUE_MODELS)}")
        if self.algo == "ppo" and self.value_model == "reward" and not is_reward_folder(self.reward):
            raise ConfigError(f"--value-model reward copies the reward model, but --reward {self.reward!r} is not a "
                              "reward model folder; expected --value-model shared or policy")


# ---------------------------------------------------------------------------- the trainer


@dataclass
class Rollout:
    """A batch of sampled completions and everything the update needs, rows group by group.

    Each prompt is stored once (`prompt_ids`, left-padded) and its G answers point to it (`group`):
    the teacher-forced passes run a prompt once and let its answers attend to its keys and values.
    """

    prompts: list[PromptRecord]  # one per row (repeated G times)
    completions: list[str]
    prompt_ids: torch.Tensor  # [P, Lp] each distinct prompt, left-padded
    prompt_mask: torch.Tensor  # [P, Lp] 1 = token, 0 = padding
    group: torch.Tensor  # [N] the prompt (row of prompt_ids) of each answer
    targets: torch.Tensor  # [N, K] the answer tokens (the stop token included), IGNORE after them
    scores: torch.Tensor  # [N] rewards
    old_logp: torch.Tensor | None  # [N, K]; None: the update's own log-probs (one on-policy pass)
    ref_logp: torch.Tensor | None  # [N, K]
    values: torch.Tensor | None = None  # [N, K] (PPO)
    advantages: torch.Tensor | None = None  # [N, K]
    returns: torch.Tensor | None = None  # [N, K] (PPO)


class SharedPrefixCache:
    """A `kv_cache` for teacher-forced passes over G answers of one prompt: the prompt's pass records
    each layer's keys/values [P, nkv, Lp, hd]; the answers' pass prepends row `rows[i]` of them to
    answer i's own. Nothing is detached, so the answers' gradients reach the prompt's positions."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows: torch.Tensor | None = None  # [N] set for the answers' pass

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rows is None:
            self.kv[layer_idx] = (k, v)
            return k, v
        pk, pv = self.kv[layer_idx]
        return torch.cat([pk[self.rows], k], 2), torch.cat([pv[self.rows], v], 2)


def answer_logits(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, rows: torch.Tensor,
                  targets: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Logits [n, K, V] predicting each answer's tokens `targets` [n, K] (IGNORE-padded) that follow
    prompt `rows[i]` of `prompt_ids` [U, Lp] (left-padded, `prompt_mask` 1 = token): the prompts run
    once (their last position predicts the first answer token), then the answers on top of their
    keys/values, so G answers of a prompt cost one prompt pass (the same result as n full rows)."""
    Lp = prompt_ids.shape[1]
    cache = SharedPrefixCache()
    meta = AttnMeta((prompt_mask.cumsum(1) - 1).clamp(min=0), Lp, key_mask=prompt_mask)
    logits = model(prompt_ids, attn_meta=meta, kv_cache=cache, num_logits_to_keep=1)[rows]  # [n, 1, V]
    x = targets[:, :-1].masked_fill(targets[:, :-1] == IGNORE, pad_id)  # the answers' inputs [n, K-1]
    T = x.shape[1]
    if not T:
        return logits
    cache.rows = rows
    pos = prompt_mask.sum(1)[rows, None] + torch.arange(T, device=x.device)  # [n, T]
    meta = AttnMeta(pos, Lp + T, key_mask=torch.cat([prompt_mask[rows], torch.ones_like(x)], 1))
    return torch.cat([logits, model(x, attn_meta=meta, kv_cache=cache)], 1)


class RLTrainer(Finetuner):
    """`llmkit ppo` / `llmkit grpo`: one optimizer pass over fresh rollouts per step."""

    ft: RLConfig

    @property
    def name(self) -> str:  # the progress bar's label
        return self.ft.algo

    # ------------------------------------------------------------------ set-up
    def _setup_data(self) -> None:
        ft, t = self.ft, self.t
        ctx = config_from_hf(read_config(ft.model)).block_size
        self.tokenizer = load_tokenizer(ft.model)
        limit = ft.max_prompt_len or ctx - ft.max_new_tokens
        if limit < 1:
            raise ConfigError(f"--max-new-tokens {ft.max_new_tokens} leaves no room for a prompt in the model's "
                              f"context of {ctx} tokens")
        prompts = [r for path in ft.data for r in load_prompts(path, self.tokenizer, limit)]
        if ft.val_data:
            val = [r for path in ft.val_data for r in load_prompts(path, self.tokenizer, limit)]
        else:
            prompts, val = split_val(prompts, ft.val_fraction, t.seed)
        self.train_examples, self.val_examples = prompts, val[: ft.eval_prompts]
        self.truncated = self.dropped = 0
        ft.max_seq_len = max(len(p.prompt_ids) for p in prompts + val) + ft.max_new_tokens
        t.seq_len = ft.max_seq_len
        t.grad_accum = 1
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.reward_fn = load_reward(ft.reward, t.device if t.device not in ("auto", None) else "cpu")
        self.G = ft.group_size
        self.epochs = ft.ppo_epochs or (4 if ft.algo == "ppo" else 1)
        self.on_policy = ft.algo == "grpo" and self.epochs == 1 and ft.num_minibatches == 1
        self.kl_coef = ft.kl_coef

    def _max_token_id(self) -> int:
        return max(max(p.prompt_ids) for p in self.train_examples + self.val_examples)

    def _batches_per_epoch(self) -> int:
        return -(-len(self.train_examples) // self.t.batch_size)

    def _build_sampler(self):
        t, info = self.t, self.dist
        return ListBatches(self.train_examples, t.batch_size, self.ft.max_seq_len, False, t.seed, self.pad_id,
                           info.rank, info.world_size)

    def _build_model(self) -> nn.Module:
        model = super()._build_model()
        ft = self.ft
        self.stop_ids = eos_token_ids(model, self.tokenizer)
        need_ref = ft.algo == "ppo" or ft.beta > 0
        self.ref_model = None
        if ft.method == "full":  # frozen: its no-grad forwards use the packed CPU kernels; at beta 0 only the
            # evaluations use it (`val_kl`)
            self.ref_model = set_decode_packing(copy.deepcopy(model).requires_grad_(False).eval())
        self.need_ref = need_ref
        self.critic = None
        if ft.algo == "ppo" and ft.value_model == "shared":
            C = model.config.n_embd
            model.v_head = nn.Linear(C, 1)  # a submodule: trained, checkpointed, not exported
            # zero at first: a random head's values bias GAE's advantages toward arbitrary states (docs/log.md)
            nn.init.zeros_(model.v_head.weight)
            nn.init.zeros_(model.v_head.bias)
            model.v_head.requires_grad_(True)
            self._hidden: list[torch.Tensor] = []
            model.ln_f.register_forward_hook(lambda m, i, o: self._hidden.append(o))
        elif ft.algo == "ppo":  # a separate critic returning [B, T, 1]: a submodule, trained and checkpointed
            critic = (load_reward_model(ft.reward) if ft.value_model == "reward"
                      else add_score_head(load_model(ft.model), std=0.0))
            if critic.config.vocab_size != model.config.vocab_size:
                raise ConfigError(f"the reward model's vocabulary ({critic.config.vocab_size}) differs from the "
                                  f"policy's ({model.config.vocab_size}); the critic needs the same tokenizer")
            model.critic = self.critic = critic.requires_grad_(True).train()
        return model

    def describe(self) -> str:
        total = sum(p.numel() for p in self.raw_model.parameters())
        trainable = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        ft = self.ft
        return (f"{ft.algo} ({ft.method}): {trainable:,} trainable of {total:,} parameters; "
                f"{len(self.train_examples):,} train / {len(self.val_examples):,} eval prompts; "
                f"{self.t.batch_size} prompts x {self.G} samples per step, up to {ft.max_new_tokens} new tokens; "
                f"{self.t.max_iters} steps")

    def extra_state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl_coef = state.get("kl_coef", self.kl_coef)

    # ------------------------------------------------------------------ rollouts
    def _reference(self):
        if self.ref_model is not None:
            return contextlib.nullcontext(self.ref_model.to(self.dist.device))
        return adapters_off(self.raw_model)

    @torch.no_grad()
    def sample(self, prompts: list[PromptRecord], greedy: bool = False) -> tuple[list[list[int]], float]:
        """Completions (token ids, the stop token included) of each prompt, and the seconds it took."""
        ft, model = self.ft, self.raw_model
        was = model.training
        model.eval()  # the decode fast path serves eval-mode models
        t0 = time.perf_counter()
        kw = {"temperature": 0.0} if greedy else {"temperature": ft.temperature, "top_k": ft.top_k}
        outs = generate(model, [p.prompt_ids for p in prompts], max_new_tokens=ft.max_new_tokens,
                               eos_token_ids=self.stop_ids, **kw)
        model.train(was)
        return outs, time.perf_counter() - t0

    def _forward(self, model: nn.Module, ro: Rollout, idx: torch.Tensor | None = None, values: bool = False,
                 entropy: str | None = None):
        """(token log-probs [n, K], entropy [n, K] or None, values [n, K] or None) of the answers `idx`
        (all when None), each distinct prompt run once (`answer_logits`)."""
        idx = torch.arange(len(ro.group), device=ro.group.device) if idx is None else idx
        uniq, rows = torch.unique(ro.group[idx], return_inverse=True)
        y = ro.targets[idx]  # [n, K]
        if values and self.critic is None:
            self._hidden.clear()
        with self._autocast():
            logits = answer_logits(model, ro.prompt_ids[uniq], ro.prompt_mask[uniq], rows, y, self.pad_id)
        if self.ft.temperature not in (0, 1):  # the sampling distribution's log-probs (as trl)
            logits = logits / self.ft.temperature
        v = None
        if values and self.critic is not None:  # the critic's score at each answer position
            with self._autocast():
                v = answer_logits(self.critic, ro.prompt_ids[uniq], ro.prompt_mask[uniq], rows, y, self.pad_id)
            v = v[..., 0].float()  # [n, K]
        elif values:  # the ln_f outputs of the prompts' last positions and of the answers' passes
            h = torch.cat([self._hidden[0][rows]] + self._hidden[1:], 1)  # [n, K, C]
            v = self.raw_model.v_head(h).squeeze(-1).float()
        logp, ent = token_logps_entropy(logits, y, entropy)
        return logp, ent, v

    def _pack(self, batch: list[PromptRecord], gens: list[list[int]], G: int, texts: list[str] | None = None,
              scores: torch.Tensor | None = None) -> Rollout:
        """A `Rollout` of `gens` (G answers per prompt of `batch`, group by group), tensors on the device."""
        dev = self.dist.device
        Lp, K = max(len(p.prompt_ids) for p in batch), max(len(g) for g in gens)
        pid = torch.full((len(batch), Lp), self.pad_id, dtype=torch.long)
        pm = torch.zeros((len(batch), Lp), dtype=torch.long)
        for i, p in enumerate(batch):  # left-padded: every prompt ends at column Lp - 1
            pid[i, Lp - len(p.prompt_ids):] = torch.tensor(p.prompt_ids)
            pm[i, Lp - len(p.prompt_ids):] = 1
        y = torch.full((len(gens), K), IGNORE, dtype=torch.long)
        for i, g in enumerate(gens):
            y[i, : len(g)] = torch.tensor(g)
        group = torch.arange(len(batch)).repeat_interleave(G)
        scores = scores.to(dev) if scores is not None else None
        return Rollout([p for p in batch for _ in range(G)], texts or [], pid.to(dev), pm.to(dev), group.to(dev),
                       y.to(dev), scores, None, None)

    @torch.no_grad()
    def reference_kl(self, prompts: list[PromptRecord]) -> float:
        """KL(policy || reference) per answer token: the mean k3 estimate on one answer the policy samples
        (at --temperature) for each of `prompts` (GRPO's `kl`, also when --beta 0 computes none)."""
        gens, _ = self.sample(prompts)
        ro = self._pack(prompts, gens, 1)
        was = self.raw_model.training
        self.raw_model.eval()
        logp, _, _ = self._forward(self.raw_model, ro)
        with self._reference() as ref:
            ref_logp, _, _ = self._forward(ref, ro)
        self.raw_model.train(was)
        return float(masked_mean(k3_kl(logp, ref_logp), (ro.targets != IGNORE).float()))

    @torch.no_grad()
    def rollout(self, batch: list[PromptRecord]) -> tuple[Rollout, dict[str, float]]:
        ft, G = self.ft, self.G
        prompts = [p for p in batch for _ in range(G)]
        gens, t_gen = self.sample(prompts)
        texts = [self.tokenizer.decode(g, skip_special_tokens=True) for g in gens]
        cut = torch.tensor([len(g) >= ft.max_new_tokens and g[-1] not in self.stop_ids for g in gens])
        scores = check_rewards(self.reward_fn(prompts, texts), prompts, texts)
        scores = torch.tensor(scores, dtype=torch.float32)
        if ft.truncation_penalty is not None:
            scores = torch.where(cut, torch.tensor(ft.truncation_penalty), scores)
        ro = self._pack(batch, gens, G, texts, scores)
        self.raw_model.eval()
        if not self.on_policy:  # one on-policy pass: the update's own log-probs are the old ones
            ro.old_logp, _, ro.values = self._forward(self.raw_model, ro, values=ft.algo == "ppo")
        if self.need_ref:
            with self._reference() as ref:
                ro.ref_logp, _, _ = self._forward(ref, ro)
        self.raw_model.train()
        n_tokens = sum(len(g) for g in gens)
        stats = {"reward_mean": float(scores.mean()), "reward_min": float(scores.min()),
                 "reward_max": float(scores.max()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                 "response_length": n_tokens / len(gens), "truncated": int(cut.sum()),
                 "rollout_tokens_per_sec": n_tokens / max(t_gen, 1e-9), "rollout_time": t_gen}
        self.row_tokens = sum(len(p.prompt_ids) + len(g) for p, g in zip(prompts, gens))
        return ro, stats

    def advantages(self, ro: Rollout, stats: dict[str, float]) -> None:
        """PPO: KL-shaped per-token rewards, GAE, whitening. GRPO: group-normalised scores on every token."""
        ft = self.ft
        mask = (ro.targets != IGNORE).float()
        if ft.algo == "ppo":
            kl = (ro.old_logp - ro.ref_logp) * mask  # k1 per token
            rewards = -self.kl_coef * kl
            last = mask.cumsum(1).argmax(1)  # each row's last response position
            scores = ro.scores
            if ft.group_baseline:  # rank the G answers of a prompt against each other, not against other prompts
                scores = group_advantages(scores, self.G, scale=False)[0]
            rewards[torch.arange(len(last)), last] += scores
            if ft.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)
            adv, ret = gae(rewards, ro.values, mask, ft.gamma, ft.lam)
            ro.advantages = whiten(adv, mask) if ft.whiten_advantages else adv
            ro.returns = ret
            seq_kl = kl.sum(1).mean()
            stats.update(kl=float(seq_kl), kl_coef=self.kl_coef,
                         non_score_reward=float((-self.kl_coef * kl).sum(1).mean()))
            if ft.kl_target:  # Ziegler et al.: move the coefficient toward the target KL
                err = max(-0.2, min(0.2, float(seq_kl) / ft.kl_target - 1))
                self.kl_coef *= 1 + err * self.t.batch_size * self.G / ft.kl_horizon
        else:
            adv, std = group_advantages(ro.scores, self.G, scale=ft.scale_rewards)
            flat = int((std == 0).sum())
            stats["flat_groups"] = flat
            if flat == len(std) and not getattr(self, "_warned_flat", False):
                self._warned_flat = True
                tqdm.write(f"warning: all {flat} reward groups of step {self.step + 1} are flat (every sample of a "
                           "prompt got the same reward), so there is no learning signal; raise --temperature or "
                           "--group-size, or check the reward function")
            ro.advantages = adv[:, None] * mask

    # ------------------------------------------------------------------ update
    def minibatch_loss(self, ro: Rollout, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ft = self.ft
        mask = (ro.targets[idx] != IGNORE).float()
        grad_ent = ft.algo == "ppo" and ft.ent_coef != 0
        logp, ent, values = self._forward(self.model, ro, idx, values=ft.algo == "ppo",
                                          entropy="grad" if grad_ent else "detached")
        entropy = masked_mean(ent.detach(), mask)
        old = ro.old_logp[idx] if ro.old_logp is not None else None
        adv = ro.advantages[idx]
        if ft.algo == "ppo":
            pg, clipfrac = ppo_policy_loss(logp, old, adv, mask, ft.clip_range)
            vl, vclip = ppo_value_loss(values, ro.values[idx], ro.returns[idx], mask, ft.clip_range_value)
            loss = pg + ft.vf_coef * vl - (ft.ent_coef * masked_mean(ent, mask) if grad_ent else 0.0)
            if self.step < ft.value_warmup_steps:  # the critic first: the policy gets no gradient
                loss = ft.vf_coef * vl
            return loss, {"policy_loss": pg.detach(), "value_loss": vl.detach(), "clipfrac": clipfrac,
                          "value_clipfrac": vclip, "entropy": entropy}
        if old is None:
            old = logp.detach()
        ratio = torch.exp(logp - old)
        per_tok = -torch.minimum(ratio * adv, ratio.clamp(1 - ft.clip_range, 1 + ft.clip_range) * adv)
        stats = {}
        if ro.ref_logp is not None:
            kl = k3_kl(logp, ro.ref_logp[idx])
            stats["kl"] = masked_mean(kl.detach(), mask, 1).mean()
            if ft.beta > 0:
                per_tok = per_tok + ft.beta * kl
        loss = grpo_reduce(per_tok, mask, ft.loss_type, ft.max_new_tokens)
        clipfrac = masked_mean(((ratio - 1).abs() > ft.clip_range).float(), mask)
        return loss, {"policy_loss": loss.detach(), "clipfrac": clipfrac.detach(), "entropy": entropy, **stats}

    def train_step(self) -> torch.Tensor:
        """Rollouts on one batch of prompts, then `ppo_epochs` passes of minibatch updates."""
        ft = self.ft
        t_step = time.perf_counter()
        batch = self.sampler.next_batch()
        ro, stats = self.rollout(batch)
        self.advantages(ro, stats)
        N = len(ro.group)
        mb = max(1, N // ft.num_minibatches)
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        n = 0
        for _ in range(self.epochs):
            order = torch.randperm(N, device=ro.group.device)
            for s in range(0, N, mb):
                idx = order[s : s + mb]
                with self._autocast():
                    loss, parts = self.minibatch_loss(ro, idx)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                self.optimizer_step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                n += 1
        dt = time.perf_counter() - t0
        update_tokens = self.row_tokens * self.epochs  # prompt + answer of every row, as if unshared
        stats.update({k: v / n for k, v in sums.items()})
        stats.update(update_tokens_per_sec=update_tokens / max(dt, 1e-9), update_time=dt,
                     step_time=time.perf_counter() - t_step)
        self.step_tokens = int((ro.targets != IGNORE).sum())
        if self.metrics is not None:
            self.metrics.log({"step": self.step + 1, **stats}, plot=False)
        self._last_stats = stats
        return torch.tensor(stats["loss"])

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "val", full: bool = False) -> float:
        """Mean reward of greedy completions of the held-out prompts; val_loss is its negative."""
        prompts = self.val_examples if split == "val" else self.train_examples[: self.ft.eval_prompts]
        scores: list[float] = []
        for i in range(0, len(prompts), 64):
            chunk = prompts[i : i + 64]
            gens, _ = self.sample(chunk, greedy=True)
            texts = [self.tokenizer.decode(g, skip_special_tokens=True) for g in gens]
            scores += check_rewards(self.reward_fn(chunk, texts), chunk, texts)
        self.val_reward = sum(scores) / len(scores)
        self.val_kl = self.reference_kl(prompts) if split == "val" else None
        return -self.val_reward

    def extra_metrics(self) -> dict[str, Any]:
        out = {"val_reward": self.val_reward}
        if getattr(self, "val_kl", None) is not None:
            out["val_kl"] = self.val_kl
        if self.metrics is not None:
            plot_panels(self.metrics.records + [{"step": self.step, **out}], RL_PANELS, self.out_dir / "rl.png")
        return out

    def fit(self) -> TrainResult:
        result = super().fit()
        result.val_reward = getattr(self, "val_reward", None)
        return result


def _rl(algo: str, model: str, reward: str, prompts: str | list[str], out: str, method: str,
        val_prompts, max_steps, lr, batch_size, resume, overwrite, stop_after, eval_interval, warmup_steps,
        weight_decay, seed, device, dtype, num_threads, progress, max_minutes, options) -> TrainResult:
    names = set(RLConfig.__dataclass_fields__)
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"unknown {algo} option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}")
    if algo == "ppo":
        options.setdefault("group_size", 1)
    ft = RLConfig(model=str(model), data=as_list(prompts), val_data=as_list(val_prompts), method=method,
                  algo=algo, reward=reward, **options)
    rate = lr if lr is not None else {"full": 1e-5, "lora": 1e-4}.get(method, 1e-5)
    opt = OptimConfig(batch_size=batch_size, grad_accum=1, max_iters=max_steps or 1, lr=rate, min_lr=rate,
                      warmup_iters=warmup_steps or 0, weight_decay=weight_decay, eval_interval=eval_interval or 1,
                      seed=seed, device=device, dtype=dtype, num_threads=num_threads, progress=progress,
                      strategy="single", beta2=0.999, max_minutes=max_minutes)
    return RLTrainer(ft, opt, out, resume=resume, overwrite=overwrite, stop_after=stop_after,
                     max_steps=max_steps, eval_interval=eval_interval, warmup_steps=warmup_steps or 0).fit()


def grpo(model: str, reward: str, prompts: str | list[str], out: str, method: str = "full", group_size: int = 4,
         val_prompts: str | list[str] | None = None, max_steps: int | None = None, lr: float | None = None,
         batch_size: int = 8, resume: str | bool | None = None, overwrite: bool = False,
         stop_after: int | None = None, eval_interval: int | None = None, warmup_steps: int | None = None,
         weight_decay: float = 0.0, seed: int = 1337, device: str = "auto", dtype: str = "auto",
         num_threads: int | None = None, progress: bool = True, max_minutes: float | None = None,
         **options: Any) -> TrainResult:
    """GRPO from SFT `model` with `reward` (a reward-model folder or `module:function`) on prompt JSONL `prompts`;
    `out` becomes a model folder (full) or a PEFT LoRA folder (lora). Options: RLConfig fields (beta,
    max_new_tokens, temperature, clip_range, ppo_epochs, num_minibatches, truncation_penalty, lora_*, ...).
    `max_minutes` is a time budget (evaluations included): training stops once it is spent."""
    return _rl("grpo", model, reward, prompts, out, method, val_prompts, max_steps, lr, batch_size, resume,
               overwrite, stop_after, eval_interval, warmup_steps, weight_decay, seed, device, dtype, num_threads,
               progress, max_minutes, dict(options, group_size=group_size))


def ppo(model: str, reward: str, prompts: str | list[str], out: str, method: str = "full",
        val_prompts: str | list[str] | None = None, max_steps: int | None = None, lr: float | None = None,
        batch_size: int = 8, resume: str | bool | None = None, overwrite: bool = False,
        stop_after: int | None = None, eval_interval: int | None = None, warmup_steps: int | None = None,
        weight_decay: float = 0.0, seed: int = 1337, device: str = "auto", dtype: str = "auto",
        num_threads: int | None = None, progress: bool = True, max_minutes: float | None = None,
        **options: Any) -> TrainResult:
    """PPO (RLHF) from SFT `model` with `reward` (a reward-model folder or `module:function`) on prompt JSONL
    `prompts`. Options: RLConfig fields (kl_coef, kl_target, gamma, lam, ppo_epochs, num_minibatches, vf_coef,
    ent_coef, clip_range, clip_range_value, max_new_tokens, temperature, group_size, value_model,
    value_warmup_steps, whiten_rewards, lora_*, ...). `max_minutes` is a time budget."""
    return _rl("ppo", model, reward, prompts, out, method, val_prompts, max_steps, lr, batch_size, resume,
               overwrite, stop_after, eval_interval, warmup_steps, weight_decay, seed, device, dtype, num_threads,
               progress, max_minutes, options)
