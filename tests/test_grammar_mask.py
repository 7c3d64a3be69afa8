"""Batched grammar masking (infer/grammar.mask_logits): one packed bitmask for the batch, applied by
xgrammar's kernel, equals the allowed set computed by hand (xgrammar's matcher bits unpacked one token at
a time, minus tokens whose decoded text holds a control character); rows without a grammar are untouched."""

from __future__ import annotations

import torch
import xgrammar as xgr

from llmkit.infer.grammar import Constraint, Grammar, _allowed_text_words, compile_grammar, mask_logits
from llmkit.tokenizer import train_bpe_from_iterator

TEXT = ['{"name": "Juliet", "s": "to be or not to be"}', "that is the question\twhether 'tis nobler", "a\nb"] * 50


def test_batch_mask_matches_hand_unpacked_bits(tmp_path):
    tok = train_bpe_from_iterator(TEXT, 300, tmp_path, min_frequency=1, show_progress=False)
    V = tok.vocab_size + 5  # a padded head: the extra ids are never allowed
    g = Grammar.json_schema({"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]})
    cs = [Constraint(tok, g, {0}) for _ in range(3)]
    mask_logits(torch.randn(4, V), [0, 2, 3], cs)  # builds the matchers
    prefix = tok.encode('{"s": "to', add_special_tokens=False)
    for c in cs:
        for t in prefix:
            c.accept(t)
    logits = torch.randn(4, V)
    ref = logits.clone()
    mask_logits(logits, [0, 2, 3], cs)

    m = xgr.GrammarMatcher(compile_grammar(tok, g, V, {0}))
    for t in prefix:
        assert m.accept_token(t)
    bm = xgr.allocate_token_bitmask(1, V)
    m.fill_next_token_bitmask(bm, 0)
    grammar_ok = [(int(bm[0, i // 32]) >> (i % 32)) & 1 == 1 for i in range(V)]
    control = [i < tok.vocab_size and any(ord(ch) < 0x20 for ch in tok.decode([i])) for i in range(V)]
    expected = torch.tensor([a and not c for a, c in zip(grammar_ok, control)])
    assert 10 < int(expected.sum()) < V - 10  # inside a string: most tokens, not all
    for r in (0, 2, 3):
        assert torch.equal(torch.isfinite(logits[r]), expected)
        assert torch.equal(logits[r][expected], ref[r][expected])
    assert torch.equal(logits[1], ref[1])  # the unconstrained row
    whole = ref[[0, 2, 3]].clone()  # every row constrained: one masked fill for the batch
    mask_logits(whole, [0, 1, 2], cs)
    assert torch.equal(whole, logits[[0, 2, 3]])
    # the packed control-character ban, bit by bit
    words = _allowed_text_words(tok, V)
    assert [(int(words[i // 32]) >> (i % 32)) & 1 == 1 for i in range(V)] == [not c for c in control]
    assert sum(control) >= 3  # \t, \n and the other control bytes exist in this vocabulary
