"""Train tokenizers on the user's text: byte-level BPE (Sennrich et al. 2016; GPT-2 bytes) and characters.

Both are saved as a Hugging Face folder (tokenizer.json + tokenizer_config.json with the ChatML
template), which `llmkit.load_tokenizer` and `transformers.AutoTokenizer` load alike.
Files (text, JSONL, folders of them) are read lazily, a batch of lines at a time, so corpora larger
than memory train fine.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

from llmkit.errors import InputError
from llmkit.text.sources import JSONL_SUFFIXES, expand_inputs, iter_documents
from llmkit.tokenizer.chat_template import CHATML_SPECIAL_TOKENS, CHATML_TEMPLATE
from llmkit.tokenizer.tokenizer import Tokenizer

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
DEFAULT_SPECIAL_TOKENS = [EOS_TOKEN, *CHATML_SPECIAL_TOKENS]

# The Qwen2 / GPT-4-style split: contractions, letter runs, single digits, punctuation runs, whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _check_files(files: Iterable[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """The files to train on: text files, JSONL files, and folders searched recursively for them."""
    return expand_inputs(files)


def iter_text(
    files: Iterable[str | os.PathLike] | str | os.PathLike, batch_chars: int = 1 << 20, text_field: str = "text"
) -> Iterator[str]:
    """Yield the corpus in pieces of about `batch_chars` characters, never a whole file at once.

    Text files come in whole-line pieces; JSONL files contribute the `text_field` of each record
    (records joined by newlines).
    """
    for path in _check_files(files):
        if path.suffix.lower() in JSONL_SUFFIXES:
            lines = (d.text + "\n" for d in iter_documents([path], text_field=text_field))
        else:
            lines = _lines(path)
        buf: list[str] = []
        size = 0
        for line in lines:
            buf.append(line)
            size += len(line)
            if size >= batch_chars:
                yield "".join(buf)
                buf, size = [], 0
        if buf:
            yield "".join(buf)


def _lines(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            yield from f
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    """Pass `texts` through, raising a clear error at the end if they held no characters."""
    seen = 0
    for t in texts:
        seen += len(t)
        yield t
    if seen == 0:
        raise InputError("the training corpus is empty (no characters); give files with text in them")


def _finish(
    backend: _HFTokenizer, special_tokens: list[str], out_dir: str | os.PathLike | None, chat_template: str | None
) -> Tokenizer:
    eos = special_tokens[0] if special_tokens else None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
    }
    if eos is not None:
        # One token ends documents, starts nothing and pads (GPT-2 convention).
        config.update(bos_token=eos, eos_token=eos, pad_token=eos)
    if UNK_TOKEN in special_tokens:
        config["unk_token"] = UNK_TOKEN
    template = chat_template
    if template == CHATML_TEMPLATE and not all(t in special_tokens for t in CHATML_SPECIAL_TOKENS):
        template = None  # ChatML needs its two special tokens
    tok = Tokenizer(backend, config, chat_template=template)
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def train_bpe_from_iterator(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    special_tokens: list[str] | None = None,
    min_frequency: int = 2,
    chat_template: str | None = CHATML_TEMPLATE,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE on an iterator of texts; save it to `out_dir` when given.

    Special tokens take the first ids; the first one is eos/bos/pad (default `<|endoftext|>`).
    """
    special_tokens = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    n_min = 256 + len(special_tokens)
    if vocab_size < n_min:
        raise InputError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least 256 byte tokens "
            f"+ {len(special_tokens)} special tokens = {n_min}"
        )
    backend = _HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(_non_empty(texts), trainer=trainer)
    return _finish(backend, special_tokens, out_dir, chat_template)


def train_bpe(
    files: Iterable[str | os.PathLike] | str | os.PathLike,
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    special_tokens: list[str] | None = None,
    min_frequency: int = 2,
    chat_template: str | None = CHATML_TEMPLATE,
    show_progress: bool = True,
    text_field: str = "text",
) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` tokens on files (read lazily); save to `out_dir`.

    `files`: text files, JSONL files (their `text_field`) or folders of them.
    """
    paths = _check_files(files)
    return train_bpe_from_iterator(
        iter_text(paths, text_field=text_field),
        vocab_size,
        out_dir,
        special_tokens=special_tokens,
        min_frequency=min_frequency,
        chat_template=chat_template,
        show_progress=show_progress,
    )


def train_char_from_iterator(
    texts: Iterable[str],
    out_dir: str | os.PathLike | None = None,
    special_tokens: list[str] | None = None,
    chat_template: str | None = CHATML_TEMPLATE,
) -> Tokenizer:
    """A character-level tokenizer: one id per distinct character seen (plus special tokens)."""
    special_tokens = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if UNK_TOKEN not in special_tokens:
        special_tokens.append(UNK_TOKEN)  # unseen characters map here instead of failing
    chars: set[str] = set()
    for t in _non_empty(texts):
        chars.update(t)
    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for c in sorted(chars):
        vocab.setdefault(c, len(vocab))
    backend = _HFTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character is its own piece (newlines too); decoding concatenates pieces.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(special_tokens)
    return _finish(backend, special_tokens, out_dir, chat_template)


def train_char(
    files: Iterable[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    special_tokens: list[str] | None = None,
    chat_template: str | None = CHATML_TEMPLATE,
    text_field: str = "text",
) -> Tokenizer:
    """Train a character-level tokenizer on files (text, JSONL, folders; read lazily); save to `out_dir`."""
    texts = iter_text(_check_files(files), text_field=text_field)
    return train_char_from_iterator(texts, out_dir, special_tokens, chat_template)
