"""Greedy generation matches transformers token for token (Llama, Qwen2, Mistral+window, Mixtral, GPT-2),
batched and unbatched, with and without the KV cache; stopping and context-length errors."""

from __future__ import annotations

import pytest
import torch
from test_infer_fixtures import hf_checkpoint

import llmkit
from llmkit.errors import InputError
from llmkit.infer.generate import generate

PROMPTS = [[5, 17, 33, 2, 99, 100, 7, 8, 9], [40, 41], [200, 3, 3, 90]]
N_NEW = 16


def _hf_greedy(hf, prompts, n):
    """transformers generate with left padding (one batch) and one prompt at a time."""
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, L:].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "mixtral", "gpt2"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = hf_checkpoint(request.param, folder)
    return hf, llmkit.load_model(folder)


def test_greedy_matches_transformers(pair):
    hf, ours = pair
    ref = _hf_greedy(hf, PROMPTS, N_NEW)
    assert len({tuple(r) for r in ref}) == len(ref) and len(set(ref[0])) > 3  # a non-degenerate reference
    batched = generate(ours, PROMPTS, N_NEW)  # greedy by default
    assert batched == ref
    for p, r in zip(PROMPTS, ref):
        assert generate(ours, p, N_NEW, temperature=0) == r  # alone == in a batch
    assert generate(ours, PROMPTS, N_NEW, temperature=0, fast=False) == ref  # the model's own forward
    assert generate(ours, PROMPTS, N_NEW, temperature=0, use_cache=False) == ref
    # rows that repeat a prompt: each distinct prompt is prefilled once, its keys/values fanned out to its rows
    rows: list[int] = []
    hook = ours.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    assert generate(ours, PROMPTS + PROMPTS[::-1], N_NEW) == ref + ref[::-1]
    hook.remove()
    assert rows[0] == len(PROMPTS) and rows[1:] == [2 * len(PROMPTS)] * (N_NEW - 1)


def test_single_prompt_matches_transformers_unpadded(pair):
    hf, ours = pair
    p = PROMPTS[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([p]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    assert generate(ours, p, N_NEW, temperature=0) == ref[0, len(p) :].tolist()


def test_eos_and_stop_token_ids(tmp_path):
    hf_checkpoint("llama", tmp_path)
    model = llmkit.load_model(tmp_path)
    free = generate(model, PROMPTS[0], 12, temperature=0)
    stop_at = free[5]
    first = free.index(stop_at)
    # stop id: the stop token is dropped and nothing after it is produced
    assert generate(model, PROMPTS[0], 12, temperature=0, stop_token_ids=[stop_at]) == free[: first + 1]
    # eos from the caller, and ignore_eos
    assert generate(model, PROMPTS[0], 12, temperature=0, eos_token_ids=[stop_at]) == free[: first + 1]
    assert generate(model, PROMPTS[0], 12, temperature=0, eos_token_ids=[stop_at], ignore_eos=True) == free
    # eos from the model config (as load_model reads it)
    model.config.eos_token_id = stop_at
    assert generate(model, PROMPTS[0], 12, temperature=0) == free[: first + 1]
    # in a batch, a finished row stops while the others go on
    out = generate(model, [PROMPTS[0], PROMPTS[1]], 12, temperature=0)
    assert out[0] == free[: first + 1]
    assert out[1] == generate(model, PROMPTS[1], 12, temperature=0)


def test_seeded_sampling_reproducible_and_batch_independent(tmp_path):
    hf_checkpoint("qwen2", tmp_path)
    model = llmkit.load_model(tmp_path)
    kw = dict(temperature=1.0, top_p=0.95, seed=123)
    a = generate(model, PROMPTS[2], 12, **kw)
    assert a == generate(model, PROMPTS[2], 12, **kw)
    assert a != generate(model, PROMPTS[2], 12, temperature=1.0, top_p=0.95, seed=124)
    assert generate(model, PROMPTS, 12, **kw)[2] == a  # same seed, batched with others


def test_bad_inputs_raise_input_error(tmp_path):
    hf_checkpoint("llama", tmp_path)
    model = llmkit.load_model(tmp_path)
    with pytest.raises(InputError, match="context length of 128"):
        generate(model, [1] * 100, 40)
    with pytest.raises(InputError, match="outside"):
        generate(model, [1, 999], 4)
    with pytest.raises(InputError, match="empty"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(InputError, match="temperature"):
        generate(model, [1, 2], 4, temperature=-1)
    with pytest.raises(InputError, match="stop strings need a tokenizer"):
        generate(model, [1, 2], 4, stop=["x"])
    with pytest.raises(InputError, match="unknown sampling"):
        generate(model, [1, 2], 4, temprature=0.5)


def test_fast_path_follows_weight_updates():
    """The decode fast path keeps packed copies of the weights; they must follow in-place updates."""
    torch.manual_seed(0)
    model = llmkit.Transformer(llmkit.ModelConfig.from_preset("tiny", initializer_range=0.3)).eval()
    before = generate(model, [1, 2, 3], 10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # e.g. an optimizer step between two samples
    after = generate(model, [1, 2, 3], 10)
    assert after == generate(model, [1, 2, 3], 10, fast=False)
    assert after != before


def test_model_copies_and_pickles_after_generate(tmp_path):
    """generate() packs Linears for decode (oneDNN's opaque tensors); deepcopy, pickling and the copies'
    outputs still work, and the copy's packed weights are its own (an update to it leaves the original)."""
    import copy

    torch.manual_seed(0)
    model = llmkit.Transformer(llmkit.ModelConfig.from_preset("tiny", initializer_range=0.3)).eval()
    for prompt in ([1, 2, 3], [[1, 2, 3], [4, 5, 6]]):  # batch 1 and batch 2 make both kinds of copies
        generate(model, prompt, 6)
    twin = copy.deepcopy(model)
    assert generate(twin, [1, 2, 3], 10) == generate(model, [1, 2, 3], 10)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert generate(loaded, [1, 2, 3], 10) == generate(model, [1, 2, 3], 10)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    assert generate(twin, [1, 2, 3], 10) == generate(twin, [1, 2, 3], 10, fast=False)
    assert generate(model, [1, 2, 3], 10) == generate(model, [1, 2, 3], 10, fast=False)


def test_generate_returns_logprobs_of_a_plain_forward():
    """return_logprobs: chosen and top-N log-probs equal log_softmax of one forward over prompt + output."""
    import llmkit

    cfg = llmkit.ModelConfig(model_type="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             block_size=64)
    model = llmkit.Transformer(cfg).eval()
    prompt = [3, 9, 27, 5]
    out = llmkit.generate(model, prompt, max_new_tokens=6, temperature=0.7, seed=1, logprobs=3,
                          return_logprobs=True)
    assert out.token_ids == llmkit.generate(model, prompt, max_new_tokens=6, temperature=0.7, seed=1, logprobs=3)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt + out.token_ids]))[0].float(), -1)
    for j, t in enumerate(out.token_ids):
        row = ref[len(prompt) - 1 + j]
        assert out.logprobs[j] == pytest.approx(row[t].item(), abs=1e-4)
        top = row.topk(3)
        assert [i for i, _ in out.top_logprobs[j]] == top.indices.tolist()
        assert [v for _, v in out.top_logprobs[j]] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_logprobs_are_computed_only_for_consumers_that_ask():
    """Without return_logprobs / params.logprobs the step skips the log-sum-exp: events carry None and the
    tokens are unchanged; asking (return_logprobs, or logprobs=0 on a row) gives the exact values."""
    import llmkit
    from llmkit.infer.generate import Generator
    from llmkit.infer.sampling import SamplingParams

    cfg = llmkit.ModelConfig(model_type="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             block_size=64)
    model = llmkit.Transformer(cfg).eval()
    prompts = [[3, 9, 27, 5], [7, 1]]
    params = [SamplingParams(max_new_tokens=5, temperature=0.0), SamplingParams(max_new_tokens=5, temperature=0.0,
                                                                               logprobs=0)]
    steps = list(Generator(model, prompts, params, set(), return_logprobs=False))
    assert all(ev.logprob is None for ev, _ in steps)  # row 0 asked for nothing
    full = llmkit.generate(model, prompts, 5, return_logprobs=True)
    assert [[ev.token_id for ev, _ in steps], [ev.token_id for _, ev in steps]] == [g.token_ids for g in full]
    with torch.no_grad():
        for r, p in enumerate(prompts):
            ref = torch.log_softmax(model(torch.tensor([p + full[r].token_ids]))[0].float(), -1)
            want = [ref[len(p) - 1 + j, t].item() for j, t in enumerate(full[r].token_ids)]
            assert full[r].logprobs == pytest.approx(want, abs=1e-4)
            if r == 1:  # params.logprobs=0: the chosen token's log-prob, no alternatives
                assert [ev.logprob for _, ev in steps] == pytest.approx(want, abs=1e-4)
                assert all(ev.top_logprobs is None for _, ev in steps)
