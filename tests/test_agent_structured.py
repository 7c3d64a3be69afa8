"""Constrained decoding through the server: a random-init model under a JSON schema (real `openai` client,
validated with `jsonschema`), json_object, vLLM's guided_choice / guided_regex, and bad schemas as 400s."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from test_serve_fixtures import build_tiny_llama, running_server

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tiny = build_tiny_llama(tmp_path_factory.mktemp("structured") / "tiny")
    with running_server(tiny, max_tokens=200) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)


def test_json_schema_always_validates(client):
    """100 samples at temperature 1 (n=10 x 10 requests, batched by the engine) all parse and validate."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    texts = []
    for seed in range(10):
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "a person"}], temperature=1.0, n=10,
            seed=100 * seed, max_tokens=150, response_format=fmt,
        )
        texts += [c.message.content for c in r.choices]
        assert all(c.finish_reason == "stop" for c in r.choices)
    assert len(texts) == 100 and len(set(texts)) > 50  # really sampled
    for t in texts:
        jsonschema.validate(json.loads(t), SCHEMA)


def test_json_object_and_guided(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "answer in JSON"}], n=8, seed=1, max_tokens=150,
        response_format={"type": "json_object"},
    )
    done = [c for c in r.choices if c.finish_reason == "stop"]  # a free object may run past max_tokens
    assert done
    for c in done:
        assert isinstance(json.loads(c.message.content), dict)
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "pick"}], n=8, seed=2, max_tokens=20,
        extra_body={"guided_choice": ["yes", "no", "maybe"]},
    )
    assert {c.message.content for c in r.choices} <= {"yes", "no", "maybe"}
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a date"}], n=8, seed=3, max_tokens=20,
        extra_body={"guided_regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"},
    )
    assert all(re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", c.message.content) for c in r.choices)


def test_bad_grammar_is_400(client):
    with pytest.raises(openai.BadRequestError, match="invalid"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], extra_body={"guided_regex": "(unclosed"}
        )
