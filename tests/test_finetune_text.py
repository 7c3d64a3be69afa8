"""`llmkit finetune` on plain text (continued pretraining) and pruning recovery through it
(`llmkit prune --recover-steps`): the reported validation loss against transformers' cross-entropy on the
same windows, zeros kept, and the recovered folder equal to a `llmkit finetune` run of the pruned one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_infer_fixtures import byte_level_bpe
from tokenizers import Tokenizer as RawTokenizer

from llmkit.cli import main
from llmkit.errors import ConfigError
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.tokenizer import Tokenizer
from llmkit.train.finetune import finetune

T = 32


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("textbase")
    Tokenizer(RawTokenizer.from_str(byte_level_bpe().to_str()), {"eos_token": "<|endoftext|>"}).save(folder)
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=RawTokenizer.from_str(byte_level_bpe().to_str()).get_vocab_size(),
                      n_layer=2, n_head=4, n_kv_head=4, n_embd=32, intermediate_size=64, block_size=64,
                      tie_embeddings=False)
    Transformer(cfg).save_pretrained(folder)
    return folder



def _hf_loss(folder, tokens: np.ndarray) -> float:
    """Mean next-token cross-entropy of transformers' model over the non-overlapping T-token windows."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    n = (len(tokens) - 1) // T
    x = torch.from_numpy(tokens[: n * T + 1].astype(np.int64))
    xs, ys = x[:-1].view(n, T), x[1:].view(n, T)
    with torch.no_grad():
        logits = hf(xs).logits
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1)))


def test_text_finetune_val_loss_is_transformers_causal_loss_on_every_token(base, text, tmp_path, capsys):
    out = tmp_path / "cpt"
    rc = main(["finetune", "--model", str(base), "--data", str(text), "--method", "full", "--max-steps", "10",
               "--max-seq-len", str(T), "--batch-size", "8", "--lr", "3e-3", "--num-threads", "1", "--no-progress",
               "--out", str(out)])
    assert rc == 0 and "done: step 10" in capsys.readouterr().out
    val = np.fromfile(out / "data" / "val.bin", dtype=np.uint16)  # the last 10% of the text, tokenized
    assert 0 < len(val) < len(np.fromfile(out / "data" / "train.bin", dtype=np.uint16)) / 5
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 10
    torch.testing.assert_close(last["val_loss"], _hf_loss(out, val), rtol=1e-4, atol=1e-4)  # every token counts
    assert _hf_loss(out, val) < _hf_loss(base, val) - 0.5  # it learned the text


def test_text_data_errors(base, text, tmp_path):
    with pytest.raises(ConfigError, match="one text file"):
        finetune(str(base), [str(text), str(text)], str(tmp_path / "x"), method="full", data_format="text")
    with pytest.raises(ConfigError, match="--packing"):
        finetune(str(base), str(text), str(tmp_path / "x"), method="full", packing=True)


def test_prune_recovery_is_llmkit_finetune_and_lowers_held_out_loss(base, text, tmp_path, capsys):
    common = ["--model", str(base), "--method", "wanda", "--sparsity", "0.6", "--calib", str(text),
              "--calib-samples", "4", "--calib-seq-len", str(T)]
    assert main(["prune", *common, "--out", str(tmp_path / "pruned")]) == 0
    assert main(["prune", *common, "--recover-steps", "12", "--recover-seq-len", str(T), "--recover-lr", "3e-3",
                 "--out", str(tmp_path / "rec")]) == 0
    assert "recovered 12 steps" in capsys.readouterr().out
    # the same run by hand: llmkit finetune --method full on the pruned folder, with --keep-zeros
    assert main(["finetune", "--model", str(tmp_path / "pruned"), "--data", str(text), "--method", "full",
                 "--max-steps", "12", "--max-seq-len", str(T), "--batch-size", "8", "--lr", "3e-3",
                 "--warmup-steps", "1", "--eval-interval", "12", "--keep-zeros", "--no-progress",
                 "--out", str(tmp_path / "by-hand")]) == 0
    rec, hand = load_file(tmp_path / "rec" / "model.safetensors"), load_file(tmp_path / "by-hand" / "model.safetensors")
    pruned = load_file(tmp_path / "pruned" / "model.safetensors")
    assert rec.keys() == hand.keys()
    for k in rec:
        torch.testing.assert_close(rec[k], hand[k], rtol=0, atol=0)
        if k.endswith("proj.weight") and ".layers." in k:  # the block projections: the zeros held
            assert torch.equal(rec[k] == 0, pruned[k] == 0) and float((pruned[k] == 0).float().mean()) > 0.55
    val = np.fromfile(tmp_path / "rec" / "data" / "val.bin", dtype=np.uint16)
    assert _hf_loss(tmp_path / "rec", val) < _hf_loss(tmp_path / "pruned", val) - 0.3
