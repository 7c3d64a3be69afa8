"""Bounded load on loopback, client disconnects and graceful shutdown: no errors, no leaked slots."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import openai
import pytest
from test_serve_fixtures import build_tiny_llama, running_server, wait_idle

MODEL = "tiny"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("load") / MODEL)


def test_concurrent_streaming_clients(tiny_dir):
    clients, duration = 32, 8.0
    with running_server(tiny_dir, max_batch_size=16, max_queue=64) as srv:
        engine = srv.state.engine
        peak = {"running": 0}

        async def one_client(k: int, stats: dict) -> None:
            rng = random.Random(k)
            client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
            t_end = time.monotonic() + duration
            while time.monotonic() < t_end:
                n = rng.randint(4, 32)
                stream = await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"client {k} says hi"}],
                    max_tokens=n,
                    stream=True,
                    stream_options={"include_usage": True},
                    temperature=1.0,
                    seed=k,
                    extra_body={"ignore_eos": True},
                )
                text, finish, usage = "", None, None
                async for chunk in stream:
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                        finish = chunk.choices[0].finish_reason or finish
                    usage = chunk.usage or usage
                    peak["running"] = max(peak["running"], engine.stats()["running"])
                assert finish == "length" and usage.completion_tokens == n
                stats["requests"] += 1
                stats["tokens"] += n
            await client.close()

        async def main() -> dict:
            stats = {"requests": 0, "tokens": 0}
            await asyncio.gather(*(one_client(k, stats) for k in range(clients)))
            return stats

        t0 = time.monotonic()
        stats = asyncio.run(main())
        elapsed = time.monotonic() - t0
        idle = wait_idle(engine)
        assert stats["requests"] >= clients
        assert peak["running"] > 1  # requests really were batched together
        # every streamed request counted once; the counter is bumped after the last byte, so poll briefly
        line = f'llmkit_requests_total{{endpoint="/v1/chat/completions",status="200"}} {float(stats["requests"])}'
        for _ in range(50):
            metrics = httpx.get(srv.url + "/metrics").text
            if line in metrics:
                break
            time.sleep(0.05)
        assert line in metrics
        assert 'status="500"' not in metrics
        print(
            f"\n{stats['requests']} streamed requests, {stats['tokens']} tokens in {elapsed:.1f}s "
            f"({stats['tokens'] / elapsed:.0f} tok/s), peak batch {peak['running']}, {idle}"
        )


def test_disconnect_frees_the_slot(tiny_dir):
    with running_server(tiny_dir, max_batch_size=4) as srv:
        engine = srv.state.engine
        before = engine.stats()["tokens_generated"]
        body = {"model": MODEL, "prompt": "x", "max_tokens": 250, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as http, http.stream("POST", srv.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few events, then hang up
        assert any(line.startswith("data: {") for line in got)
        wait_idle(engine, timeout=3.0)
        generated = engine.stats()["tokens_generated"] - before
        assert generated < 250, "the sequence kept generating after the client left"
        # non-streaming: the client times out, the server notices and cancels
        body = {"model": MODEL, "prompt": "y", "max_tokens": 250, "ignore_eos": True}
        before = engine.stats()["tokens_generated"]
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", json=body, timeout=0.05)
        wait_idle(engine, timeout=3.0)
        assert httpx.get(srv.url + "/health").json()["running"] == 0


def test_graceful_shutdown_drains_in_flight_requests(tiny_dir):
    srv_cm = running_server(tiny_dir)
    srv = srv_cm.__enter__()
    body = {"model": MODEL, "prompt": "z", "max_tokens": 200, "ignore_eos": True, "stream": True}
    result: dict = {}
    started = threading.Event()

    def client():
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            events = []
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    started.set()
            result["events"] = events

    t = threading.Thread(target=client)
    t.start()
    assert started.wait(30)
    srv_cm.__exit__(None, None, None)  # should_exit: stop accepting, finish the stream, drain the engine
    t.join(30)
    events = result["events"]
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in events[-2]
    assert srv.state.engine.stats()["tokens_generated"] == 200
    assert not srv.thread.is_alive()


def test_cli_serve_subprocess_with_api_key(tiny_dir):
    """`llmkit serve` as a user runs it: key from --api-key, SIGTERM shuts it down cleanly."""
    import signal
    import subprocess
    import sys

    from llmkit.serve.server import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmkit",
            "serve",
            "--model",
            str(tiny_dir),
            "--port",
            str(port),
            "--api-key",
            "k3y",
            "--max-batch-size",
            "2",
            "--log-level",
            "warning",
            "--header-timeout",
            "5",
            "--max-body-bytes",
            "100000",
            "--enable-docs",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() - t0 < 60, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/openapi.json").status_code == 200  # --enable-docs: served without the key
        big = httpx.post(url + "/v1/completions", content=b"x" * 100_001, headers={"Authorization": "Bearer k3y"})
        assert big.status_code == 413 and "100000" in big.json()["error"]["message"]
        c = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        r = c.completions.create(model=MODEL, prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
        # issue 9's hostile requests: clear 400s, never a 500 or a traceback in the log
        auth = {"Authorization": "Bearer k3y", "content-type": "application/json"}
        for raw in (
            '{"model": "tiny", "prompt": "ab\\ud800cd"}',
            '{"model": "tiny\\ud800", "prompt": "x"}',
            '{"model": "tiny", "prompt": "x", "n": 4, "seed": 18446744073709551612}',
        ):
            assert httpx.post(url + "/v1/completions", content=raw.encode(), headers=auth).status_code == 400
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out  # a clean drain after SIGTERM exits 0
    assert "Traceback" not in out


def test_cli_serve_bad_model_folder_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "llmkit", "serve", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
