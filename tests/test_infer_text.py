"""Incremental detokenizer and stop-string tests against the tokenizers' own full decode."""

from __future__ import annotations

import pytest
from test_infer_fixtures import byte_level_bpe, sentencepiece_bpe

from llmkit.infer.detok import IncrementalDetokenizer
from llmkit.infer.stopping import StopChecker

TEXTS = ["Hello there, 你好，世界！ 🙂🚀 done.", "  spaced   words\nnew line 日本語 ok", "🙂", "a"]


@pytest.mark.parametrize("make", [byte_level_bpe, sentencepiece_bpe], ids=["bytelevel", "sentencepiece"])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(make, text):
    tok = make()
    ids = tok.encode(text).ids
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)  # never half a character


@pytest.mark.parametrize("make", [byte_level_bpe, sentencepiece_bpe], ids=["bytelevel", "sentencepiece"])
def test_continuation_after_prompt_keeps_space(make):
    tok = make()
    prompt, completion = "The weather", " is 很好 today 🙂"
    p_ids = tok.encode(prompt).ids
    all_ids = tok.encode(prompt + completion).ids
    assert all_ids[: len(p_ids)] == p_ids
    detok = IncrementalDetokenizer(tok, prompt_ids=p_ids)
    out = "".join(detok.add(i) for i in all_ids[len(p_ids) :]) + detok.flush()
    assert out == completion
    assert tok.decode(all_ids) == prompt + completion


def test_emoji_is_held_until_complete():
    tok = byte_level_bpe()
    ids = tok.encode("🚀").ids
    assert len(ids) > 1  # split across byte tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids] == [""] * (len(ids) - 1) + ["🚀"]


def test_skip_special_tokens():
    tok = byte_level_bpe()
    eot = tok.token_to_id("<|endoftext|>")
    ids = tok.encode("hi").ids + [eot]
    d = IncrementalDetokenizer(tok, skip_special_tokens=True)
    assert "".join(d.add(i) for i in ids) + d.flush() == "hi"
    d = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(d.add(i) for i in ids) + d.flush() == "hi<|endoftext|>"


def _stream(checker: StopChecker, pieces: list[str]) -> tuple[str, bool]:
    so_far, out = "", []
    for piece in pieces:
        done, emit = checker.check_text(so_far, piece)
        out.append(emit)
        so_far += piece
        if done:
            return "".join(out), True
    return "".join(out) + checker.flush(so_far), False


@pytest.mark.parametrize(
    "pieces,stop,expected,finished",
    [
        (["Hello", " wor", "ld", "!"], ["world"], "Hello ", True),
        (["a#", "#", "#b"], ["###"], "a", True),
        (["ab", "c", "d"], ["cd", "bcx"], "ab", True),  # 'bc' held back, then 'cd' completes
        (["Hel", "lo ", "there"], ["xyz"], "Hello there", False),
        (["one\n", "\ntwo"], ["\n\n"], "one", True),
        (["abc<", "|e", "nd", "x"], ["<|end|>"], "abc<|endx", False),  # partial never completes: released
        (["STOP"], ["STOP"], "", True),
        (["x", "y"], None, "xy", False),
    ],
)
def test_stop_strings_across_boundaries(pieces, stop, expected, finished):
    assert _stream(StopChecker(stop=stop), pieces) == (expected, finished)


def test_stop_text_is_never_emitted_early():
    checker = StopChecker(stop=["<eos>"])
    so_far = ""
    emitted = ""
    for ch in "text <eo":
        done, emit = checker.check_text(so_far, ch)
        so_far += ch
        emitted += emit
        assert not done
    assert emitted == "text "  # '<eo' is held back


def test_check_token():
    c = StopChecker(stop_token_ids={7}, eos_token_ids={2})
    assert c.check_token(7) == "stop" and c.check_token(2) == "stop" and c.check_token(3) is None
    c = StopChecker(stop_token_ids={7}, eos_token_ids={2}, ignore_eos=True)
    assert c.check_token(2) is None and c.check_token(7) == "stop"
