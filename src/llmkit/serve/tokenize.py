"""The server's tokenizer over HTTP (vLLM's shape): GET /tokenizer_info, POST /tokenize, POST /detokenize.

lm-evaluation-harness's `tokenizer_backend=remote` uses these to tokenize exactly as the server does.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from llmkit.serve.errors import APIError
from llmkit.serve.protocol import DetokenizeRequest, TokenizeRequest
from llmkit.serve.state import ServerState, check_token_ids
from llmkit.tokenizer.tool_calls import prepare_chat

router = APIRouter()


def _tokenizer(request: Request):
    state: ServerState = request.app.state.llmkit
    if state.tokenizer is None:
        raise APIError("this server has no generative model tokenizer", 404)
    return state, state.tokenizer


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    state, tok = _tokenizer(request)
    special = getattr(tok, "special_tokens", {})
    return {
        "tokenizer_class": "llmkit.Tokenizer",
        "vocab_size": tok.vocab_size,
        "eos_token": special.get("eos_token"),
        "eos_token_id": tok.eos_token_id,
        "bos_token": special.get("bos_token"),
        "bos_token_id": tok.bos_token_id,
        "pad_token": special.get("pad_token"),
        "pad_token_id": tok.pad_token_id,
        "stop_token_ids": list(tok.eos_token_ids),
        "chat_template": tok.chat_template,
        "model_max_length": state.max_seq_len,
    }


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    state, tok = _tokenizer(request)
    if (body.prompt is None) == (body.messages is None):
        raise APIError("give exactly one of 'prompt' (text) or 'messages' (a chat)", 400, param="prompt")
    if body.messages is not None:  # message contents as plain text, exactly as chat completions sees them
        messages, extra = prepare_chat([m.as_dict() for m in body.messages], None, tok.chat_template)
        ids = await asyncio.to_thread(tok.encode_chat, messages, body.add_generation_prompt, **extra)
    else:
        ids = await asyncio.to_thread(tok.encode, body.prompt, body.add_special_tokens)
    # a JSONResponse skips FastAPI's per-item encoding: a long token list serializes in milliseconds
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.max_seq_len})


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    state, tok = _tokenizer(request)
    check_token_ids(body.tokens, tok.vocab_size, param="tokens")
    return {"prompt": tok.decode(body.tokens)}
