"""The FastAPI app: routes, API-key auth, request metrics, engine lifecycle (graceful drain)."""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
from contextlib import asynccontextmanager
from html import escape
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from llmkit.serve import chat, completions, embeddings, rag, tokenize
from llmkit.serve.errors import APIError, error_body, install_error_handlers
from llmkit.serve.state import ServerState

OPEN_PATHS = {"/", "/health", "/metrics", "/favicon.ico"}
DOC_PATHS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}  # only with --enable-docs
METRIC_PATHS = {
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/rag/query",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
    "/health",
    "/metrics",
    "/",
}


class AuthAndMetricsMiddleware:
    """Checks `Authorization: Bearer <key>` when the server has a key; limits the request body
    (size: 413 before it is read; time: 408); counts requests by status.

    A plain ASGI middleware (not BaseHTTPMiddleware) so streaming responses and client
    disconnects pass through untouched.
    """

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in METRIC_PATHS else "other"
        status = {"code": 500}
        limits = self.state.limits
        rejected = False  # we answered (413 / 408): whatever the app sends after is dropped

        async def send_wrapper(message):
            if rejected:
                return
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def reject(code: int, message: str, error_code: str) -> None:
            nonlocal rejected
            await _send_json(send_wrapper, code, error_body(message, code, code=error_code), {"Connection": "close"})
            rejected = True

        body_left = True
        received = 0
        body_deadline: float | None = None  # the whole body must arrive within body_timeout

        async def limited_receive():
            nonlocal body_left, received, body_deadline
            if not body_left or rejected:  # the body is in: the app may wait for a disconnect
                return await receive()
            now = asyncio.get_running_loop().time()
            body_deadline = body_deadline or now + limits.body_timeout
            try:
                message = await asyncio.wait_for(receive(), timeout=max(body_deadline - now, 0.0))
            except asyncio.TimeoutError:
                await reject(408, f"the request body did not arrive within {limits.body_timeout:g} s", "timeout")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limits.max_body_bytes:
                    await reject(413, _too_large(limits.max_body_bytes), "request_too_large")
                    return {"type": "http.disconnect"}
                body_left = message.get("more_body", False)
            return message

        try:
            key = self.state.api_key
            public = path in OPEN_PATHS or (limits.enable_docs and path in DOC_PATHS)
            if key and not public and scope["method"] != "OPTIONS":
                given = ""
                for name, value in scope.get("headers", []):
                    if name == b"authorization":
                        given = value.decode("latin-1")
                # the scheme is case-insensitive and spaces around the key are ignored
                scheme, _, token = given.strip().partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                    msg = (
                        "missing API key: send 'Authorization: Bearer <key>'"
                        if not given
                        else "incorrect API key provided"
                    )
                    await _send_json(
                        send_wrapper,
                        401,
                        error_body(msg, 401, code="invalid_api_key"),
                        {"WWW-Authenticate": "Bearer"},
                    )
                    return
            for name, value in scope.get("headers", []):
                if name == b"content-length" and value.isdigit() and int(value) > limits.max_body_bytes:
                    await reject(413, _too_large(limits.max_body_bytes), "request_too_large")
                    return
            try:
                await self.app(scope, limited_receive, send_wrapper)
            except Exception:
                if not rejected:  # after a 413/408 the app only fails on the body it never got
                    raise
        finally:
            self.state.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()


def _too_large(limit: int) -> str:
    return f"the request body exceeds this server's limit of {limit} bytes (--max-body-bytes)"


async def _send_json(send, status: int, body: dict, headers: dict[str, str]) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


def create_app(state: ServerState) -> FastAPI:
    """An OpenAI-compatible app over `state`; the engine starts with the app and drains at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is not None:
            state.engine.start()
        # what exists now (torch, the model, the app: ~200k objects) lives as long as the server: out of
        # the garbage collector's generations, or every full collection walks it, a 100-250 ms pause that
        # stalls the engine thread and the event loop together (every request's latency)
        gc.freeze()
        try:
            yield
        finally:
            if state.engine is not None:
                # finish in-flight requests, then stop the engine thread
                await asyncio.to_thread(state.engine.shutdown, True)

    docs = state.limits.enable_docs  # /docs, /redoc, /openapi.json: off unless --enable-docs
    app = FastAPI(
        title="llmkit OpenAI-compatible server",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.llmkit = state
    install_error_handlers(app)
    app.add_middleware(AuthAndMetricsMiddleware, state=state)
    for module in (completions, chat, embeddings, tokenize, rag):
        app.include_router(module.router)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(state, name) for name in state.model_names()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in state.model_names():
            raise APIError(f"the model '{model_id}' does not exist", 404, param="model", code="model_not_found")
        return _model_card(state, model_id)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": state.model_names(), **state.stats()}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page(request: Request):
        html = resources.files("llmkit.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", escape(state.model_name, quote=True)))

    return app


def _model_card(state: ServerState, name: str) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "llmkit",
        "max_model_len": state.max_seq_len,
        **({"parent": state.model_name} if name in state.adapters else {}),  # a LoRA adapter (as vLLM)
    }
