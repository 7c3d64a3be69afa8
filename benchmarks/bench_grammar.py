"""Constrained decoding: (1) xgrammar vs llguidance, (2) the decode slowdown from a grammar at batch 8.

1. backends: the same tokenizer (a byte-level BPE trained on tinyshakespeare, ~16k tokens) and the same
   grammars (a JSON schema, a hermes tool call, JSON mode). For each engine: cold compile time, and the
   time to compute one next-token mask, walking the tokens of a valid document (median and p99 over the
   steps). Both fill a packed int32 bitmask for one row, as the engine does.
2. batch: `Engine(max_batch_size=8)` decodes 8 sampled sequences of N tokens each, unconstrained
   (ignore_eos) and under a JSON schema whose documents are longer than N tokens (so every row runs the
   full N steps in both), alternating the two for R rounds; prints the median wall time of each and the
   ratio constrained / unconstrained (target <= 1.10).

    python benchmarks/bench_grammar.py                         # both parts, llama-60m shape (random init)
    python benchmarks/bench_grammar.py --part batch --rounds 5 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llmkit.infer import sequence
from llmkit.infer.engine import Engine
from llmkit.infer.grammar import Constraint, Grammar, _tool_call_ebnf
from llmkit.infer.sampling import SamplingParams
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import train_bpe_from_iterator
from llmkit.tokenizer.tool_calls import format_tool_calls, tool_call_schema

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
PERSON_DOC = {
    "name": "Juliet Capulet",
    "age": 13,
    "email": "juliet@verona.example",
    "tags": ["daughter", "lover", "tragic heroine"],
    "address": {"street": "Via Cappello 23", "city": "Verona", "zip": "37121"},
    "active": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Verona", "unit": "celsius"}}}
# a document longer than any run: every row decodes the full N tokens in the batch benchmark
ROWS = {
    "type": "object",
    "properties": {"rows": {"type": "array", "minItems": 400, "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                                         "ok": {"type": "boolean"}},
        "required": ["id", "name", "ok"], "additionalProperties": False}}},
    "required": ["rows"],
    "additionalProperties": False,
}


def build_tokenizer(out: Path, vocab: int):
    text = SHAKESPEARE.read_text() if SHAKESPEARE.exists() else "to be or not to be, that is the question " * 20000
    return train_bpe_from_iterator(text.splitlines(), vocab, out, min_frequency=1, show_progress=False)


def cases(tok) -> list[tuple[str, dict, str]]:
    """(name, xgrammar/llguidance grammar spec, a valid document's text)."""
    call_text = format_tool_calls([CALL], "hermes")
    return [
        ("json_schema (person)", {"json_schema": PERSON}, json.dumps(PERSON_DOC)),
        ("tool call (hermes)", {"tool_call": tool_call_schema(TOOLS)}, call_text),
        ("json_object", {"json_schema": {"type": "object"}}, json.dumps(PERSON_DOC)),
    ]


def bench_xgrammar(tok, spec: dict, doc: str, stop: list[int]) -> tuple[float, list[float]]:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size, stop_token_ids=stop)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t0 = time.perf_counter()
    if "tool_call" in spec:
        value = json.dumps({"format": "hermes", "schema": spec["tool_call"], "parallel": True})
        compiled = compiler.compile_grammar(_tool_call_ebnf(xgr, value))
    else:
        compiled = compiler.compile_json_schema(json.dumps(spec["json_schema"]), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    steps = []
    for t in tok.encode(doc, add_special_tokens=False):
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        steps.append(time.perf_counter() - t0)
        assert matcher.accept_token(t), "xgrammar rejected a token of the valid document"
    return compile_s, steps


def bench_llguidance(tok, spec: dict, doc: str, stop: list[int]) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    lltok = llguidance.hf.from_tokenizer(hf, n_vocab=tok.vocab_size, eos_token=stop[0])
    compact = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    t0 = time.perf_counter()
    if "tool_call" in spec:
        schema = json.dumps({**spec["tool_call"], "x-guidance": compact})
        lark = (
            '%llguidance {}\nstart: "<tool_call>\\n" call ("\\n</tool_call>\\n<tool_call>\\n" call)* '
            f'"\\n</tool_call>"\ncall: %json {schema}\n'
        )
        grammar = llguidance.grammar_from("lark", lark)
    else:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(spec["json_schema"], defaults=compact)
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0  # llguidance compiles lazily: the first masks pay the rest
    assert not matcher.is_error(), matcher.get_error()
    bitmask = llguidance.torch.allocate_token_bitmask(1, tok.vocab_size)
    steps = []
    for t in tok.encode(doc, add_special_tokens=False):
        t0 = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        steps.append(time.perf_counter() - t0)
        assert matcher.consume_token(t), f"llguidance rejected a token of the valid document: {matcher.get_error()}"
    return compile_s, steps


def part_backends(tok) -> None:
    stop = [tok.eos_token_id]
    print(f"\n## backends: tokenizer of {tok.vocab_size} tokens; mask time per token while walking a valid document")
    print(f"{'grammar':24s} {'engine':11s} {'compile ms':>10s} {'first mask ms':>13s} {'mask us p50':>11s} "
          f"{'mask us p99':>11s} {'tokens':>6s}")
    for name, spec, doc in cases(tok):
        for engine, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            c, steps = fn(tok, spec, doc, stop)
            rest = sorted(steps[1:])
            p99 = rest[min(len(rest) - 1, int(0.99 * len(rest)))]
            print(f"{name:24s} {engine:11s} {1e3 * c:10.1f} {1e3 * steps[0]:13.2f} "
                  f"{1e6 * statistics.median(rest):11.1f} {1e6 * p99:11.1f} {len(steps):6d}")


def part_batch(tok, preset: str, batch: int, tokens: int, rounds: int) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, block_size=256)
    model = Transformer(cfg).eval()
    engine = Engine(model, tokenizer=tok, max_batch_size=batch, max_seq_len=256).start()
    prompt = tok.encode("Write the table as JSON.", add_special_tokens=False)
    grammar = Grammar.json_schema(ROWS)

    # the grammar's own work, timed where it runs: masking the batch's logits (every matcher fills its row
    # of one bitmask, one kernel applies it) and advancing each row's matcher
    spent = {"mask": 0.0, "fill": 0.0, "accept": 0.0}  # fill (the matchers' bitmask rows) is part of mask
    for owner, name, key in ((sequence, "mask_logits", "mask"), (Constraint, "fill_bitmask", "fill"),
                             (Constraint, "accept", "accept")):
        orig = getattr(owner, name)

        def timed(*a, _orig=orig, _key=key):
            t0 = time.perf_counter()
            try:
                return _orig(*a)
            finally:
                spent[_key] += time.perf_counter() - t0

        setattr(owner, name, timed)

    def run(constrained: bool, seed: int) -> tuple[float, float]:
        params = [
            SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=seed + i, ignore_eos=not constrained,
                           grammar=grammar if constrained else None)
            for i in range(batch)
        ]
        t0, c0 = time.perf_counter(), time.process_time()
        handles = [engine.submit(prompt, p) for p in params]
        outs = [h.result() for h in handles]
        assert all(len(o.token_ids) == tokens for o in outs), "a row stopped early: the timings would not compare"
        if constrained:  # the grammar really held: every row is a prefix of a valid document
            text = tok.decode(outs[0].token_ids)
            assert text.startswith('{"rows": [{"id": '), text[:60]
        return time.perf_counter() - t0, time.process_time() - c0

    run(False, 0), run(True, 0)  # warm-up (and the grammar compile)
    plain, forced, plain_cpu, forced_cpu = [], [], [], []
    spent.update(mask=0.0, fill=0.0, accept=0.0)
    for r in range(rounds):
        w, c = run(False, 100 * r)
        plain.append(w), plain_cpu.append(c)
        w, c = run(True, 100 * r)
        forced.append(w), forced_cpu.append(c)
    engine.shutdown()
    p, f = statistics.median(plain), statistics.median(forced)
    per_round = statistics.median(b / a for a, b in zip(plain, forced))
    cpu = statistics.median(forced_cpu) / statistics.median(plain_cpu)
    print(f"\n## batch {batch}, {tokens} tokens per row, {preset} (random init, fp32, {torch.get_num_threads()} "
          f"threads), {rounds} alternating rounds")
    print(f"unconstrained: median {p:.3f} s ({batch * tokens / p:,.0f} tok/s)   rounds {[round(x, 3) for x in plain]}")
    print(f"json_schema:   median {f:.3f} s ({batch * tokens / f:,.0f} tok/s)   rounds {[round(x, 3) for x in forced]}")
    print(f"slowdown: x{f / p:.3f} of the medians, x{per_round:.3f} median of per-round ratios, "
          f"x{cpu:.3f} of the median process CPU times (target <= 1.10)")
    work = spent["mask"] + spent["accept"]
    print(f"grammar work (mask + accept, timed in place): {work / rounds * 1e3:.1f} ms per constrained run "
          f"= {100 * work / sum(forced):.1f}% of its wall time; per step: matchers' fill "
          f"{spent['fill'] / rounds / tokens * 1e6:.0f} us, unpack + apply "
          f"{(spent['mask'] - spent['fill']) / rounds / tokens * 1e6:.0f} us, accept "
          f"{spent['accept'] / rounds / tokens * 1e6:.0f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["backends", "batch", "all"], default="all")
    ap.add_argument("--vocab", type=int, default=16384, help="BPE vocabulary to train (tinyshakespeare)")
    ap.add_argument("--preset", default="llama-60m", help="model shape for the batch part (random init)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as d:
        tok = build_tokenizer(Path(d), args.vocab)
        if args.part in ("backends", "all"):
            part_backends(tok)
        if args.part in ("batch", "all"):
            part_batch(tok, args.preset, args.batch, args.tokens, args.rounds)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
