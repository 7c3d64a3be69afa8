"""Grounded answers: a prompt with numbered context blocks, generation, and citations [n] -> sources."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

from llmkit.errors import InputError
from llmkit.rag.store import Hit

NO_ANSWER = "The context does not contain the answer."
SYSTEM = ("Answer the question using only the numbered context blocks. Cite the blocks you use like [1] or [2]. "
          f"If the context does not contain the answer, reply exactly: {NO_ANSWER}")


@dataclass
class Answer:
    text: str
    hits: list[Hit]  # the context blocks, numbered from 1
    cited: list[int] = field(default_factory=list)  # block numbers the answer cites, in order of first use

    def sources(self) -> list[tuple[int, Hit]]:
        return [(n, self.hits[n - 1]) for n in self.cited]

    def to_dict(self) -> dict:
        return {"answer": self.text, "citations": [{"n": n, **h.to_dict()} for n, h in self.sources()],
                "context": [h.to_dict() for h in self.hits]}


def context_blocks(hits: list[Hit]) -> str:
    return "\n\n".join(f"[{i}] ({h.citation()})\n{h.text}" for i, h in enumerate(hits, 1))


def messages(question: str, hits: list[Hit]) -> list[dict]:
    """Chat messages for a grounded answer."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Context:\n{context_blocks(hits)}\n\nQuestion: {question}"}]


def prompt_text(question: str, hits: list[Hit], tokenizer) -> str:
    """The chat template's rendering of `messages`, or a plain prompt for a tokenizer without one."""
    msgs = messages(question, hits)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    return f"{SYSTEM}\n\n{msgs[1]['content']}\n\nAnswer:"


def citations(text: str, n_blocks: int) -> list[int]:
    """Block numbers cited as [n] (also [1, 2] and [1][2]) that exist, in order of first use."""
    out: list[int] = []
    for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", text):
        for n in map(int, group.split(",")):
            if 1 <= n <= n_blocks and n not in out:
                out.append(n)
    return out


def stream_local(model, tokenizer, question: str, hits: list[Hit], max_tokens: int = 256, **sampling) -> Iterator[str]:
    """Text deltas from llmkit's own generation loop."""
    from llmkit.infer.generate import stream_text

    prompt = prompt_text(question, hits, tokenizer)
    ids = tokenizer.encode(prompt, add_special_tokens=not getattr(tokenizer, "chat_template", None))
    limit = getattr(model.config, "block_size", None)
    if limit and len(ids) + max_tokens > limit:
        raise InputError(f"the prompt with {len(hits)} context blocks has {len(ids)} tokens; with {max_tokens} new "
                         f"tokens it exceeds the model's {limit}: use a smaller -k or a model with a longer context")
    yield from stream_text(model, tokenizer, ids, max_new_tokens=max_tokens, **sampling)


def stream_openai(base_url: str, question: str, hits: list[Hit], model: str | None = None,
                  max_tokens: int = 256, api_key: str | None = None, **sampling) -> Iterator[str]:
    """Text deltas from an OpenAI-compatible `/v1/chat/completions` (stream=true, server-sent events)."""
    base = base_url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    key = api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("LLMKIT_API_KEY")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    if model is None:
        req = urllib.request.Request(base + "/models", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                model = json.loads(r.read())["data"][0]["id"]
        except (urllib.error.URLError, OSError, KeyError, IndexError) as e:
            raise InputError(f"{base}/models: cannot find a model to ask ({e}); pass --served-model") from e
    body = {"model": model, "messages": messages(question, hits), "max_tokens": max_tokens, "stream": True, **sampling}
    req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                choices = json.loads(data).get("choices") or [{}]
                delta = choices[0].get("delta", {}).get("content")
                if delta:
                    yield delta
    except urllib.error.HTTPError as e:
        raise InputError(f"{base}/chat/completions: HTTP {e.code}: {e.read().decode(errors='replace')[:300]}") from e
    except (urllib.error.URLError, OSError) as e:
        raise InputError(f"{base}/chat/completions: cannot reach the server ({e})") from e
