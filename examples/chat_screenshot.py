"""Serve a chat model, talk to it on the web page in headless Chromium, save a screenshot.

    python examples/chat_screenshot.py --model out/quickstart/chat --out docs/quickstart-chat.png

Makes README's picture of what `make quickstart` gives (needs Playwright and /usr/bin/chromium).
"""

from __future__ import annotations

import argparse

from playwright.sync_api import sync_playwright

from llmkit.serve import BackgroundServer, create_app, load_state

MESSAGES = ["What light through yonder window breaks?", "Speak again, bright angel!"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="out/quickstart/chat")
    ap.add_argument("--out", default="docs/quickstart-chat.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--max-tokens", default="60")
    ap.add_argument("--temperature", default="0.8")
    args = ap.parse_args()
    srv = BackgroundServer(create_app(load_state(args.model, served_model_name="quickstart-chat")))
    srv.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--headless", "--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.set_default_timeout(120_000)
            page.goto(srv.url + "/")
            page.wait_for_function("document.getElementById('ctx').textContent !== ''")
            page.click("summary")
            page.fill("#maxtokens", args.max_tokens)
            page.fill("#temperature", args.temperature)
            page.click("summary")
            for n, text in enumerate(MESSAGES, 1):
                page.fill("#input", text)
                page.keyboard.press("Enter")
                page.wait_for_selector(f".msg.assistant.done >> nth={n - 1}")
            page.screenshot(path=args.out)
            browser.close()
    finally:
        srv.stop()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
