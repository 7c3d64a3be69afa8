"""The web chat page at GET / in headless Chromium (Playwright): type, see a streamed answer, screenshot."""

from __future__ import annotations

import os

import httpx
import pytest
from test_serve_fixtures import build_tiny_llama, running_server

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no Chromium at /usr/bin/chromium")


def test_web_chat_streams_an_answer(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    model_dir = build_tiny_llama(tmp_path / "tiny")
    with running_server(model_dir) as srv:
        page_html = httpx.get(srv.url + "/").text
        assert 'data-model="tiny"' in page_html and "/v1/chat/completions" in page_html
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            try:
                page = browser.new_page(viewport={"width": 900, "height": 600})
                seen_stream = []
                page.on(
                    "response",
                    lambda r: (
                        seen_stream.append(r.headers.get("content-type", ""))
                        if r.url.endswith("/v1/chat/completions")
                        else None
                    ),
                )
                page.goto(srv.url + "/")
                assert page.locator("#model").inner_text() == "tiny"
                page.set_default_timeout(20_000)
                page.click("summary")  # open the settings
                page.fill("#maxtokens", "24")
                page.fill("#temperature", "0")
                page.fill("#input", "Hello there, who are you?")
                page.keyboard.press("Enter")
                page.wait_for_selector(".msg.assistant.done", timeout=30_000)
                answer = page.locator(".msg.assistant").inner_text()
                assert page.locator(".msg.user").inner_text() == "Hello there, who are you?"
                assert page.locator(".msg.error").count() == 0
                assert answer.strip(), "no streamed answer text"
                assert "chunks in" in page.locator("#stats").inner_text()
                assert any(ct.startswith("text/event-stream") for ct in seen_stream)
                page.screenshot(path=str(tmp_path / "chat.png"))
                api = httpx.post(
                    srv.url + "/v1/chat/completions",
                    timeout=30,
                    json={
                        "model": "tiny",
                        "messages": [{"role": "user", "content": "Hello there, who are you?"}],
                        "max_tokens": 24,
                        "temperature": 0,
                    },
                ).json()
                assert answer == api["choices"][0]["message"]["content"].strip()  # same text as the API gives
            finally:
                browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 1000
