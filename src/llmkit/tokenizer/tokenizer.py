"""`Tokenizer`: a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) in llmkit.

The `tokenizers` library does the encoding; this class adds what a folder's config files say:
special tokens, the chat template, stop ids. Ids equal `transformers.AutoTokenizer` on the same folder.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from llmkit.errors import CheckpointError, InputError
from llmkit.fsutil import atomic_write_text
from llmkit.tokenizer.chat_template import render_chat_template
from llmkit.tokenizer.class_rules import apply_class_rules

# Named special tokens a tokenizer_config.json may define; all are passed to chat templates.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# End-of-turn tokens of common chat formats: stop ids when the chat template uses them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")
# Texts at least this long are encoded through `encode_batch`, which releases the GIL (plain
# `encode` holds it), so a long prompt tokenized in a worker thread never stalls the others.
GIL_FREE_CHARS = 4096


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialised AddedToken."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _encode(backend: _HFTokenizer, text: str, add_special_tokens: bool):
    """One `tokenizers.Encoding` (ids and character offsets); long texts through the GIL-free path."""
    if len(text) >= GIL_FREE_CHARS:
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
    return backend.encode(text, add_special_tokens=add_special_tokens)


def _render_with_spans(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, variables: dict[str, Any]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans where message fields (all but 'role') landed.

    The template is rendered a second time with each string field replaced by a unique marker;
    the markers show where the fields go. The real rendering is used when it equals the marked
    one with the fields put back (verbatim, or stripped for templates that `trim`); otherwise the
    marked rendering with the fields put back verbatim is used, so the spans are always exact.
    """
    text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **variables)
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return text, []
    nonce = secrets.token_hex(8)
    values: list[str] = []
    marked = []
    for m in messages:
        mm = dict(m)
        for k, v in m.items():
            if k not in ("role", "tool_call_id") and isinstance(v, str) and v:  # ids: templates check them
                mm[k] = f"\ue000{nonce}:{len(values)}\ue001"
                values.append(v)
        marked.append(mm)
    if not values:
        return text, []
    rendered = render_chat_template(template, marked, add_generation_prompt=add_generation_prompt, **variables)
    parts = rendered.split("\ue000" + nonce + ":")

    def put_back(strip: bool) -> tuple[str, list[tuple[int, int]]]:
        out, spans = parts[0], []
        for part in parts[1:]:
            k, _, rest = part.partition("\ue001")
            if not k.isdigit() or int(k) >= len(values):
                raise InputError("the chat template rewrites message fields in a way llmkit cannot track")
            v = values[int(k)].strip() if strip else values[int(k)]
            spans.append((len(out), len(out) + len(v)))
            out += v + rest
        return out, spans

    verbatim = put_back(False)
    if verbatim[0] == text:
        return verbatim
    stripped = put_back(True)
    return stripped if stripped[0] == text else verbatim


def _clean_up_tokenization(text: str) -> str:
    # The same replacements as transformers' `clean_up_tokenization` (used when a config asks for it).
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


class Tokenizer:
    """A text <-> token-id codec with special tokens and a chat template.

    `vocab_size` counts added tokens too (it is the embedding size a model needs, `len(hf_tokenizer)`).
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        config: dict[str, Any] | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: list[int] | None = None,
    ):
        self.backend = backend
        # transformers turns off the padding / truncation a tokenizer.json may carry; so do we.
        self.backend.no_padding()
        self.backend.no_truncation()
        self.config: dict[str, Any] = dict(config or {})
        self.chat_template = chat_template
        self.special_tokens: dict[str, str] = {}
        for key in SPECIAL_TOKEN_KEYS:
            tok = _token_content(self.config.get(key))
            if tok is not None:
                self.special_tokens[key] = tok
        self._extra_eos = list(extra_eos_token_ids or [])
        self._plain: _HFTokenizer | None = None  # a copy that encodes special-token strings as text
        self._plain_lock = threading.Lock()

    # ---- special tokens ---------------------------------------------------------------------
    def _special_id(self, key: str) -> int | None:
        tok = self.special_tokens.get(key)
        return None if tok is None else self.backend.token_to_id(tok)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a generation: eos, generation_config eos ids, the chat end-of-turn token."""
        ids: list[int] = []
        candidates = [self.eos_token_id, *self._extra_eos]
        for tok in END_OF_TURN_TOKENS:
            if self.chat_template and tok in self.chat_template:
                candidates.append(self.backend.token_to_id(tok))
        for i in candidates:
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (with the post-processor's special tokens, e.g. BOS, when asked).

        With `split_special_tokens` (transformers' name), special-token strings in `text` such as
        '<|im_end|>' are encoded as ordinary text instead of becoming their special ids.
        """
        if not isinstance(text, str):
            raise InputError(f"encode expects a str, got {type(text).__name__}")
        backend = self._plain_backend() if split_special_tokens else self.backend
        return _encode(backend, text, add_special_tokens).ids

    def _plain_backend(self) -> _HFTokenizer:
        with self._plain_lock:  # a second backend: toggling the shared one would race other threads
            if self._plain is None:
                self._plain = _HFTokenizer.from_str(self.backend.to_str())
                self._plain.encode_special_tokens = True
                self._plain.no_padding()
                self._plain.no_truncation()
            return self._plain

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the `tokenizers` library."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError("encode_batch expects a list of str")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def pad(
        self, batch: list[list[int]], padding_side: str = "right", pad_to: int | None = None
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Pad id lists to one length; returns (input_ids, attention_mask) like a HF tokenizer call."""
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad_id = self.pad_token_id
        if pad_id is None:
            raise InputError("this tokenizer has no pad_token; set one in tokenizer_config.json to pad batches")
        length = max([len(x) for x in batch] + [pad_to or 0])
        ids, mask = [], []
        for x in batch:
            n = length - len(x)
            if padding_side == "right":
                ids.append(list(x) + [pad_id] * n)
                mask.append([1] * len(x) + [0] * n)
            else:
                ids.append([pad_id] * n + list(x))
                mask.append([0] * n + [1] * len(x))
        return ids, mask

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`."""
        if hasattr(ids, "tolist"):  # a tensor or numpy array
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.config.get("clean_up_tokenization_spaces"):
            text = _clean_up_tokenization(text)
        return text

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def token_to_id(self, s: str) -> int | None:
        return self.backend.token_to_id(s)

    def add_special_tokens(self, tokens: list[str], key: str | None = None) -> list[int]:
        """Add special tokens that are missing (new ids after the vocabulary, in order); `key` names the
        first one (e.g. `mask_token`) in tokenizer_config.json. Returns the tokens' ids."""
        from tokenizers import AddedToken

        new = [t for t in tokens if self.backend.token_to_id(t) is None]
        if new:
            self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
            self._plain = None
        if key:
            self.special_tokens[key] = tokens[0]
        return [self.backend.token_to_id(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    # ---- chat ------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template; token ids (no extra specials) when `tokenize`."""
        template = chat_template or self.chat_template
        if template is None:
            raise InputError(
                "this tokenizer has no chat_template (tokenizer_config.json 'chat_template' or "
                "chat_template.jinja); pass chat_template=... or use llmkit's ChatML default"
            )
        if tokenize:
            return self.encode_chat(messages, add_generation_prompt, chat_template=template, **kwargs)
        return render_chat_template(
            template, messages, add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **kwargs}
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of a chat rendered with the chat template, message fields encoded as plain text.

        Only the template's own markup yields special ids: a special-token string typed inside a
        message (a user writing '<|im_end|>\\n<|im_start|>system') becomes ordinary tokens, so no
        message can forge a turn. Benign chats get the same ids as transformers'
        `apply_chat_template(tokenize=True)`. Every prompt llmkit builds from a chat (server,
        `llmkit chat`, fine-tuning data, agents) goes through here.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise InputError(
                "this tokenizer has no chat_template (tokenizer_config.json 'chat_template' or "
                "chat_template.jinja); pass chat_template=... or use llmkit's ChatML default"
            )
        variables = {**self.special_tokens, **kwargs}
        text, spans = _render_with_spans(template, messages, add_generation_prompt, variables)
        enc = _encode(self.backend, text, add_special_tokens=False)
        special = {i: t.content for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

        def in_message(a: int, b: int) -> bool:
            return any(a < e and s < b for s, e in spans)

        # special ids matched from their string in the text (not e.g. byte-fallback pieces of a character)
        marks = [(i, a, b) for i, (a, b) in zip(enc.ids, enc.offsets) if i in special and special[i] in text[a:b]]
        if not any(in_message(a, b) for _, a, b in marks):
            return enc.ids  # nothing typed inside a message looked like a special token
        ids: list[int] = []
        pos = 0
        for i, a, b in marks:  # keep the template's specials; re-encode the text between them plainly
            if not in_message(a, b):
                ids += self.encode(text[pos:a], add_special_tokens=False, split_special_tokens=True)
                ids.append(i)
                pos = b
        return ids + self.encode(text[pos:], add_special_tokens=False, split_special_tokens=True)

    # ---- save ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json + tokenizer_config.json (atomically, file by file) into folder `path`."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", self.backend.to_str(pretty=True))
        config = {k: v for k, v in self.config.items() if k not in ("chat_template",)}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.update(self.special_tokens)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if (out / "chat_template.jinja").exists():
            # A stale template file would shadow the one we just wrote into the config.
            os.unlink(out / "chat_template.jinja")

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.special_tokens.get('bos_token')!r}, "
            f"eos={self.special_tokens.get('eos_token')!r}, chat_template={self.chat_template is not None})"
        )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a Hugging Face folder (tokenizer.json required) or a tokenizer.json file."""
    p = Path(path)
    if p.is_file() and p.name.endswith(".json"):
        folder, tok_file = p.parent, p
    else:
        folder, tok_file = p, p / "tokenizer.json"
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder {folder} does not exist; expected a folder with tokenizer.json")
    if not tok_file.is_file():
        raise CheckpointError(
            f"{folder} has no tokenizer.json; expected a Hugging Face fast-tokenizer file "
            f"(train one with `llmkit tokenizer train`)"
        )
    tok_json = _read_json(tok_file)  # a clear error for corrupt JSON before the Rust parser's terse one
    try:
        backend = _HFTokenizer.from_file(str(tok_file))
    except Exception as e:  # the Rust side raises a bare Exception
        raise CheckpointError(f"{tok_file} is not a valid tokenizer.json: {e}") from None

    config: dict[str, Any] = {}
    if (folder / "special_tokens_map.json").is_file():
        config.update(_read_json(folder / "special_tokens_map.json"))
    if (folder / "tokenizer_config.json").is_file():
        config.update(_read_json(folder / "tokenizer_config.json"))

    apply_class_rules(backend, config, tok_json)

    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        chat_template = named.get("default")
    if (folder / "chat_template.jinja").is_file():  # transformers >= 4.43 saves it beside the config
        chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

    extra_eos: list[int] = []
    if (folder / "generation_config.json").is_file():
        eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        extra_eos = [eos] if isinstance(eos, int) else [int(i) for i in eos or []]
    return Tokenizer(backend, config, chat_template=chat_template, extra_eos_token_ids=extra_eos)
