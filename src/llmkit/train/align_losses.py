"""The math of alignment, as plain functions on tensors: per-token log-probs, the DPO family of
losses, GAE, whitening, GRPO's group-normalised advantages, the k3 KL estimator and PPO's clipped
losses. The trainers in `llmkit.train.preference` and `llmkit.train.rl` only move data through these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
GRPO_LOSSES = ("grpo", "dapo", "dr_grpo")


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position; logits [B, T, V], targets [B, T] (IGNORE -> 0) -> [B, T] fp32."""
    return token_logps_entropy(logits, targets, None)[0]


def token_logps_entropy(logits: torch.Tensor, targets: torch.Tensor,
                        entropy: str | None = "detached") -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logps` and, from the same log-softmax, the entropy [B, T] of each position's next-token
    distribution: "detached" (a statistic), "grad" (a loss term) or None (not computed)."""
    mask = targets != IGNORE
    logp_all = F.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    logp = torch.gather(logp_all, 2, targets.masked_fill(~mask, 0)[..., None]).squeeze(-1)
    ent = None
    if entropy is not None:
        lp = logp_all if entropy == "grad" else logp_all.detach()
        ent = -(lp.exp() * lp).sum(-1)
    return logp * mask, ent


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position; [B, T, V] -> [B, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen: torch.Tensor,  # [B] summed log-probs of the chosen completion under the policy
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,  # the same under the frozen reference
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards beta * (log pi - log ref) of chosen and rejected.

    sigmoid: -log sigma(beta h) (Rafailov et al., 2023; `label_smoothing` = conservative DPO);
    ipo: (h - 1 / (2 beta))^2 (Azar et al., 2023; pass length-averaged log-probs, as trl does);
    hinge: max(0, 1 - beta h) (SLiC); with h = (log pi_c - log pi_r) - (log ref_c - log ref_r).
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # [B]
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(DPO_LOSSES)}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0):
    """Reward-model loss -log sigma(r_c - r_r - margin) per pair (InstructGPT; Llama 2's margin)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


# ---------------------------------------------------------------------------- PPO


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def grpo_reduce(per_tok: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """GRPO's loss from per-token terms [N, K]: `grpo` averages each answer's tokens, then the answers
    (Shao et al.); `dapo` averages all the batch's answer tokens (token level, Yu et al., 2025);
    `dr_grpo` sums each answer's tokens over a constant, N x max_new_tokens (Liu et al., 2025)."""
    if loss_type == "grpo":
        return masked_mean(per_tok, mask, 1).mean()
    if loss_type == "dapo":
        return masked_mean(per_tok, mask)
    return (per_tok * mask).sum() / (per_tok.shape[0] * max_new_tokens)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as trl); padding stays 0."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    var = (((x - mean) ** 2) * mask).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al., 2016) over response tokens.

    rewards, values, mask [B, T] (mask 1 on response tokens, which sit left-aligned);
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, V past the end = 0.
    Returns (advantages, returns = advantages + values), both [B, T] and 0 on padding.
    """
    B, T = rewards.shape
    mask = mask.to(rewards.dtype)
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate -min(rho A, clip(rho, 1-e, 1+e) A), token mean; and the clipped fraction."""
    ratio = torch.exp(logp - old_logp)
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(l1, l2), mask)
    clipfrac = masked_mean((l2 > l1).float(), mask)
    return loss, clipfrac.detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - R)^2, (clip(V, V_old +- e) - R)^2), token mean; and the clipped fraction."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(l1, l2), mask), masked_mean((l2 > l1).float(), mask).detach()


# ---------------------------------------------------------------------------- GRPO


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                     scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al., 2024): A_i = (r_i - mean(group)) / (std(group) + eps) for rewards [N * G]
    laid out group by group; std is the unbiased one (as trl). Also returns each group's std [N]."""
    r = rewards.view(-1, group_size)
    mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    adv = r - mean
    if scale:
        adv = adv / (std + eps)
    return adv.reshape(-1), std.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's unbiased, non-negative KL(pi || ref) estimator per token:
    exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1
