"""GGUF import: files written here with the gguf package's own writer, the way llama.cpp's converter
writes them (its tensor names from `gguf.get_tensor_name_map`, its q/k permutation for llama, its
token types), then imported with `qwenkit.gguf.convert_gguf` and checked against the model they came
from, against transformers' GGUF loader, and against transformers' independent dequantizer.

The files are written by tests/gguf_files.py, which test_default_model.py shares.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf  # the `gguf` extra, part of the dev set-up
import numpy as np
import pytest
import torch
from gguf_files import CORPUS, Q, llamacpp_permute, qwen_vocab, tiny_vocab, write_gguf
from reference import random_model, tiny_config
from safetensors.torch import load_file

import qwenkit
from qwenkit.gguf import GGUFError, convert_gguf, is_gguf


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def no_leftovers(folder: Path) -> list[str]:
    """Temporary siblings a failed conversion might have left."""
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------------------------
# A tiny Qwen2 model with the real Qwen2.5 tokenizer, in F32 and in Q8_0


@pytest.fixture(scope="session")
def qwen_files(tmp_path_factory, tok_saved_dir):
    """(original model, {qtype name: (gguf file, converted folder)}), written and converted once."""
    root = tmp_path_factory.mktemp("gguf-qwen")
    model = random_model(tiny_config(vocab_size=151936), seed=3)
    vocab = qwen_vocab(tok_saved_dir)
    files = {}
    for qtype in (Q.F32, Q.Q8_0):
        gguf_file = write_gguf(root / f"tiny-{qtype.name}.gguf", model, vocab, qtype)
        files[qtype.name] = (gguf_file, convert_gguf(gguf_file, root / f"hf-{qtype.name}"))
    return model, files


IDS = torch.randint(0, 151643, (2, 17), generator=torch.Generator().manual_seed(0))


def test_f32_gguf_imports_back_with_equal_logits(qwen_files):
    model, files = qwen_files
    _, folder = files["F32"]
    imported = qwenkit.load_model(folder)
    assert (logits(imported, IDS) - logits(model, IDS)).abs().max() <= 1e-4

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 1e6  # not float32's 9.99999997e-07
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")  # tied: none saved
    # Both Qwen2.5 stop tokens, <|im_end|> from the file's eos id and <|endoftext|> as llama.cpp adds it.
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}


def test_q8_0_gguf_imports_back_within_the_format_error(qwen_files):
    model, files = qwen_files
    _, folder = files["Q8_0"]
    imported = qwenkit.load_model(folder)
    original = dict(model.named_parameters())
    for name, p in imported.named_parameters():
        ref = original[name].detach()
        if ref.ndim == 1:  # norms and biases stay F32
            assert torch.equal(p, ref), name
            continue
        # Q8_0: blocks of 32 with one fp16 scale d = amax/127, values round(x/d): each weight is off
        # by at most d/2, plus 127 * d's fp16 rounding (2^-11 relative).
        blocks = ref.reshape(-1, 32)
        bound = blocks.abs().amax(-1, keepdim=True) * (0.5 / 127 + 2**-11) * 1.001 + 1e-12
        assert ((p.detach().reshape(-1, 32) - blocks).abs() <= bound).all(), name
    # What that does to the logits: measured 1.0e-2 against a largest logit of 0.97 for this seed.
    # The bound only has to catch a misread file (blocks out of order, a wrong scale), which is off
    # by the size of the logits themselves.
    got, want = logits(imported, IDS), logits(model, IDS)
    err = (got - want).abs().max().item()
    assert err <= 0.02 * want.abs().max().item(), err
    print(f"\nQ8_0 round trip: max |logit diff| {err:.2e}, max |logit| {want.abs().max().item():.3f}")


def test_tokenizer_equals_transformers_gguf_tokenizer(qwen_files, tok_qwen):
    from transformers import AutoTokenizer

    _, files = qwen_files
    gguf_file, folder = files["F32"]
    ours = qwenkit.load_tokenizer(folder)
    theirs = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    reloaded = AutoTokenizer.from_pretrained(folder)  # transformers reads our folder unchanged
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ids == reloaded.encode(text, add_special_tokens=False), text
        assert ids == tok_qwen.encode(text), text  # and the tokenizer the file was made from
        assert ours.decode(ids) == theirs.decode(ids) == text
    assert len(ours) == len(theirs) == 151936  # every row of the embedding has a token ([PADn] past 151665)
    assert (ours.eos_token, ours.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert "<tool_call>" not in ours.all_special_tokens and "<|im_end|>" in ours.all_special_tokens
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    ) == tok_qwen.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # Qwen2's own tokenizer normalizes to NFC; transformers' GGUF loader leaves that out, so text
    # in decomposed form is where the two differ, and the original tokenizer is the reference.
    decomposed = "cafe\u0301 n\u0303"
    assert ours.encode(decomposed) == tok_qwen.encode(decomposed)


# ----------------------------------------------------------------------------------------------
# Both architectures against the original model and transformers' GGUF loader; llama's q/k permutation


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_gguf_reads_like_transformers_gguf_loader(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    # A small vocabulary: transformers parses a GGUF's token list value by value, 16 s for Qwen's.
    changes = {}
    if arch == "llama":
        changes = dict(model_type="llama", attention_bias=False, rope_theta=10000.0, rms_norm_eps=1e-5)
    model = random_model(tiny_config(tie_word_embeddings=False, **changes), seed=5)
    gguf_file = write_gguf(tmp_path / f"{arch}.gguf", model, tiny_vocab())
    folder = convert_gguf(gguf_file, tmp_path / "hf")
    imported = qwenkit.load_model(folder)
    ids = IDS % 512
    assert (logits(imported, ids) - logits(model, ids)).abs().max() <= 1e-4
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name, dtype=torch.float32)
    assert (logits(imported, ids) - logits(hf, ids)).abs().max() <= 1e-4
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == arch and saved["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(folder / "model.safetensors")
    if arch == "llama":
        assert saved["attention_bias"] is False and saved["rms_norm_eps"] == 1e-5
        # The file's q rows really are permuted: read as stored, they would differ.
        stored = torch.from_numpy(
            llamacpp_permute(model.model.layers[0].self_attn.q_proj.weight.detach().numpy(), 4, 4)
        )
        assert not torch.equal(stored, imported.model.layers[0].self_attn.q_proj.weight)


def test_split_gguf_is_read_from_all_its_parts(tmp_path):
    model = random_model(tiny_config(tie_word_embeddings=False), seed=4)
    first = write_gguf(tmp_path / "m.gguf", model, tiny_vocab(), split_max_tensors=8)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert first.name == "m-00001-of-00004.gguf" and len(parts) == 4
    imported = qwenkit.load_model(convert_gguf(first, tmp_path / "hf"))
    ids = IDS % 512
    assert (logits(imported, ids) - logits(model, ids)).abs().max() <= 1e-4
    with pytest.raises(GGUFError, match="pass the first one"):
        convert_gguf(parts[1], tmp_path / "a")
    parts[3].unlink()
    with pytest.raises(GGUFError, match="m-00004-of-00004.gguf: no such file"):
        convert_gguf(first, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------------
# Every required tensor type, against transformers' own dequantizer (a separate implementation)

QUANTIZED = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, *QUANTIZED], ids=lambda q: q.name)
def test_each_tensor_type_dequantizes_like_transformers(tmp_path, qtype):
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    # Rows of 256 values, so that K-quant super-blocks fit.
    config = tiny_config(
        hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
    )
    model = random_model(config, seed=7)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 1)
    rng = np.random.default_rng(0)
    raw, expected = {}, {}
    for hf_name, p in model.named_parameters():
        if p.ndim != 2:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        values = p.detach().float().numpy()
        if qtype in QUANTIZED:
            # Random blocks; bytes below 0x40 keep every fp16 scale finite (exponent < 31).
            block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            blob = rng.integers(
                0, 0x40, size=(values.shape[0], values.shape[1] // block_elems * block_bytes), dtype=np.uint8
            )
            want = hf_dequantize(torch.from_numpy(blob.reshape(-1)), int(qtype)).reshape(values.shape)
        elif qtype == Q.F32:
            blob, want = values, torch.from_numpy(values)
        else:
            blob = gguf.quants.quantize(values, qtype)
            torch_dtype = torch.float16 if qtype == Q.F16 else torch.bfloat16
            want = torch.from_numpy(values).to(torch_dtype).float()
        raw[name] = (blob if blob.dtype == np.uint8 else blob.view(np.uint8), qtype)
        expected[hf_name] = want
    gguf_file = write_gguf(tmp_path / "m.gguf", model, tiny_vocab(), raw=raw)
    saved = load_file(convert_gguf(gguf_file, tmp_path / "hf") / "model.safetensors")
    for hf_name, want in expected.items():
        assert torch.isfinite(want).all()
        assert torch.equal(saved[hf_name], want), hf_name


def test_bfloat16_output(tmp_path):
    model = random_model(tiny_config(), seed=1)
    gguf_file = write_gguf(tmp_path / "m.gguf", model, tiny_vocab())
    folder = convert_gguf(gguf_file, tmp_path / "hf", dtype="bfloat16")
    saved = load_file(folder / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert torch.equal(saved["model.embed_tokens.weight"], model.model.embed_tokens.weight.detach().bfloat16())


# ----------------------------------------------------------------------------------------------
# Errors: clear, naming the file, and nothing left behind


@pytest.fixture()
def small_gguf(tmp_path):
    return write_gguf(tmp_path / "small.gguf", random_model(tiny_config(), seed=2), tiny_vocab())


@pytest.mark.parametrize("keep", [0, 3, 100, 0.5, -1], ids=["empty", "3-bytes", "in-metadata", "half", "1-short"])
def test_truncated_gguf_is_a_clear_error(tmp_path, small_gguf, keep):
    data = small_gguf.read_bytes()
    n = len(data) + keep if keep < 0 else int(len(data) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[:n])
    out = tmp_path / "out" / "model"
    with pytest.raises(GGUFError, match=str(bad)) as e:
        convert_gguf(bad, out)
    assert "truncated" in str(e.value)
    assert not out.exists() and (not out.parent.exists() or no_leftovers(out.parent) == [])


def test_unsupported_tensor_type_names_the_type_and_tensor(tmp_path):
    model = random_model(tiny_config(), seed=2)
    as_int = model.model.layers[0].mlp.up_proj.weight.detach().numpy().astype(np.int32)
    gguf_file = write_gguf(tmp_path / "i32.gguf", model, tiny_vocab(), raw={"blk.0.ffn_up.weight": (as_int, None)})
    with pytest.raises(GGUFError, match=r"'blk\.0\.ffn_up\.weight' is stored as I32"):
        convert_gguf(gguf_file, tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_other_inputs_are_clear_errors(tmp_path, small_gguf):
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        convert_gguf(tmp_path / "not.gguf", tmp_path / "a")
    with pytest.raises(GGUFError, match="no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "b")
    with pytest.raises(GGUFError, match="dtype"):
        convert_gguf(small_gguf, tmp_path / "c", dtype="float16")

    vocab = dict(tiny_vocab(), pre="tekken")
    with pytest.raises(GGUFError, match="tokenizer.ggml.pre is 'tekken'"):
        convert_gguf(write_gguf(tmp_path / "pre.gguf", random_model(tiny_config()), vocab), tmp_path / "d")

    w = gguf.GGUFWriter(str(tmp_path / "gemma.gguf"), "gemma2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFError, match="architecture 'gemma2'"):
        convert_gguf(tmp_path / "gemma.gguf", tmp_path / "e")
    assert not any((tmp_path / x).exists() for x in "abcde") and no_leftovers(tmp_path) == []


def test_existing_output_folder_is_kept_unless_overwrite(tmp_path, small_gguf):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GGUFError, match="already exists"):
        convert_gguf(small_gguf, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert_gguf(small_gguf, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert no_leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert_gguf(small_gguf, empty) == empty and (empty / "tokenizer.json").exists()


def test_a_gguf_is_named_by_its_suffix_in_any_case(tmp_path):
    (tmp_path / "folder.gguf").mkdir()
    assert is_gguf(tmp_path / "m.gguf") and is_gguf(tmp_path / "M.GGUF") and is_gguf("hub/model.Gguf")
    assert not is_gguf(tmp_path / "folder.gguf") and not is_gguf(tmp_path / "model")
