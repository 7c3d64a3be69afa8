"""Shared test set-up: quiet transformers, deterministic seeds, few threads."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A small plain-text file (Hamlet's lines, repeated): pretraining-style data for short runs."""
    f = tmp_path_factory.mktemp("text") / "play.txt"
    f.write_text("To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer "
                 "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. " * 30)
    return f
