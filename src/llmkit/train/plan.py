"""Scale on paper: memory per GPU, communication per step and MFU for a model and a parallel layout.

The same formulas are checked in tests/test_train_parallel.py against the bytes each rank really
holds on small models. Counts follow llmkit's training recipe: fp32 parameters and gradients,
AdamW's two fp32 moments, autocast activations (`act_bytes`: 2 for bf16, 4 for fp32).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import ConfigError

# Reference shapes (Llama 2 7B / 70B; a Kimi-K2-like 1T-parameter MoE) for `--params`
SHAPES: dict[str, dict[str, Any]] = {
    "7b": dict(n_layer=32, n_embd=4096, n_head=32, n_kv_head=32, intermediate_size=11008, vocab_size=32000),
    "70b": dict(n_layer=80, n_embd=8192, n_head=64, n_kv_head=8, intermediate_size=28672, vocab_size=32000),
    "1t-moe": dict(n_layer=61, n_embd=7168, n_head=64, n_kv_head=8, intermediate_size=2048, vocab_size=163840,
                   n_expert=384, n_expert_per_tok=8),
}


@dataclass
class Layout:
    """A parallel layout as `train.parallel` spells it, plus the batch shape per data-parallel rank."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_microbatches: int | None = None
    zero: int = 3
    offload: bool = False
    activation_checkpoint: str = "none"
    micro_batch: int = 1  # sequences per data-parallel rank per forward (split into pp micro-batches)
    seq_len: int = 4096
    ep: int = 1  # expert parallel degree (MoE experts spread over the data-parallel ranks)

    @property
    def gpus(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.pp_schedule == "interleaved_1f1b" and self.pp > 1 else 1


@dataclass
class ModelShape:
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    intermediate_size: int
    vocab_size: int
    n_expert: int = 0
    n_expert_per_tok: int = 2
    tie_embeddings: bool = False
    swiglu: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:
        """From a ModelConfig (or anything with its field names)."""
        return cls(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.intermediate_size, cfg.vocab_size,
                   cfg.n_expert, cfg.n_expert_per_tok, cfg.tie_embeddings, cfg.mlp == "swiglu")

    @classmethod
    def from_params(cls, n_params: float) -> ModelShape:
        """The reference shape closest (in log-parameters) to `n_params`."""
        best = min(SHAPES, key=lambda k: abs(math.log(cls(**SHAPES[k]).params()["total"] / n_params)))
        return cls(**SHAPES[best])

    # --------------------------------------------------------------- parameter counts
    def params(self) -> dict[str, int]:
        C, hd, nh, nkv, inter = self.n_embd, self.head_dim, self.n_head, self.n_kv_head, self.intermediate_size
        attn = C * (nh + 2 * nkv) * hd + nh * hd * C
        width = (2 if self.swiglu else 1) * inter
        mlp = C * width + inter * C
        if self.n_expert:
            mlp = self.n_expert * mlp + C * self.n_expert
        block = attn + mlp + 2 * C
        embed = self.vocab_size * C
        head = 0 if self.tie_embeddings else self.vocab_size * C
        active = block - (mlp - (self.n_expert_per_tok * (C * width + inter * C)) if self.n_expert else 0)
        return {"block": block, "block_norms": 2 * C, "embed": embed, "head": head, "final_norm": C,
                "total": self.n_layer * block + embed + head + C,
                "active": self.n_layer * active + embed + head + C, "mlp": mlp}


def block_params(m: ModelShape, lay: Layout) -> float:
    """One block's parameters on a rank after tp (and ep for experts): what ZeRO-3 gathers at a time."""
    p = m.params()
    mlp_split = lay.tp * (lay.ep if m.n_expert else 1)
    return (p["block"] - p["block_norms"] - p["mlp"]) / lay.tp + p["mlp"] / mlp_split + p["block_norms"]


def rank_params(m: ModelShape, lay: Layout) -> float:
    """Parameters on the most loaded rank before data-parallel sharding: its pipeline stage(s), split by tp."""
    p = m.params()
    n_stages = lay.pp * lay.stages_per_rank
    blocks = math.ceil(m.n_layer / n_stages) * lay.stages_per_rank
    tp = lay.tp
    block = block_params(m, lay)
    first = p["embed"] / tp
    last = p["head"] / tp + p["final_norm"]
    ends = first + last if lay.pp == 1 else max(first, last)
    return blocks * block + ends


def act_per_token(m: ModelShape, tp: int, act_bytes: int) -> float:
    """Bytes autograd keeps per token per block (no activation checkpointing).

    Sharded by tp: the residual stream and norm inputs (sequence parallel), q/k/v, the attention
    output and its log-sum-exp, the projection input, the MLP's 4 x intermediate; not sharded: the
    two all-gathered inputs of the column-parallel projections (DTensor keeps them for backward,
    where Megatron re-gathers). GQA keeps k and v expanded to all heads."""
    C, hd, nh, nkv, inter = m.n_embd, m.head_dim, m.n_head, m.n_kv_head, m.intermediate_size
    kv = 2 * nh * hd if nkv != nh else nkv * hd  # MHA: v stays a view of the fused qkv output
    mlp = 4 * inter if m.swiglu else 3 * inter
    if m.n_expert:
        mlp = mlp * m.n_expert_per_tok + m.n_expert
    sharded = 2 * C + (nh + 2 * nkv) * hd + 3 * nh * hd + kv + nh + mlp + 2
    return act_bytes * (sharded / tp + 2 * C)


def memory(m: ModelShape, lay: Layout, act_bytes: int = 2) -> dict[str, float]:
    """Bytes per GPU: weights, gradients, optimizer state (AdamW), activations, and ZeRO-3's working
    set (`gathered`: the block being computed and the one prefetched, unsharded); peak = their sum.
    With expert parallelism (ep) the experts are split over ep of the data-parallel ranks instead of
    being sharded by FSDP there."""
    P = rank_params(m, dataclasses.replace(lay, ep=1))  # ep moves experts, FSDP still shards them d ways
    d = lay.dp_shard
    z = lay.zero
    weights = 4 * P / (d if z == 3 else 1)
    grads = 4 * P / (d if z >= 2 else 1)
    optim = 8 * P / d
    if lay.offload:  # parameters, gradients and optimizer state live in host memory
        host = 4 * P / d + 4 * P / d + optim
        weights, grads, optim = 0.0, 0.0, 0.0
    else:
        host = 0.0
    n_stages = lay.pp * lay.stages_per_rank
    layers = math.ceil(m.n_layer / n_stages) * lay.stages_per_rank
    n_mb = lay.pp_microbatches or n_stages
    mb = lay.micro_batch / n_mb if lay.pp > 1 else lay.micro_batch
    if lay.pp == 1:
        in_flight = 1
    elif lay.pp_schedule == "gpipe":
        in_flight = n_mb
    else:  # 1F1B: the first stage holds pp micro-batches; interleaved: a stage's worth more per chunk
        in_flight = min(n_mb * lay.stages_per_rank, lay.pp + (lay.stages_per_rank - 1) * lay.pp)
    tokens = mb * lay.seq_len * in_flight
    per_layer = act_per_token(m, lay.tp, act_bytes)
    if lay.activation_checkpoint == "full":  # block inputs kept, one block recomputed at a time
        acts = tokens * layers * act_bytes * m.n_embd / lay.tp + mb * lay.seq_len * per_layer
    else:
        acts = tokens * layers * per_layer
    if lay.activation_checkpoint == "selective":  # pointwise ops recomputed: about a third less
        acts *= 2 / 3
    V = m.vocab_size
    loss_par = lay.tp if lay.pp == 1 else 1
    head = mb * lay.seq_len * (4 * V / loss_par + act_bytes * 2 * m.n_embd)  # fp32 log-softmax + inputs
    acts += head
    gathered = 2 * 4 * block_params(m, lay) if lay.zero == 3 and d > 1 else 0.0
    return {"params_per_rank": P, "weights": weights, "grads": grads, "optimizer": optim, "activations": acts,
            "gathered": gathered, "total": weights + grads + optim + acts + gathered, "host": host}


def communication(m: ModelShape, lay: Layout, act_bytes: int = 2) -> dict[str, float]:
    """Bytes each GPU sends per optimizer step (ring collectives: all-reduce = 2x, gather/scatter = 1x)."""
    P = rank_params(m, dataclasses.replace(lay, ep=1))
    d, r = lay.dp_shard, lay.dp_replicate
    n_stages = lay.pp * lay.stages_per_rank
    layers = math.ceil(m.n_layer / n_stages) * lay.stages_per_rank
    tokens = lay.micro_batch * lay.seq_len
    out: dict[str, float] = {}
    frac = (d - 1) / d if d > 1 else 0.0
    gathers = 2 if lay.zero == 3 else 1  # ZeRO-3 gathers parameters again for backward
    Pg = rank_params(m, lay)  # under ep a rank gathers only its own experts' weights
    out["fsdp"] = 4 * Pg * frac * gathers + 4 * Pg * frac  # all-gathers + gradient reduce-scatter (fp32)
    out["ddp"] = 2 * 4 * P / d * (r - 1) / r if r > 1 else 0.0  # all-reduce of the shard across replicas
    # TP + SP: per block 2 all-gathers + 2 reduce-scatters of [tokens, C] forward, the same backward
    tf = (lay.tp - 1) / lay.tp if lay.tp > 1 else 0.0
    out["tp"] = layers * 8 * tokens * m.n_embd * act_bytes * tf
    # PP: each micro-batch's activations cross every stage boundary forward and back
    if m.n_expert and lay.ep > 1:  # all-to-all dispatch + combine of top-k token copies, forward and back
        out["ep"] = layers * 4 * tokens * m.n_expert_per_tok * m.n_embd * act_bytes * (lay.ep - 1) / lay.ep
    out["pp"] = 2 * tokens * m.n_embd * act_bytes / lay.tp * lay.stages_per_rank if lay.pp > 1 else 0.0
    out["total"] = sum(out.values())
    return out


def step_flops(m: ModelShape, tokens: float, seq_len: int) -> float:
    """Training FLOPs: 6 N_active per token + attention 12 L C T (Chowdhery et al., 2022, appendix B)."""
    return tokens * (6 * m.params()["active"] + 12 * m.n_layer * m.n_embd * seq_len)


MFU_RANGES = {  # what published runs of each kind reach on H100-class GPUs
    "dp": (0.45, 0.60), "tp": (0.40, 0.55), "pp": (0.35, 0.50), "moe": (0.20, 0.40),
}


def expected_mfu(m: ModelShape, lay: Layout) -> tuple[float, float]:
    """A range from published runs (torchtitan, Megatron-LM, Llama 3, DeepSeek-V3): MoE and deep
    pipelines lose to all-to-all and bubbles; the bubble (pp - 1) / (n_mb + pp - 1) is taken off."""
    kind = "moe" if m.n_expert else "pp" if lay.pp > 1 else "tp" if lay.tp > 1 else "dp"
    lo, hi = MFU_RANGES[kind]
    if lay.pp > 1:
        n_mb = max(lay.pp_microbatches or lay.pp * lay.stages_per_rank, lay.micro_batch)
        bubble = (lay.pp - 1) / (lay.pp - 1 + n_mb * lay.stages_per_rank)
        lo, hi = lo * (1 - bubble), hi * (1 - bubble)
    # MFU counts model FLOPs only: recomputation and host-side optimizer steps are lost time (rough factors)
    f = {"full": 0.75, "selective": 0.9}.get(lay.activation_checkpoint, 1.0) * (0.6 if lay.offload else 1.0)
    return lo * f, hi * f


def default_layouts(gpus: int, m: ModelShape, seq_len: int) -> list[Layout]:
    """The layouts the table compares: FSDP, HSDP, FSDP+TP (2D), FSDP+TP+PP (3D)."""
    tp = min(8, gpus)
    out = [Layout(dp_shard=gpus, seq_len=seq_len)]
    if gpus >= 16:
        out.append(Layout(dp_replicate=gpus // 8, dp_shard=8, seq_len=seq_len))
    out.append(Layout(dp_shard=gpus, offload=True, activation_checkpoint="full", seq_len=seq_len))
    if gpus >= tp * 2:
        out.append(Layout(dp_shard=gpus // tp, tp=tp, seq_len=seq_len))
        out.append(Layout(dp_shard=gpus // tp, tp=tp, activation_checkpoint="full", seq_len=seq_len))
    for pp in (4, 8, 16):
        if gpus >= tp * pp * 2 and m.n_layer >= pp:
            out.append(Layout(dp_shard=gpus // (tp * pp), tp=tp, pp=pp, micro_batch=2 * pp, seq_len=seq_len))
    if m.n_expert:  # expert parallelism: experts split over up to 64 of the sharding ranks
        for lay in out:
            lay.ep = max(e for e in (1, 2, 4, 8, 16, 32, 64) if e <= lay.dp_shard and m.n_expert % e == 0)
    return out


def layout_name(lay: Layout) -> str:
    return (f"dp{lay.dp_replicate}x{lay.dp_shard} tp{lay.tp} pp{lay.pp} z{lay.zero}"
            + (" off" if lay.offload else "")
            + (f" ac:{lay.activation_checkpoint}" if lay.activation_checkpoint != "none" else "")
            + (f" ep{lay.ep}" if lay.ep > 1 else "") + f" mb{lay.micro_batch}")


def table(m: ModelShape, layouts: list[Layout], act_bytes: int = 2, markdown: bool = False) -> str:
    """The memory / communication / MFU table `llmkit plan` prints: bytes per GPU and bytes sent per
    step, in GiB (MiB / KiB for small models: the unit is in the header)."""
    peak = max(memory(m, lay, act_bytes)["total"] for lay in layouts)
    G, unit = next((2**e, u) for e, u in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B")) if peak >= 2**e or e == 0)
    cols = ["layout", "params/GPU", f"weights {unit}", "grads", "optim", "acts", "gather", "total", "host",
            f"comm {unit}", "MFU"]
    rows = []
    for lay in layouts:
        mem, comm = memory(m, lay, act_bytes), communication(m, lay, act_bytes)
        lo, hi = expected_mfu(m, lay)
        P = mem["params_per_rank"]
        rows.append([layout_name(lay), f"{P / 1e9:.2f}B" if P >= 1e8 else f"{P / 1e6:.3f}M"]
                    + [f"{mem[k] / G:.1f}" for k in ("weights", "grads", "optimizer", "activations", "gathered",
                                                     "total", "host")]
                    + [f"{comm['total'] / G:.1f}", f"{lo:.0%}-{hi:.0%}"])
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [34] + [11 if i in (1, 2, 9) else 8 for i in range(1, len(cols) - 1)] + [9]
    fmt = lambda r: " ".join(f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    head = fmt(cols)
    return "\n".join([head, "-" * len(head)] + [fmt(r) for r in rows])


def check_layout(lay: Layout, gpus: int) -> None:
    if lay.gpus != gpus:
        raise ConfigError(
            f"dp_replicate {lay.dp_replicate} x dp_shard {lay.dp_shard} x tp {lay.tp} x pp {lay.pp} = {lay.gpus}, "
            f"but --gpus is {gpus}; expected the product to equal the GPU count"
        )
