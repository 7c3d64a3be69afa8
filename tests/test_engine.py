"""Continuous-batching engine: token-exact against `transformers` and `llmkit.generate`, whatever the
batch composition; cancellation, queue limits, prompt log-probs, seeds, stop rules, threads, asyncio."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
import transformers

import llmkit
from llmkit.errors import InputError
from llmkit.infer.engine import Engine, EngineClosedError, QueueFullError
from llmkit.infer.sampling import SamplingParams

VOCAB = 96
PROMPTS = [[5, 17, 3, 88, 41], [9] * 23, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], list(range(10, 47)), [60]]
N_NEW = [14, 9, 20, 6, 17]

HF_CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=2)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=1)),  # MQA + qkv bias
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=8)),  # window < output
    "mixtral": (transformers.MixtralConfig, dict(num_key_value_heads=2, num_local_experts=4)),
    # layer 0 full attention, layer 1 a window of 6: per-window masks, no block freeing
    "qwen2-mixed-window": (
        transformers.Qwen2Config,
        dict(num_key_value_heads=1, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    ),
}


def _hf_model(family: str) -> transformers.PreTrainedModel:
    cls, extra = HF_CONFIGS[family]
    cfg = cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        initializer_range=0.1,  # peaked enough that greedy ties are impossible in fp32
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers Llama, the same weights loaded with llmkit.load_model)."""
    hf = _hf_model("llama")
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    return hf, llmkit.load_model(str(path))


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(prompt) :].tolist()


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def _wait_idle(engine: Engine, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = engine.stats()
        if s["running"] == 0 and s["queued"] == 0 and s["free_blocks"] == s["total_blocks"]:
            return s
        time.sleep(0.01)
    raise AssertionError(f"engine did not go idle: {engine.stats()}")


# ---- correctness against independent references -------------------------------------------------


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_greedy_matches_transformers_alone_and_batched(family, tmp_path):
    hf = _hf_model(family)
    hf.save_pretrained(tmp_path)
    model = llmkit.load_model(str(tmp_path))
    want = [_hf_greedy(hf, p, n) for p, n in zip(PROMPTS, N_NEW)]
    with Engine(model, max_batch_size=1, kv_block_size=4) as alone:
        got_alone = [alone.submit(p, _greedy(n)).result().token_ids for p, n in zip(PROMPTS, N_NEW)]
    with Engine(model, max_batch_size=3, kv_block_size=4) as batched:  # 5 requests, 3 slots: join/leave
        handles = [batched.submit(p, _greedy(n)) for p, n in zip(PROMPTS, N_NEW)]
        got_batched = [h.result().token_ids for h in handles]
        assert batched.counters["steps"] < sum(N_NEW) - len(N_NEW)  # the requests really shared steps
        _wait_idle(batched)
    assert got_alone == want
    assert got_batched == want


def test_requests_joining_mid_way_match_llmkit_generate_and_transformers(pair):
    hf, model = pair
    want = [llmkit.generate(model, p, max_new_tokens=n, temperature=0.0) for p, n in zip(PROMPTS, N_NEW)]
    assert want[0] == _hf_greedy(hf, PROMPTS[0], N_NEW[0])
    with Engine(model, max_batch_size=2, kv_block_size=4) as engine:
        first = engine.submit(PROMPTS[2], _greedy(N_NEW[2]))
        it = iter(first)
        head = [next(it).token_id for _ in range(4)]  # the first request is mid-decode ...
        later = [engine.submit(p, _greedy(n)) for i, (p, n) in enumerate(zip(PROMPTS, N_NEW)) if i != 2]
        head += [ev.token_id for ev in it]  # ... when the others join (and leave) its batch
        results = [h.result().token_ids for h in later]
    assert head == want[2]
    assert results == [w for i, w in enumerate(want) if i != 2]


@pytest.mark.parametrize(("kv_block_size", "prefill_chunk", "fast_decode"), [(1, 3, False), (5, 7, True)])
def test_chunked_prefill_odd_block_sizes_and_both_forward_paths_give_the_same_tokens(
    pair, kv_block_size, prefill_chunk, fast_decode
):
    hf, model = pair
    want = [_hf_greedy(hf, p, 12) for p in PROMPTS[:3]]
    kw = dict(kv_block_size=kv_block_size, prefill_chunk=prefill_chunk, fast_decode=fast_decode)
    with Engine(model, max_batch_size=2, **kw) as engine:
        got = engine.generate(PROMPTS[:3], _greedy(12))
        assert engine.stats()["prefill_tokens"] == sum(len(p) for p in PROMPTS[:3])
    assert [r.token_ids for r in got] == want


def test_sliding_window_engine_frees_old_blocks_and_matches_transformers(tmp_path):
    hf = _hf_model("mistral")  # window 8
    hf.save_pretrained(tmp_path)
    model = llmkit.load_model(str(tmp_path))
    prompt, n = PROMPTS[3], 30  # 37 + 30 tokens: 34 blocks of 2 without freeing
    with Engine(model, max_batch_size=1, kv_block_size=2, prefill_chunk=4) as engine:
        held = engine.max_blocks_held(len(prompt) + n)
        assert held == 7
        handle = engine.submit(prompt, _greedy(n))
        peak = 0
        for _ in handle:  # blocks taken from the free list (without freeing it would need 34)
            peak = max(peak, engine.cache.num_blocks - engine.cache.num_free_blocks)
        _wait_idle(engine)
    assert 4 <= peak <= held
    assert handle.token_ids == _hf_greedy(hf, prompt, n)


@pytest.mark.parametrize("fast_decode", [True, False])
def test_prompts_admitted_together_share_padded_prefill_forwards(pair, fast_decode):
    hf, model = pair
    prompts = [list(range(3 + i, 3 + i + n)) for i, n in enumerate([10, 12, 11, 12])]
    engine = Engine(model, max_batch_size=4, kv_block_size=4, prefill_chunk=8, max_num_batched_tokens=32,
                    fast_decode=fast_decode)
    handles = [engine.submit(p, _greedy(8)) for p in prompts]  # queued before start: admitted at once
    engine.start()
    results = [h.result() for h in handles]
    engine.shutdown()
    # chunks of 8,8,8,8 in one forward (the step's budget of 32 tokens), then 2,4,3,4 in one
    assert engine.stats()["prefill_forwards"] == 2
    for p, r in zip(prompts, results):
        assert r.token_ids == _hf_greedy(hf, p, 8)
        with torch.no_grad():  # every step's log-prob, the first (from the padded prefill) included
            ref = torch.log_softmax(hf(torch.tensor([p + r.token_ids])).logits[0, len(p) - 1 : -1].float(), -1)
        want = ref.gather(1, torch.tensor(r.token_ids)[:, None]).squeeze(1)
        assert r.logprobs == pytest.approx(want.tolist(), abs=1e-4)


def test_prompt_logprobs_equal_log_softmax_of_a_full_forward(pair):
    hf, model = pair
    ids = PROMPTS[3]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)  # [T, V]
    with Engine(model) as engine:
        engine.submit(PROMPTS[1], _greedy(30))  # the model is busy decoding meanwhile
        out = engine.prompt_logprobs(ids, top_n=3)
    assert out[0] == (None, None) and len(out) == len(ids)
    for i in range(1, len(ids)):
        lp, top = out[i]
        assert lp == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        want_lp, want_ids = ref[i - 1].topk(3)
        assert [t for t, _ in top] == want_ids.tolist()
        assert [v for _, v in top] == pytest.approx(want_lp.tolist(), abs=1e-4)


def test_scoring_adds_at_most_scoring_chunk_tokens_to_a_decode_step(pair):
    """Prompt scoring is background work: while a stream decodes, a step carries at most
    `scoring_chunk` scoring tokens (issue 9: a 64-token chunk tripled the streams' step time on a
    CPU); alone, scoring runs in `prefill_chunk` chunks. The scores stay exact."""
    hf, model = pair
    ids = list(range(3, 90))  # 87 tokens to score

    queued = threading.Event()

    class Recording(Engine):
        steps: list[list[tuple[bool, bool, int]]] = []  # per step: (scoring?, decoding?, tokens)

        def _step(self, scheduled):
            self.steps.append([(s.score_top is not None, not s.prefilling, n) for s, n in scheduled])
            super()._step(scheduled)
            if len(self.steps) == 1:  # the stream's prefill: no further step until the scoring request is
                queued.wait(30)  # queued (waiting on a lock instead can lose the race to a fast engine thread)

    with Recording(model, scoring_chunk=4, prefill_chunk=32) as engine:
        stream = engine.submit(PROMPTS[0], _greedy(60))
        next(iter(stream))  # decoding from the next step on
        scoring = engine.submit_scoring(ids, 1)
        queued.set()
        gen = stream.result()
        out = engine.prompt_logprobs(ids, top_n=1)  # the same prompt again, alone: full chunks
    scoring.result()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = ref[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    for scored in (scoring.prompt_logprobs, out):  # next to the stream in 4-token chunks, then alone
        assert [lp for lp, _ in scored[1:]] == pytest.approx(want, abs=1e-4)
        assert [top[0][0] for _, top in scored[1:]] == ref[:-1].argmax(-1).tolist()
    assert gen.token_ids == _hf_greedy(hf, PROMPTS[0], 60)  # the stream is unchanged by the scoring rows
    chunks = [(n, any(dec for sc, dec, _ in step if not sc)) for step in engine.steps for sc, _, n in step if sc]
    assert [n for n, decoding in chunks if decoding] == [4] * 21 + [3]  # next to the stream: 4 tokens a step
    assert [n for n, decoding in chunks if not decoding] == [32, 32, 23]  # alone: prefill_chunk


def test_logprobs_of_streamed_tokens_match_the_model(pair):
    hf, model = pair
    prompt = PROMPTS[0]
    with Engine(model) as engine:
        events = list(engine.submit(prompt, _greedy(5, logprobs=2)))
    ids = prompt + [e.token_id for e in events]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    for j, ev in enumerate(events):
        row = ref[len(prompt) - 1 + j]
        assert ev.logprob == pytest.approx(row[ev.token_id].item(), abs=1e-4)
        assert ev.top_logprobs[0][0] == ev.token_id  # greedy picks the top-1
        assert [t for t, _ in ev.top_logprobs] == row.topk(2).indices.tolist()


# ---- sampling, stopping ---------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_whatever_the_batch(pair):
    _, model = pair
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, seed=1234)
    with Engine(model, max_batch_size=1) as engine:
        alone = engine.submit(PROMPTS[0], params).result().token_ids
        other_seed = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=12, seed=99)).result().token_ids
    with Engine(model, max_batch_size=4) as engine:
        noise = [engine.submit(p, SamplingParams(max_new_tokens=n, temperature=1.3)) for p, n in zip(PROMPTS, N_NEW)]
        again = engine.submit(PROMPTS[0], params)
        results = [h.result() for h in noise]
        batched = again.result().token_ids
    assert batched == alone
    assert other_seed != alone  # the seed matters (12 draws from ~40 tokens)
    assert all(r.finish_reason == "length" for r in results)


class CharTokenizer:
    """id i <-> one letter (a-z, then A-Z, digits, punctuation); enough to test text-level stops."""

    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-_+=*/()[]{}<>'\"@#$%^&~`|"

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.alphabet[i] for i in ids)


def test_stop_strings_spanning_tokens_and_stop_token_ids(pair):
    _, model = pair
    tok = CharTokenizer()
    prompt, n = PROMPTS[2], N_NEW[2]
    with Engine(model, tokenizer=tok) as engine:
        full = engine.submit(prompt, _greedy(n)).result()
        assert full.text == tok.decode(full.token_ids) and full.finish_reason == "length"
        stop = full.text[5:8]  # three tokens long: completes only at the third one
        cut = full.text.index(stop)
        res = engine.submit(prompt, _greedy(n, stop=[stop, "never-seen"])).result()
        assert (res.text, res.finish_reason) == (full.text[:cut], "stop")
        assert res.token_ids == full.token_ids[: cut + len(stop)]
        # stop token: generation ends on it and its text is not shown
        stop_id = full.token_ids[4]
        first = full.token_ids.index(stop_id)
        res = engine.submit(prompt, _greedy(n, stop_token_ids=[stop_id])).result()
        assert res.token_ids == full.token_ids[: first + 1] and res.finish_reason == "stop"
        assert res.text == full.text[:first]


def test_eos_from_the_model_config_stops_unless_ignored(pair):
    _, model = pair
    with Engine(model) as engine:
        full = engine.submit(PROMPTS[4], _greedy(N_NEW[4])).result().token_ids
    model.config.eos_token_id = full[6]
    try:
        with Engine(model) as engine:
            stopped = engine.submit(PROMPTS[4], _greedy(N_NEW[4])).result()
            ignored = engine.submit(PROMPTS[4], _greedy(N_NEW[4], ignore_eos=True)).result()
    finally:
        model.config.eos_token_id = None
    first = full.index(full[6])
    assert (stopped.token_ids, stopped.finish_reason) == (full[: first + 1], "stop")
    assert (ignored.token_ids, ignored.finish_reason) == (full, "length")


# ---- scheduling, resources, errors -----------------------------------------------------------------


def test_cancel_frees_the_slot_and_blocks_and_ends_the_stream(pair):
    _, model = pair
    with Engine(model, max_batch_size=1, kv_block_size=4) as engine:
        total = engine.stats()["total_blocks"]
        running = engine.submit(PROMPTS[3], _greedy(80))
        queued = engine.submit(PROMPTS[0], _greedy(5))
        it = iter(running)
        next(it)
        assert engine.stats()["queued"] == 1
        queued.cancel()  # still waiting: leaves the queue at once
        assert engine.stats()["queued"] == 0 and list(queued) == [] and queued.finish_reason == "cancelled"
        deadline = time.monotonic() + 10  # let a few events pile up unread, then cancel mid-stream
        while len(running.token_ids) < 4 and time.monotonic() < deadline:
            time.sleep(0.001)
        running.cancel()
        assert list(it) == []  # nothing is delivered after cancel()
        assert running.finish_reason == "cancelled"
        s = _wait_idle(engine)
        assert s["free_blocks"] == total
        # the slot is usable again
        assert engine.submit(PROMPTS[4], _greedy(3)).result().finish_reason == "length"


def test_no_blocks_leak_after_many_requests_of_different_lengths(pair):
    _, model = pair
    with Engine(model, max_batch_size=4, kv_block_size=4, num_blocks=40) as engine:
        handles = []
        for i in range(30):
            prompt = PROMPTS[i % len(PROMPTS)][: 3 + i % 11]
            handles.append(engine.submit(prompt, SamplingParams(max_new_tokens=1 + (7 * i) % 13, seed=i)))
        for h in handles[::3]:
            h.cancel()
        done = [h.result() for h in handles]
        s = _wait_idle(engine)
    assert s["free_blocks"] == 40
    assert {r.finish_reason for r in done} <= {"length", "cancelled"}
    assert sum(r.finish_reason == "length" for r in done) == 20


def test_queue_full_context_overflow_and_closed_errors(pair):
    _, model = pair
    engine = Engine(model, max_queue=2, max_seq_len=32)
    engine.submit(PROMPTS[0], _greedy(3))
    engine.submit(PROMPTS[0], _greedy(3))
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit(PROMPTS[0], _greedy(3))
    with pytest.raises(InputError, match="exceeds the context of 32"):
        engine.submit(list(range(30)), _greedy(3))
    with pytest.raises(InputError, match="out of range"):
        engine.submit([VOCAB], _greedy(3))
    with pytest.raises(InputError, match="empty"):
        engine.submit([], _greedy(3))
    with pytest.raises(InputError, match="max_new_tokens"):
        engine.submit([1], _greedy(0))
    with pytest.raises(InputError, match="stop strings need a tokenizer"):
        engine.submit([1], _greedy(3, stop=["x"]))
    engine.shutdown(drain=True)  # never started: drains the queue anyway
    with pytest.raises(EngineClosedError):
        engine.submit(PROMPTS[0], _greedy(3))
    assert engine.stats()["requests_finished"] == 2


def test_shutdown_drains_in_flight_or_aborts(pair):
    _, model = pair
    engine = Engine(model, max_batch_size=2).start()
    handles = [engine.submit(p, _greedy(n)) for p, n in zip(PROMPTS, N_NEW)]
    engine.shutdown(drain=True)
    assert [h.result().finish_reason for h in handles] == ["length"] * len(PROMPTS)
    assert [len(h.token_ids) for h in handles] == N_NEW

    engine = Engine(model, max_batch_size=1).start()
    handles = [engine.submit(p, _greedy(100 - len(p))) for p in PROMPTS]
    engine.shutdown(drain=False)
    reasons = [h.result().finish_reason for h in handles]
    assert "abort" in reasons and set(reasons) <= {"abort", "length"}


def test_submit_from_many_threads(pair):
    _, model = pair
    want = {
        i: llmkit.generate(model, p, max_new_tokens=n, temperature=0.0) for i, (p, n) in enumerate(zip(PROMPTS, N_NEW))
    }
    got: dict[tuple[int, int], list[int]] = {}
    errors: list[BaseException] = []

    with Engine(model, max_batch_size=4, max_queue=64) as engine:

        def client(t: int) -> None:
            try:
                for k in range(3):
                    i = (t + k) % len(PROMPTS)
                    got[(t, i)] = [ev.token_id for ev in engine.submit(PROMPTS[i], _greedy(N_NEW[i]))]
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        _wait_idle(engine)
    assert not errors
    assert len(got) == 18
    assert all(tokens == want[i] for (_, i), tokens in got.items())


def test_async_iteration_streams_the_same_tokens(pair):
    _, model = pair
    want = [llmkit.generate(model, p, max_new_tokens=n, temperature=0.0) for p, n in zip(PROMPTS, N_NEW)]

    async def main(engine: Engine) -> list[list[int]]:
        async def one(p, n):
            return [ev.token_id async for ev in engine.submit(p, _greedy(n))]

        return await asyncio.gather(*(one(p, n) for p, n in zip(PROMPTS, N_NEW)))

    with Engine(model, max_batch_size=3) as engine:
        assert asyncio.run(main(engine)) == want


def test_engine_rejects_bad_settings(pair):
    _, model = pair
    with pytest.raises(InputError, match="exceeds the model's context"):
        Engine(model, max_seq_len=10_000)


@pytest.mark.parametrize("fast_decode", [True, False])
def test_a_failed_forward_raises_in_the_stream_and_the_engine_recovers(pair, fast_decode):
    hf, model = pair
    with Engine(model, kv_block_size=4, fast_decode=fast_decode) as engine:
        real_batch, calls = engine.cache.batch, {"n": 0}

        def flaky_batch(seq_ids, chunks, **kw):  # the third forward (a decode step) fails inside the model
            batch = real_batch(seq_ids, chunks, **kw)
            calls["n"] += 1
            if calls["n"] == 3:

                def boom(*args):
                    raise RuntimeError("simulated device failure")

                batch.update = boom
            return batch

        engine.cache.batch = flaky_batch
        handle = engine.submit(PROMPTS[0], _greedy(10))
        with pytest.raises(llmkit.LlmkitError, match="simulated device failure"):
            handle.result()
        assert handle.finish_reason == "error"
        _wait_idle(engine)  # its blocks came back
        assert engine.submit(PROMPTS[0], _greedy(10)).result().token_ids == _hf_greedy(hf, PROMPTS[0], 10)


def test_async_consumer_can_cancel_mid_stream(pair):
    _, model = pair

    async def main(engine: Engine) -> tuple[list[int], str | None]:
        handle = engine.submit(PROMPTS[3], _greedy(80))
        got = []
        async for ev in handle:
            got.append(ev.token_id)
            if len(got) == 3:
                handle.cancel()  # like a server whose client disconnected
        return got, handle.finish_reason

    with Engine(model, kv_block_size=4) as engine:
        got, reason = asyncio.run(main(engine))
        _wait_idle(engine)
    assert reason == "cancelled" and len(got) == 3


def test_streamed_text_is_utf8_safe_and_adds_up_to_the_decoded_tokens():
    from test_infer_fixtures import byte_level_bpe  # byte-level BPE: CJK and emoji span several tokens

    tok = byte_level_bpe()
    torch.manual_seed(0)
    model = llmkit.Transformer(llmkit.ModelConfig.from_preset("tiny", vocab_size=tok.get_vocab_size())).eval()
    prompts = [tok.encode(t).ids for t in ["你好，世界！", "今天天气🙂", "naïve café"]]
    with Engine(model, tokenizer=tok, max_batch_size=2) as engine:
        handles = [
            engine.submit(p, SamplingParams(max_new_tokens=24, temperature=1.0, seed=i)) for i, p in enumerate(prompts)
        ]
        streams = [[ev.text for ev in h] for h in handles]
    for h, deltas in zip(handles, streams):
        # a delta that split a character would show U+FFFD where the full decode has the character
        assert "".join(deltas) == h.text == tok.decode(h.token_ids)
    assert any(len(d.encode()) > len(d) for deltas in streams for d in deltas)  # multi-byte text was streamed


# ---- memory and scheduling: prefix caching, on-demand blocks + preemption, mixed chunked prefill ----


def test_prefix_cache_prefills_only_new_tokens_and_keeps_outputs_exact(pair):
    hf, model = pair
    system = list(range(20, 60))  # a 40-token shared "system prompt": 10 full blocks of 4
    users = [[5, 17, 3], [9, 9, 9, 9, 9, 1], [60, 61]]
    want = [_hf_greedy(hf, system + u, 8) for u in users]
    with Engine(model, max_batch_size=2, kv_block_size=4, prefix_caching=False) as off:
        got_off = [off.submit(system + u, _greedy(8)).result().token_ids for u in users]
        assert off.stats()["prefill_tokens"] == sum(len(system + u) for u in users)
    with Engine(model, max_batch_size=2, kv_block_size=4) as on:
        first = on.submit(system + users[0], _greedy(8)).result().token_ids
        before = on.stats()
        rest = [on.submit(system + u, _greedy(8)).result().token_ids for u in users[1:]]
        after = on.stats()
        # the later prompts prefilled only their own tokens; the hit rate counts prompt tokens
        assert after["prefill_tokens"] - before["prefill_tokens"] == sum(len(u) for u in users[1:])
        assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 2 * len(system)
        assert after["prefix_cache_queries"] == sum(len(system + u) for u in users)
        # a chat turn resends its history (prompt + answer): the answer's full blocks are cached too
        history = system + users[0] + first
        turn = on.submit(history + [7, 7], _greedy(5))
        assert turn.result().token_ids == _hf_greedy(hf, history + [7, 7], 5)
        assert on.stats()["prefix_cache_hits"] - after["prefix_cache_hits"] == len(history) // 4 * 4
        # scoring a cached prompt still scores every position (it does not take cached blocks)
        scored = on.prompt_logprobs(system + users[0], top_n=1)
        _wait_idle(on)
    assert got_off == want and [first, *rest] == want
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([system + users[0]])).logits[0].float(), -1)
    ids = system + users[0]
    assert [lp for lp, _ in scored[1:]] == pytest.approx([ref[i - 1, ids[i]].item() for i in range(1, len(ids))],
                                                         abs=1e-4)


def test_preempted_sequences_are_recomputed_with_unchanged_output(pair):
    hf, model = pair
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3][:20], [7, 8, 9]]
    n_new = 20
    want = [_hf_greedy(hf, p, n_new) for p in prompts]
    seeded = SamplingParams(max_new_tokens=n_new, temperature=1.0, seed=7)
    with Engine(model, max_batch_size=4, kv_block_size=4) as roomy:
        want_sampled = roomy.submit(prompts[1], seeded).result().token_ids
    # 4 sequences of up to 40 tokens would reserve 31 blocks up front; 16 blocks run out mid-way
    for prefix_caching in (False, True):
        with Engine(model, max_batch_size=4, kv_block_size=4, num_blocks=16, prefix_caching=prefix_caching) as tight:
            handles = [tight.submit(p, _greedy(n_new)) for p in prompts]
            sampled = tight.submit(prompts[1], seeded)
            got = [h.result().token_ids for h in handles]
            s = _wait_idle(tight)
            evicted = tight.cache.pool.evictions
        assert s["preemptions"] > 0, s
        assert (evicted > 0) == prefix_caching  # cached blocks of finished requests made room
        assert got == want
        assert sampled.result().token_ids == want_sampled  # the sampler's state survives a preemption


def test_long_prompt_prefill_is_mixed_into_the_running_streams_steps(pair):
    hf, model = pair
    long_prompt = [(7 * i) % 90 + 3 for i in range(100)]
    want_long, want_short = _hf_greedy(hf, long_prompt, 4), _hf_greedy(hf, PROMPTS[0], 60)
    during = {}
    for mixed in (True, False):
        with Engine(model, max_batch_size=4, kv_block_size=4, prefill_chunk=8, mixed_prefill=mixed) as engine:
            short = engine.submit(PROMPTS[0], _greedy(60))
            it = iter(short)
            next(it)  # the short stream is decoding ...
            n0 = len(short.token_ids)
            long = engine.submit(long_prompt, _greedy(4))
            first = next(iter(long))  # ... when the long prompt's 13 chunks of 8 run
            during[mixed] = len(short.token_ids) - n0
            assert [first.token_id] + [ev.token_id for ev in long] == want_long
            assert short.result().token_ids == want_short
    # mixed: a decode step for the short stream rides along every prefill chunk; otherwise it waits
    assert during[True] >= 12 and during[False] <= 2, during


def test_return_logprobs_false_skips_them_unless_params_ask(pair):
    """Engine.submit(return_logprobs=False) (what the server does for requests without `logprobs`): the same
    tokens, no log-probabilities; params.logprobs still gets exact ones."""
    hf, model = pair
    prompt = PROMPTS[0]
    with Engine(model) as engine:
        plain = engine.submit(prompt, _greedy(6), return_logprobs=False).result()
        asked = engine.submit(prompt, _greedy(6, logprobs=0), return_logprobs=False).result()
    assert plain.token_ids == asked.token_ids == _hf_greedy(hf, prompt, 6)
    assert plain.logprobs == [None] * 6
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + asked.token_ids])).logits[0].float(), dim=-1)
    want = [ref[len(prompt) - 1 + j, t].item() for j, t in enumerate(asked.token_ids)]
    assert asked.logprobs == pytest.approx(want, abs=1e-4)
