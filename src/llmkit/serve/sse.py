"""Server-sent events in OpenAI's streaming format: `data: {json}` lines, `data: [DONE]` at the end."""

from __future__ import annotations

import json
from typing import Any

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_error(body: dict[str, Any]) -> str:
    """An error met mid-stream: an `error` event whose data is an OpenAI error object."""
    return f"event: error\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
