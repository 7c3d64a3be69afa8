"""Fused LM head + cross-entropy: the next-token loss from the final hidden states, chunked over the
tokens so the [N, vocab] fp32 logits, their log-softmax and their gradient never exist whole.

Each chunk of rows is projected to logits, turned into its loss and, in the same pass, into its
gradient softmax - target (written over the logits), which is projected back to the hidden size at
once. The forward therefore already holds d loss / d hidden (and d loss / d W when the head is
trained); the backward only scales them. This is Liger-Kernel's FusedLinearCrossEntropy in plain
torch: peak memory falls by ~3 x N x vocab x 4 bytes, and each chunk's logits stay in cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmkit.model.linear import dense_linear

IGNORE = -100  # targets with this id count neither in the loss nor in the mean (F.cross_entropy's default)


class LinearCrossEntropy(torch.autograd.Function):
    """mean over kept rows of CE(h W^T, targets), label smoothing eps; h [N, C], W [V, C], targets [N]."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor, eps: float, chunk: int) -> Tensor:
        V = w.shape[0]
        keep = targets != IGNORE
        n = keep.sum().clamp(min=1).float()  # all ignored: loss 0, gradients 0 (F.cross_entropy gives nan)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc, kc = h[s : s + chunk], targets[s : s + chunk].clamp(min=0), keep[s : s + chunk].float()
            z = dense_linear(hc, w).float()  # [c, V] logits
            z_t = z.gather(1, tc[:, None]).squeeze(1)  # [c] logit of the target
            z_mean = z.mean(-1) if eps else None
            m = z.amax(-1, keepdim=True)
            z.sub_(m).exp_()
            se = z.sum(-1)  # [c]
            lse = se.log() + m.squeeze(1)
            row = lse - z_t if not eps else (1 - eps) * (lse - z_t) + eps * (lse - z_mean)
            total += (row * kc).sum()
            # d loss / d logits = (softmax - (1 - eps) onehot - eps / V) * keep / n, in place of z
            scale = kc / n  # [c]
            z.mul_((scale / se)[:, None])
            z.scatter_add_(1, tc[:, None], (-(1 - eps) * scale)[:, None])
            if eps:
                z.sub_((eps / V * scale)[:, None])
            g = z.to(w.dtype)
            if grad_h is not None:
                grad_h[s : s + chunk] = dense_linear(g, w.t())  # [c, C]
            if grad_w is not None:
                grad_w.addmm_(g.t().float(), hc.float())  # [V, C]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return total / n

    @staticmethod
    def backward(ctx, dloss: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * dloss.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * dloss).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, label_smoothing: float = 0.0, chunk: int | None = None
) -> Tensor:
    """Mean next-token cross-entropy of logits hidden W^T over the targets that are not -100.

    hidden [..., C], weight [V, C] (the LM head), targets [...]. Equals
    `F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten(), label_smoothing=...)`
    (fp32 rounding aside) without materialising the logits; `chunk` rows at a time (default: ~4 MiB of
    fp32 logits per chunk).
    """
    C, V = hidden.shape[-1], weight.shape[0]
    chunk = chunk or max(16, (1 << 20) // V)
    return LinearCrossEntropy.apply(hidden.reshape(-1, C), weight, targets.reshape(-1), float(label_smoothing),
                                    chunk)
