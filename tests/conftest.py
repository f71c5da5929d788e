"""Shared fixtures. Every test runs with a temporary qwenkit cache, so the user's own cache is never
read or written by tests. Tokenizer fixtures (`tok_` prefix): one built-in Qwen2.5 tokenizer per
session."""

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def qwenkit_cache(tmp_path_factory):
    """A temporary QWENKIT_CACHE for the whole session (subprocesses inherit it)."""
    before = os.environ.get("QWENKIT_CACHE")
    os.environ["QWENKIT_CACHE"] = str(tmp_path_factory.mktemp("qwenkit-cache"))
    yield Path(os.environ["QWENKIT_CACHE"])
    if before is None:
        del os.environ["QWENKIT_CACHE"]
    else:
        os.environ["QWENKIT_CACHE"] = before


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models gain nothing from threads, and on a shared
    machine OpenMP's barriers cost about 10 ms per op."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tok_qwen(qwenkit_cache):
    """The built-in Qwen2.5 tokenizer, built once for the session."""
    from qwenkit import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tok_saved_dir(tok_qwen, tmp_path_factory):
    """A folder written by the built-in tokenizer's `save_pretrained`."""
    path = tmp_path_factory.mktemp("saved-tokenizer")
    tok_qwen.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tok_hf(tok_saved_dir):
    """transformers' tokenizer, loaded from the files qwenkit saved."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_saved_dir)


@pytest.fixture(scope="session")
def tok_official_template():
    """Qwen2.5-7B-Instruct's chat template, from the tests' fixtures (see fixtures/README.md)."""
    return (FIXTURES / "qwen2_5_instruct_chat_template.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def default_model_dir(qwenkit_cache):
    """The default model (SmolLM2-135M-Instruct), fetched and converted once into the session cache."""
    from qwenkit.hub import resolve_model

    return resolve_model(None)
