"""llmkit as a model backend of lm-evaluation-harness: `lm_eval.simple_evaluate(model="llmkit", ...)`.

`import llmkit.eval` registers the class below under the name `llmkit`. model_args:
`pretrained=DIR` (required), `dtype`, `device`, `batch_size` (continuations per forward),
`max_batch_size` (engine rows for generation). Log-likelihoods go through `eval.lm.score_tokens`
(one prefill per distinct context, choices batched on a copy of its KV cache); rolling
log-likelihoods through `eval.perplexity.sliding_nll`; generation through the continuous-batching
`Engine`.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from llmkit.eval.lm import LocalLM, score_tokens
from llmkit.eval.perplexity import sliding_nll


class LlmkitLM(TemplateLM):
    """An lm-eval `TemplateLM` over a model folder loaded by llmkit."""

    def __init__(
        self,
        pretrained: str,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 32,
        max_batch_size: int = 16,
        max_gen_toks: int = 256,
        **_: Any,
    ):
        super().__init__()
        import torch

        if device and device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's command line passes device=cuda by default
        bs = 32 if str(batch_size).startswith("auto") else int(batch_size)
        self.lm = LocalLM(
            pretrained,
            dtype=getattr(torch, dtype) if dtype else None,
            device=device,
            batch_size=bs,
            max_batch_size=int(max_batch_size),
        )
        self.tokenizer = self.lm.tokenizer
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else 0)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.lm.max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.lm.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.lm.encode(string, add_special_tokens=True if add_special_tokens is None else add_special_tokens)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any):
        out = score_tokens(
            self.lm.model, [(ctx, cont) for _, ctx, cont in requests], self.lm.batch_size, progress=not disable_tqdm
        )
        for (key, _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm([r.args[0] for r in requests], disable=disable_tqdm, desc="loglikelihood_rolling"):
            ids = [self.prefix_token_id] + self.tok_encode(req, add_special_tokens=False)
            nll, _ = sliding_nll(self.lm.model, ids, stride=self.max_length)
            out.append(-nll)
            self.cache_hook.add_partial("loglikelihood_rolling", (req,), -nll)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        args = [r.args for r in requests]
        for i, (_, kw) in enumerate(args):
            kw = dict(kw or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            key = (
                tuple(until),
                int(kw.get("max_gen_toks", self.max_gen_toks)),
                float(kw.get("temperature", 0.0) if kw.get("do_sample", False) else 0.0),
            )
            groups.setdefault(key, []).append(i)
        out: list[str] = [""] * len(args)
        for (until, max_new, temp), idxs in groups.items():
            texts = self.lm.generate(
                [args[i][0] for i in idxs],
                max_new_tokens=max_new,
                stop=list(until) or None,
                temperature=temp,
                progress=not disable_tqdm,
            )
            for i, t in zip(idxs, texts):
                out[i] = t[0]
                self.cache_hook.add_partial("generate_until", args[i], t[0])
        return out


def register() -> None:
    """Add `llmkit` to lm-eval's model registry (idempotent)."""
    import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models first)
    from lm_eval.api.registry import MODEL_REGISTRY, register_model

    if "llmkit" not in MODEL_REGISTRY:
        register_model("llmkit")(LlmkitLM)
