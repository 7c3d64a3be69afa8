"""llmkit.serve: an OpenAI-compatible HTTP server (completions, chat, embeddings, metrics, web chat)."""

from llmkit.serve.app import create_app
from llmkit.serve.server import BackgroundServer, load_state, serve
from llmkit.serve.state import ServerState

__all__ = ["BackgroundServer", "ServerState", "create_app", "load_state", "serve"]
