"""Low-rank factorisation: W [out, in] ~ U_r S_r V_r^T as two smaller Linears (`LowRankLinear`).

A swappable Linear kind: `down` (in -> r, no bias) then `up` (r -> out, the original bias), with
up.weight = U_r sqrt(S_r) and down.weight = sqrt(S_r) V_r^T (truncated SVD, the best rank-r
approximation in Frobenius norm). Saved with llmkit's tensor names and a config.json "lowrank"
section ({"modules": {name: {"rank": r}}}) that `load_model` reads; `merge_lowrank` returns a
dense model (W = up.weight @ down.weight) that any Hugging Face loader reads. With calibration
inputs the factorisation is activation-aware (ASVD): see `lowrank_model`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from llmkit.errors import ConfigError, InputError
from llmkit.model.quant import QUANT_KINDS, linear_targets


class LowRankLinear(nn.Module):
    """y = up(down(x)): [..., in] -> [..., rank] -> [..., out]."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, lin: nn.Linear, rank: int, scale: Tensor | None = None) -> LowRankLinear:
        """Truncated SVD of W, or with `scale` s [in] (ASVD) of W·diag(s), the factor then times diag(1/s)."""
        w = lin.weight.detach().float()
        if scale is not None:
            w = w * scale[None, :]
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # [out, k], [k], [k, in]
        root = S[:rank].sqrt()
        m = cls(lin.in_features, lin.out_features, rank, lin.bias is not None, device="meta")
        dt = lin.weight.dtype
        down = root[:, None] * Vh[:rank]
        if scale is not None:
            down = down / scale[None, :]
        m.down.weight = nn.Parameter(down.to(dt).contiguous())
        m.up.weight = nn.Parameter((U[:, :rank] * root[None]).to(dt).contiguous())
        if lin.bias is not None:
            m.up.bias = nn.Parameter(lin.bias.detach().clone())
        return m

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def to_linear(self) -> nn.Linear:
        """The dense Linear with W = up.weight @ down.weight."""
        w = self.up.weight.detach().float() @ self.down.weight.detach().float()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.to(self.up.weight.dtype))
        if self.up.bias is not None:
            lin.bias = nn.Parameter(self.up.bias.detach().clone())
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def energy_rank(S: Tensor, energy: float) -> int:
    """Smallest r with sum(S[:r]^2) / sum(S^2) >= energy (singular values S, descending)."""
    e = S.double() ** 2
    cum = torch.cumsum(e, 0) / e.sum().clamp(min=1e-300)
    return int(min(int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12)) + 1, len(S)))


def lowrank_targets(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """The projections to factorise: the block nn.Linears (not routers; the LM head unless asked)."""
    return [n for n in linear_targets(model, skip) if n.startswith("blocks.") or n == "lm_head"]


def asvd_scales(model: nn.Module, names: list[str], calibration, alpha: float = 0.5) -> dict[str, Tensor]:
    """ASVD's per-input-channel scales s_j = (mean_tokens |X_j|)^alpha of each named Linear's inputs."""
    from llmkit.model.quant import calibration_batches, capture_inputs, run_calibration

    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def see(name: str, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        sums[name] = sums.get(name, 0) + x.abs().sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    with capture_inputs(model, names, see):
        run_calibration(model, calibration_batches(model, calibration))
    return {n: (sums[n] / counts[n]).clamp(min=1e-6) ** alpha for n in sums}


@torch.no_grad()
def lowrank_model(model: nn.Module, rank: int | None = None, energy: float | None = None,
                  skip: tuple[str, ...] = ("lm_head",), only_smaller: bool = True,
                  calibration: Tensor | list | None = None, alpha: float = 0.5) -> dict[str, int]:
    """Factorise the block projections in place; returns {name: rank}.

    Exactly one of `rank` (capped at min(out, in)) or `energy` (per layer, the rank keeping that
    fraction of sum S^2). `only_smaller`: keep a layer dense when r (in + out) >= in * out.
    `calibration` (token ids [n, seq]) switches to ASVD (Yuan et al., 2023): W·diag(s) is factorised,
    s_j = mean|X_j|^alpha from the layer's calibration inputs, and diag(1/s) folded into `down`, so
    the input channels that carry large activations are approximated best.
    """
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of rank or energy")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ConfigError(f"energy must be in (0, 1], got {energy}")
    if any(isinstance(m, (*QUANT_KINDS, LowRankLinear)) for m in model.modules()):
        raise InputError("factorise a dense float model: this one is quantized or already low-rank")
    model.eval()
    ranks: dict[str, int] = {}
    names = lowrank_targets(model, skip)
    scales = asvd_scales(model, names, calibration, alpha) if calibration is not None else {}
    for name in names:
        lin = model.get_submodule(name)
        full = min(lin.in_features, lin.out_features)
        s = scales.get(name)
        if rank is not None:
            r = min(rank, full)
        else:
            w = lin.weight.detach().float()
            r = energy_rank(torch.linalg.svdvals(w * s[None, :] if s is not None else w), energy)
        if only_smaller and r * (lin.in_features + lin.out_features) >= lin.in_features * lin.out_features \
                and rank is None:
            continue
        model.set_submodule(name, LowRankLinear.from_linear(lin, r, s))
        ranks[name] = r
    model.lowrank = {"modules": {n: {"rank": r} for n, r in ranks.items()}}
    if getattr(model, "config", None) is not None and model.config.tie_embeddings and "lm_head" in ranks:
        import dataclasses

        model.config = dataclasses.replace(model.config, tie_embeddings=False)
    return ranks


def merge_lowrank(model: nn.Module) -> nn.Module:
    """Replace every `LowRankLinear` by its dense product, in place; returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LowRankLinear):
            model.set_submodule(name, m.to_linear())
    model.lowrank = None
    return model


def build_lowrank(model: nn.Module, lowrank: dict) -> None:
    """Swap empty `LowRankLinear`s into a (meta-device) model as config.json's "lowrank" lists them."""
    if not isinstance(lowrank, dict) or not isinstance(lowrank.get("modules"), dict):
        raise ConfigError("config.json 'lowrank' must be an object with a 'modules' map of {name: {rank}}")
    for name, e in lowrank["modules"].items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise ConfigError(f"lowrank lists {name!r}, which is not a Linear of this model")
        r = e.get("rank") if isinstance(e, dict) else None
        if not isinstance(r, int) or r < 1:
            raise ConfigError(f"lowrank entry for {name!r} needs an integer rank >= 1, got {e!r}")
        model.set_submodule(name, LowRankLinear(lin.in_features, lin.out_features, r, lin.bias is not None,
                                                device="meta"))
    model.lowrank = lowrank
