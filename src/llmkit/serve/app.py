"""The FastAPI app: routes, API-key auth, request metrics, engine lifecycle (graceful drain)."""

from __future__ import annotations

import asyncio
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

OPEN_PATHS = {"/", "/health", "/metrics", "/docs", "/openapi.json", "/favicon.ico"}
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
    """Checks `Authorization: Bearer <key>` when the server has a key; counts requests by status.

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

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            key = self.state.api_key
            if key and path not in OPEN_PATHS and scope["method"] != "OPTIONS":
                given = ""
                for name, value in scope.get("headers", []):
                    if name == b"authorization":
                        given = value.decode("latin-1")
                scheme, _, token = given.partition(" ")
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
            await self.app(scope, receive, send_wrapper)
        finally:
            self.state.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()


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
        try:
            yield
        finally:
            if state.engine is not None:
                # finish in-flight requests, then stop the engine thread
                await asyncio.to_thread(state.engine.shutdown, True)

    app = FastAPI(title="llmkit OpenAI-compatible server", lifespan=lifespan)
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
        stats = state.engine.stats() if state.engine is not None else {}
        return {"status": "ok", "models": state.model_names(), **stats}

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
    }
