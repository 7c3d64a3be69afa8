"""The quickstart's promise, in a real browser: its chat model answers on the web page, turn after turn.

A model is built the quickstart's way (BPE, pretraining, chat SFT on dialogue pairs from the plays;
tiny and a few steps), served, and driven in headless Chromium (Playwright) as a user would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from test_serve_fixtures import running_server

from llmkit.train.quickstart import quickstart

CHROMIUM = "/usr/bin/chromium"
SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare/input.txt"
CTX = 256
SYSTEM = "You are a player in a Shakespeare play."
TINY = [
    "--model.n_layer", "2", "--model.n_embd", "32", "--model.n_head", "2", "--model.n_kv_head", "2",
    "--model.intermediate_size", "64", "--model.block_size", str(CTX), "--train.seq_len", str(CTX),
    "--train.batch_size", "2", "--train.eval_iters", "1", "--data.vocab_size", "400", "--train.num_threads", "1",
]
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no Chromium at /usr/bin/chromium")


def _play(tmp_path: Path) -> Path:
    corpus = tmp_path / "plays.txt"
    if SHAKESPEARE.is_file():
        corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    else:  # a play of our own: alternating speeches
        speeches = [f"{'ROMEO' if i % 2 else 'JULIET'}:\nSpeech number {i}, and what follows it.\n" for i in range(400)]
        corpus.write_text("\n".join(speeches), encoding="utf-8")
    return corpus


def _count(url: str, messages: list[dict]) -> int:
    r = httpx.post(url + "/tokenize", json={"messages": messages, "add_generation_prompt": True}, timeout=30)
    return r.json()["count"]


def test_quickstart_chat_model_talks_on_the_web_page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    res = quickstart(str(tmp_path / "qs"), data=str(_play(tmp_path)), max_iters=6, n_samples=0, overrides=TINY,
                     chat_max_steps=4, progress=False)
    assert res.chat is not None and res.chat.step == 4
    chat_dir = Path(res.chat_dir)
    assert (chat_dir / "model.safetensors").is_file() and (chat_dir / "tokenizer.json").is_file()
    records = [json.loads(line) for line in (tmp_path / "qs" / "chat_data.jsonl").read_text().splitlines()]
    assert records and all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant"
                           for r in records)

    with running_server(chat_dir) as srv:
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["max_model_len"] == CTX
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"],
            )
            try:
                page = browser.new_page(viewport={"width": 900, "height": 640})
                page.set_default_timeout(30_000)
                sent: list[dict] = []
                page.on("request", lambda r: sent.append(json.loads(r.post_data))
                        if r.url.endswith("/v1/chat/completions") else None)
                page.goto(srv.url + "/")
                page.wait_for_function("document.getElementById('ctx').textContent.includes('256')")
                page.click("summary")  # the settings
                page.fill("#maxtokens", "100000")  # more than the context: the page clamps it
                page.locator("#maxtokens").dispatch_event("change")
                assert page.input_value("#maxtokens") == str(CTX - 1)
                page.fill("#maxtokens", "16")
                page.fill("#temperature", "0")
                page.fill("#system", SYSTEM)

                def say(text: str, n: int) -> str:
                    page.fill("#input", text)
                    page.keyboard.press("Enter")
                    page.wait_for_selector(f".msg.assistant.done >> nth={n - 1}")
                    return page.locator(".msg.assistant").nth(n - 1).text_content()

                first = "What light through yonder window breaks?"
                reply1 = say(first, 1)
                second = "Speak again, bright angel!"
                reply2 = say(second, 2)
                assert page.locator(".msg.assistant").count() == 2
                assert reply1 and reply2  # (a model this small may well answer in blank lines)
                assert page.locator(".msg.error").count() == 0
                assert len(sent) == 2
                sys_msg = {"role": "system", "content": SYSTEM}
                assert sent[0]["messages"] == [sys_msg, {"role": "user", "content": first}]
                assert sent[1]["messages"] == [  # the second request carried the first turn
                    sys_msg, {"role": "user", "content": first}, {"role": "assistant", "content": reply1},
                    {"role": "user", "content": second},
                ]
                api = httpx.post(srv.url + "/v1/chat/completions", json={**sent[1], "stream": False}, timeout=60)
                assert api.json()["choices"][0]["message"]["content"] == reply2  # the page shows the server's reply
                for body in sent:  # never a max_tokens the context cannot hold
                    assert body["max_tokens"] <= 16
                    assert _count(srv.url, body["messages"]) + body["max_tokens"] <= CTX

                # a message that fits alone but not after the conversation: the oldest turns go, the
                # system prompt stays, and the page says so instead of failing
                history = sent[1]["messages"] + [{"role": "assistant", "content": reply2}]
                k = 1
                while _count(srv.url, [*history, {"role": "user", "content": ("O Romeo! " * k).strip()}]) + 16 <= CTX:
                    k += 1
                long = ("O Romeo! " * k).strip()
                assert _count(srv.url, [sys_msg, {"role": "user", "content": long}]) + 16 <= CTX
                say(long, 3)
                assert page.locator(".msg.error").count() == 0
                notice = page.locator(".msg.notice").inner_text()
                assert "oldest message" in notice and f"{CTX}-token context" in notice and "system prompt" in notice
                third = sent[2]["messages"]
                assert third[0] == sys_msg and third[-1] == {"role": "user", "content": long}
                assert {"role": "user", "content": first} not in third
                assert _count(srv.url, third) + sent[2]["max_tokens"] <= CTX
                assert page.locator(".msg.dropped").count() >= 2
                page.screenshot(path=str(tmp_path / "chat.png"))
            finally:
                browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 1000
