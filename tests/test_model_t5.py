"""T5 / mT5 against random-initialised `transformers` references: logits (padded batches), save ->
transformers load, greedy generation == HF `generate`, the T5 SentencePiece/Unigram tokenizer ids."""

import subprocess
import sys

import pytest
import torch
import transformers as T
from tokenizers import SentencePieceUnigramTokenizer

import llmkit
from llmkit.errors import InputError
from llmkit.model.t5 import T5Model
from llmkit.tokenizer import load_tokenizer

V = 80
_CFG = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=20, decoder_start_token_id=0, dropout_rate=0.0, eos_token_id=None)
CASES = {
    "t5": (T.T5Config, dict(_CFG, feed_forward_proj="relu", num_decoder_layers=3)),  # tied head, scaled output
    "mt5": (T.MT5Config, dict(_CFG, feed_forward_proj="gated-gelu")),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    C, kw = CASES[request.param]
    torch.manual_seed(0)
    ref = T.AutoModelForSeq2SeqLM.from_config(C(**kw)).eval()
    ref.generation_config.eos_token_id = None
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, llmkit.load_model(path)


def test_logits_match_with_padding(pair, tmp_path):
    ref, model = pair
    assert isinstance(model, T5Model)
    ids = torch.randint(2, V, (2, 30))  # 30 > max_distance 20: the log-spaced buckets are used
    dec = torch.randint(2, V, (2, 25))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0  # right padding of the encoder input
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        b = model(ids, decoder_input_ids=dec, attention_mask=mask)
    assert b.shape == (2, 25, V)
    assert (a - b).abs().max().item() <= 1e-4

    model.save_pretrained(tmp_path / "out")  # and back into transformers
    back = T.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits - b).abs().max() <= 1e-4
    with pytest.raises(InputError, match="decoder_input_ids"):
        model(ids)


def test_greedy_generate_matches_transformers_batched(pair):
    ref, model = pair
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], list(range(20, 50))]
    # transformers' own cache assumes num_decoder_layers == num_layers; without it, it recomputes
    kw = dict(max_new_tokens=10, do_sample=False, use_cache=ref.config.num_decoder_layers == ref.config.num_layers)
    want = [ref.generate(torch.tensor([p]), **kw)[0, 1:].tolist() for p in prompts]
    assert llmkit.generate(model, prompts, max_new_tokens=10) == want  # one left-padded batch
    assert llmkit.generate(model, prompts[1], max_new_tokens=10, use_cache=False) == want[1]


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    """A T5 folder with a SentencePiece Unigram tokenizer: (hf model, hf tokenizer, folder, our tokenizer)."""
    tmp_path = tmp_path_factory.mktemp("t5text")
    text = open("../shared/data/tinyshakespeare/input.txt").read()[:60000]
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(text.split("\n"), vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"],
                           unk_token="<unk>")
    sp.save(str(tmp_path / "raw.json"))
    T.T5TokenizerFast(tokenizer_file=str(tmp_path / "raw.json"), extra_ids=8).save_pretrained(tmp_path / "tok")
    hf = T.AutoTokenizer.from_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    ref = T.T5ForConditionalGeneration(T.T5Config(**dict(_CFG, vocab_size=len(hf), eos_token_id=1))).eval()
    ref.save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    return ref, hf, tmp_path / "model", tok


def test_t5_tokenizer_ids_match_transformers_and_text_to_text_generation(text_pair, tmp_path):
    ref, hf, folder, tok = text_pair
    for s in ["translate English to German: The house is wonderful.", "  Hello <extra_id_0>  world</s> x",
              "First Citizen:\nBefore we proceed any further, hear me speak."]:
        ids = hf(s)["input_ids"]
        assert tok.encode(s) == ids
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert (tok.vocab_size, tok.eos_token_id, tok.pad_token_id) == (len(hf), hf.eos_token_id, hf.pad_token_id)

    model = llmkit.load_model(folder)
    prompt = "translate English to German: The house is wonderful."
    want = ref.generate(**hf(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False)[0]
    got = llmkit.generate_text(model, tok, prompt, max_new_tokens=8)
    assert got == hf.decode(want, skip_special_tokens=True)
    out = subprocess.run([sys.executable, "-m", "llmkit", "generate", "--model", str(folder), "--prompt",
                          prompt, "--max-new-tokens", "8", "--temperature", "0"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == got.strip()


def test_engine_greedy_matches_transformers_alone_batched_and_preempted(pair):
    """The continuous-batching engine runs the encoder when a request is first scheduled and decodes
    every row against its own encoder output: alone, batched (prompts of different lengths) and with
    a KV pool so small that rows are preempted and recomputed."""
    from llmkit.infer.engine import Engine
    from llmkit.infer.sampling import SamplingParams

    ref, model = pair
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], list(range(20, 50)), [40, 41]]
    n_new = [10, 7, 10, 9]
    kw = dict(do_sample=False, use_cache=ref.config.num_decoder_layers == ref.config.num_layers)
    want = [ref.generate(torch.tensor([p]), max_new_tokens=n, **kw)[0, 1:].tolist() for p, n in zip(prompts, n_new)]
    for opts in (dict(max_batch_size=1), dict(max_batch_size=4, kv_block_size=4),
                 dict(max_batch_size=4, kv_block_size=2, num_blocks=12)):
        with Engine(model, **opts) as engine:
            hs = [engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0.0)) for p, n in zip(prompts, n_new)]
            assert [h.result().token_ids for h in hs] == want, opts
            stats = engine.stats()
        if "num_blocks" in opts:
            assert stats["preemptions"] > 0
    with Engine(model) as engine, pytest.raises(InputError, match="encoder-decoder"):
        engine.prompt_logprobs([5, 6, 7])


def test_serve_text_to_text_completions_match_transformers(text_pair):
    """`llmkit serve` on a T5 folder: concurrent /v1/completions requests of different lengths (one
    continuous batch) answer transformers' greedy text; chat needs a chat template (T5 has none)."""
    import concurrent.futures

    import openai
    from test_serve_fixtures import running_server

    ref, hf, folder, _ = text_pair
    prompts = ["translate English to German: The house is wonderful.", "summarize: First Citizen",
               "translate English to French: Before we proceed any further, hear me speak.", "cola sentence: x"]
    n_new = [8, 5, 8, 6]
    want = [hf.decode(ref.generate(**hf(p, return_tensors="pt"), max_new_tokens=n, do_sample=False)[0],
                      skip_special_tokens=True) for p, n in zip(prompts, n_new)]
    with running_server(folder, max_batch_size=4) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)

        def complete(i: int) -> str:
            r = client.completions.create(model="model", prompt=prompts[i], max_tokens=n_new[i], temperature=0)
            return r.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(complete, range(4)))
        assert got == want
        stream = client.completions.create(model="model", prompt=prompts[0], max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == want[0]
        with pytest.raises(openai.BadRequestError, match="chat_template"):
            client.chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}])


def test_finetune_full_encoder_decoder_matches_transformers_loss(text_pair, tmp_path):
    """`llmkit finetune --method full` on a T5 folder: prompt -> encoder, completion + EOS -> decoder
    targets. The batch loss equals transformers' `labels=` loss; a short run lowers the held-out loss,
    the folder loads in transformers, and resume is exact."""
    import json

    from llmkit.data.sft import Seq2SeqExample, collate, load_sft_data
    from llmkit.train.finetune import finetune, sft_forward
    from llmkit.train.trainer import lm_loss

    ref, hf, folder, tok = text_pair
    rows = [{"prompt": f"reverse: {a} {b}", "completion": f"{b} {a}"}
            for a in ("king", "queen", "lord", "love") for b in ("good", "night", "heart", "old")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[12:]))

    ds = load_sft_data(tmp_path / "train.jsonl", tok, 64, seq2seq=True)
    ex = ds.examples[0]
    assert isinstance(ex, Seq2SeqExample)
    assert ex.input_ids == hf(rows[0]["prompt"])["input_ids"]
    assert ex.labels == hf(text_target=rows[0]["completion"])["input_ids"]  # ends with </s>
    b = collate(ds.examples[:5], tok.pad_token_id)
    y = b.pop("targets")
    model = llmkit.load_model(folder)
    with torch.no_grad():
        ours = lm_loss(sft_forward(model, b, y), y)
        want = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=y).loss
    assert abs(ours.item() - want.item()) < 1e-4

    kw = dict(method="full", val_data=str(tmp_path / "val.jsonl"), max_steps=6, lr=3e-3, batch_size=4,
              eval_interval=3, progress=False)
    vb = collate(load_sft_data(tmp_path / "val.jsonl", tok, 64, seq2seq=True).examples, tok.pad_token_id)
    vy = vb.pop("targets")
    with torch.no_grad():
        base_val = lm_loss(sft_forward(model, vb, vy), vy).item()
    r = finetune(str(folder), str(tmp_path / "train.jsonl"), str(tmp_path / "a"), **kw)
    assert r.val_loss < base_val - 0.5
    back = T.T5ForConditionalGeneration.from_pretrained(tmp_path / "a").eval()
    ids = torch.tensor([hf(rows[12]["prompt"])["input_ids"]])
    assert back.generate(ids, max_new_tokens=4, do_sample=False)[0, 1:].tolist() == \
        llmkit.generate(llmkit.load_model(tmp_path / "a"), ids[0].tolist(), max_new_tokens=4)
    finetune(str(folder), str(tmp_path / "train.jsonl"), str(tmp_path / "b"), stop_after=3, **kw)
    resumed = finetune(str(folder), str(tmp_path / "train.jsonl"), str(tmp_path / "b"), resume=True, **kw)
    assert resumed.val_loss == pytest.approx(r.val_loss, abs=1e-6)
    with pytest.raises(llmkit.errors.ConfigError, match="encoder-decoder"):
        finetune(str(folder), str(tmp_path / "train.jsonl"), str(tmp_path / "c"), method="lora", max_steps=1)
