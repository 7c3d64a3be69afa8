"""Multi-LoRA serving: requests for different adapters (LoRA and a prompt-tuning soft prompt) and the
base share one continuous batch, and each one's greedy output equals peft's on the same adapter."""

from __future__ import annotations

import openai
import pytest
import torch
from test_serve_fixtures import build_tiny_llama, running_server

from llmkit.infer.sampling import SamplingParams
from llmkit.serve import load_state

PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 7]]
NEW = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama and two peft-written LoRA adapters (random, so each changes the greedy output)."""
    import peft
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("serve_lora")
    base = build_tiny_llama(root / "tiny")
    adapters = {}
    for name, seed, targets in (("a", 1, ["q_proj", "v_proj", "down_proj"]), ("b", 2, "all-linear")):
        torch.manual_seed(seed)
        hf = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        pm = peft.get_peft_model(hf, cfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.normal_(0.0, 0.3)
        pm.save_pretrained(root / name)
        adapters[name] = root / name
    torch.manual_seed(3)  # a soft prompt of 4 virtual tokens (peft's random init)
    hf = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        root / "p")
    adapters["p"] = root / "p"
    return base, adapters


def peft_greedy(base, adapter, prompts: list[list[int]]) -> list[list[int]]:
    """The independent reference: greedy tokens from transformers (+ peft with `adapter`)."""
    import peft
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            out = list(ids)
            for _ in range(NEW):
                out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
            outs.append(out[len(ids) :])
    return outs


@pytest.fixture(scope="module")
def want(setup):
    base, adapters = setup
    return {name: peft_greedy(base, adapters.get(name), PROMPTS) for name in (None, "a", "b", "p")}


def test_one_batch_mixes_adapters_and_matches_peft(setup, want):
    base, adapters = setup
    state = load_state(base, lora={k: str(v) for k, v in adapters.items()}, max_batch_size=8)
    eng = state.engine
    jobs = [(p, name) for name in (None, "a", "b", "p") for p in PROMPTS]
    params = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
    handles = [eng.submit(p, params, adapter=name) for p, name in jobs]  # queued before the engine starts
    eng.start()
    try:
        got = [h.result().token_ids for h in handles]
    finally:
        eng.shutdown()
    # every request ran in the same batch: one forward prefills every prompt (and samples the first
    # token), then one decode step per further token
    assert eng.counters["steps"] == NEW
    assert want[None] != want["a"] != want["b"] != want["p"] != want[None]  # the adapters change the output
    for (p, name), g in zip(jobs, got):
        assert g == want[name][PROMPTS.index(p)], name


def test_adapters_joining_mid_stream_and_sharing_a_prompt_match_peft(setup, want):
    base, adapters = setup
    state = load_state(base, lora={k: str(v) for k, v in adapters.items()}, max_batch_size=8,
                       engine_options={"kv_block_size": 4})
    eng = state.engine.start()
    params = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
    try:
        first = eng.submit(PROMPTS[0], params, adapter="a")
        it = iter(first)
        head = [next(it).token_id]
        # the same prompt through the base and "b" while "a" decodes: their prefill rows share packed
        # steps with its decode row (per-token adapter routing), and the prefix cache is keyed by adapter
        others = {name: eng.submit(PROMPTS[0], params, adapter=name) for name in (None, "b")}
        head += [ev.token_id for ev in it]
        got = {name: h.result().token_ids for name, h in others.items()}
        again = eng.submit(PROMPTS[0], params, adapter="a").result().token_ids  # hits "a"'s cached block
        hits = eng.stats()["prefix_cache_hits"]
    finally:
        eng.shutdown()
    assert head == want["a"][0] and again == want["a"][0]
    assert got[None] == want[None][0] and got["b"] == want["b"][0]
    assert hits == 4  # one full block of 4, for the same adapter only


def test_openai_client_picks_the_adapter_by_model_name(setup, want):
    base, adapters = setup
    with running_server(base, lora={"a": str(adapters["a"])}) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        ids = [m.id for m in client.models.list().data]
        assert ids == ["tiny", "a"]
        tok = srv.state.tokenizer
        for name, key in (("a", "a"), ("tiny", None)):
            r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
            assert r.model == name
            assert r.choices[0].text == tok.decode(want[key][0])
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="c", prompt=PROMPTS[0], max_tokens=2)
