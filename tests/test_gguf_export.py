"""GGUF export (`qwenkit.gguf_export.write_gguf`, `qwenkit quantize`): the file's tensor types and
their error against the checkpoint, the inverse of qwenkit/gguf.py's reading (config, tokenizer,
chat template, generation defaults, logits) for a Qwen2 folder with the real Qwen2.5 tokenizer and
a Llama folder with a SmolLM-style tokenizer, errors that leave nothing behind, and the command.

The slow tests run llama.cpp on the files (its tools from benchmarks/build_llama_cpp.sh, built if
missing): llama-tokenize gives qwenkit's ids, llama-simple generates, and for the real SmolLM2 its
greedy text is qwenkit's; llama.cpp's own converter writes the same tensors byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_files import CORPUS, qwen_vocab
from reference import random_model, tiny_config
from safetensors.torch import load_file

import qwenkit
from qwenkit import gguf_export
from qwenkit.cli import main
from qwenkit.config import YarnScaling, from_hf_config
from qwenkit.errors import QwenkitError
from qwenkit.gguf import (
    _hf_name,
    _unpermute,
    config_from_metadata,
    convert_gguf,
    generation_config_from_metadata,
    tokenizer_from_metadata,
)
from qwenkit.gguf_export import gguf_metadata, write_gguf
from qwenkit.model import load_model
from qwenkit.qwen_vocab import bytes_to_unicode
from qwenkit.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
QTYPES = ("q8_0", "q4_0")
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "你好 <tool_call>"},
]
TEXTS = [t for t in CORPUS if t] + ['<tool_call>{"a": 1}</tool_call> 1234567 <|fim_prefix|>x']


# ----------------------------------------------------------------------------------------------
# Checkpoint folders, tiny, with small tokenizers built the way Qwen2.5's and SmolLM2's are (the
# real Qwen2.5 vocabulary is read back in its own test: the gguf reader takes seconds over its
# 300k strings)

SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")]


def write_tokenizer(folder: Path, style: str) -> dict[str, int]:
    """tokenizer.json and tokenizer_config.json like Qwen2.5's (NFC, its split regex, its 22 added
    tokens after the vocabulary, the last eight not special) or SmolLM2's (specials at ids 0-2,
    single digits then GPT-2's byte-level split), over 256 byte tokens and a few merges. Returns
    the added tokens' ids."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    from qwenkit.qwen_vocab import KEPT_WHEN_SKIPPING, QWEN2_PATTERN, SPECIAL_TOKENS, builtin_tokenizer_config

    byte = bytes_to_unicode()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if style == "smollm" else []
    tokens = specials + [byte[b] for b in range(256)] + ["".join(m) for m in MERGES]
    tk = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=MERGES))
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    if style == "qwen2":
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        for t in SPECIAL_TOKENS:  # one at a time: their ids follow the vocabulary in this order
            tk.add_tokens([AddedToken(t, special=t not in KEPT_WHEN_SKIPPING, normalized=False)])
        config = builtin_tokenizer_config()  # Qwen2.5-7B-Instruct's, with its chat template
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        tk.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
        config = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "chat_template": SMOLLM_TEMPLATE,
            "model_max_length": 8192,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {t.content: i for i, t in tk.get_added_tokens_decoder().items()}


LLAMA = dict(model_type="llama", attention_bias=False, rope_theta=10000.0, rms_norm_eps=1e-5)


def checkpoint(folder: Path, arch: str = "llama", seed: int = 5, **changes) -> Path:
    """A tiny random checkpoint of `arch` with its style of tokenizer and generation defaults:
    Qwen2.5-Instruct's (sampling, both stop tokens) for qwen2, SmolLM2's for llama."""
    ids = write_tokenizer(folder, "qwen2" if arch == "qwen2" else "smollm")
    eot, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    if arch == "qwen2":  # a tied head, as Qwen2.5 up to 3B
        config = tiny_config(bos_token_id=eot, eos_token_id=im_end, **changes)
        generation = dict(bos_token_id=eot, pad_token_id=eot, eos_token_id=[im_end, eot], do_sample=True)
        generation.update(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    else:
        config = tiny_config(tie_word_embeddings=False, bos_token_id=ids["<|im_start|>"], eos_token_id=im_end)
        config = dataclasses.replace(config, **{"max_position_embeddings": 8192, **LLAMA, **changes})
        generation = {"bos_token_id": ids["<|im_start|>"], "eos_token_id": [im_end, eot], "pad_token_id": im_end}
    model = random_model(config, seed=seed)
    model.generation_config = generation
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """{arch: checkpoint folder}, qwen2 and llama."""
    root = tmp_path_factory.mktemp("export")
    return {arch: checkpoint(root / arch, arch) for arch in ("qwen2", "llama")}


@pytest.fixture(scope="session")
def files(folders, tmp_path_factory):
    """{(arch, qtype): the GGUF file}, written once."""
    root = tmp_path_factory.mktemp("gguf-out")
    return {(a, q): write_gguf(f, root / f"{a}-{q}.gguf", q) for a, f in folders.items() for q in QTYPES}


def read_meta(path: Path) -> tuple[dict, dict, gguf.GGUFReader]:
    """(metadata, {tensor: torch-order shape}, reader) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    return meta, shapes, reader


def no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name]


# ----------------------------------------------------------------------------------------------
# Tensor types, and each weight within its format's error


def expected_type(name: str, shape: tuple[int, ...], qtype: str, tied: bool):
    """llama.cpp's choice (convert_hf_to_gguf --outtype q8_0; llama-quantize Q4_0, whose Q6_K head is Q8_0 here)."""
    if len(shape) == 1:
        return Q.F32
    if shape[-1] % 32:
        return Q.F16
    head = name == "output.weight" or (tied and name == "token_embd.weight")
    return Q.Q8_0 if qtype == "q8_0" or head else Q.Q4_0


def error_bound(qtype, ref: torch.Tensor) -> torch.Tensor:
    """The largest error each value of `ref` may have (its shape; blocks of 32 along the rows).

    Q8_0: a block of 32 has d = amax/127 and q = round(x/d), |q| <= 127, so the rounding is off by
    at most d/2 = amax/254; d is stored as fp16 (relative error 2^-11), which moves q*d by at most
    127 * d * 2^-11 = amax * 2^-11.
    Q4_0: d = -m/8 for m the block's value of largest magnitude, q = clip(trunc(x/d + 8.5), 0, 15)
    and x ~ d*(q-8): x/d lies in [-8, 8], rounding is off by at most |d|/2, except that x/d in
    (7.5, 8] (values of the sign opposite to m and nearly its size) clips to 7: off by up to
    |d| = amax/8. fp16's d adds at most 8 * |d| * 2^-11 = amax * 2^-11.
    F16: half an ulp, 2^-11 relative (plus fp16's smallest subnormal step).
    The 1.001 and the 1e-12 leave room for fp32 arithmetic."""
    if qtype == Q.F32:
        return torch.zeros_like(ref)
    if qtype == Q.F16:
        return ref.abs() * 2**-11 + 2**-25
    blocks = ref.reshape(ref.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = 0.5 / 127 if qtype == Q.Q8_0 else 1 / 8
    return (amax * (scale + 2**-11) * 1.001 + 1e-12).expand_as(blocks).reshape(ref.shape)


def check_tensors(path: Path, folder: Path, qtype: str) -> dict[str, int]:
    """Each tensor of the file has llama.cpp's type and is within its format's error; {type: count}."""
    config = from_hf_config(folder)
    source = load_file(folder / "model.safetensors")
    _, _, reader = read_meta(path)
    counts: dict[str, int] = {}
    assert len(reader.tensors) == len(source)
    for t in reader.tensors:
        hf = _hf_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        assert t.tensor_type == expected_type(t.name, shape, qtype, config.tie_word_embeddings), t.name
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape))
        if config.model_type == "llama" and ".q_proj." in hf:  # llama.cpp's row order, undone as gguf.py does
            got = _unpermute(got, config.num_attention_heads)
        elif config.model_type == "llama" and ".k_proj." in hf:
            got = _unpermute(got, config.num_key_value_heads)
        ref = source[hf].float()
        assert ((got - ref).abs() <= error_bound(t.tensor_type, ref)).all(), t.name
    return counts


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_tensor_types_and_error_within_the_format(files, folders, arch, qtype):
    counts = check_tensors(files[arch, qtype], folders[arch], qtype)
    n_layers = 2
    # 1-D: two norms and (qwen2) three biases per layer, and the final norm, all F32.
    assert counts["F32"] == n_layers * (2 + 3 * (arch == "qwen2")) + 1
    meta, _, _ = read_meta(files[arch, qtype])
    want = gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.MOSTLY_Q4_0
    assert meta["general.file_type"] == want and meta["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    if qtype == "q4_0":  # the head alone (the tied embedding for qwen2, output.weight for llama) is Q8_0
        assert counts["Q8_0"] == 1 and counts["Q4_0"] == n_layers * 7 + (arch == "llama")


def test_rows_not_a_whole_number_of_blocks_stay_f16(tmp_path):
    # hidden 48: every weight that reads the hidden state has rows of 48 values; only down_proj
    # (rows of 128, the MLP width) is quantized.
    folder = checkpoint(tmp_path / "m", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    for qtype in QTYPES:
        counts = check_tensors(write_gguf(folder, tmp_path / f"{qtype}.gguf", qtype), folder, qtype)
        assert counts == {"F32": 5, "F16": 2 + 6 * 2, qtype.upper(): 2}


def test_tensors_are_streamed_one_at_a_time(tmp_path, folders, monkeypatch):
    """When the checkpoint's next tensor is read, no earlier one is still held (a 7B checkpoint
    never sits in memory whole)."""
    held: list[weakref.ref] = []
    read = gguf_export.iter_tensors

    def watched(*args, **kwargs):
        for name, tensor in read(*args, **kwargs):
            assert all(r() is None for r in held), f"a tensor before {name} is still held"
            held.append(weakref.ref(tensor))
            yield name, tensor

    monkeypatch.setattr(gguf_export, "iter_tensors", watched)
    write_gguf(folders["qwen2"], tmp_path / "m.gguf", "q4_0")
    assert len(held) == len(load_file(folders["qwen2"] / "model.safetensors"))


# ----------------------------------------------------------------------------------------------
# Reading back: the config, the tokenizer, the chat template, the generation defaults


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_metadata_read_back_as_the_checkpoint(files, folders, arch):
    folder = folders[arch]
    meta, shapes, _ = read_meta(files[arch, "q8_0"])
    config = from_hf_config(folder)
    assert config_from_metadata(meta, shapes, torch_dtype=config.torch_dtype) == config
    saved = json.loads((folder / "generation_config.json").read_text())
    assert generation_config_from_metadata(meta) == saved
    if arch == "qwen2":  # Qwen2.5-Instruct's defaults: sampling, and both of its stop tokens
        assert len(saved["eos_token_id"]) == 2 and saved["top_k"] == 20

    source = qwenkit.load_tokenizer(folder)
    backend, tconfig = tokenizer_from_metadata(meta)
    read = Tokenizer(backend, tconfig)
    for text in TEXTS:
        assert read.encode(text) == source.encode(text), text
        assert read.encode(text, allow_special=False) == source.encode(text, allow_special=False), text
    chat = source.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert read.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == chat
    assert read.encode(chat) == source.encode(chat)
    assert (read.eos_token_id, read.pad_token_id) == (source.eos_token_id, source.pad_token_id)
    # Special tokens stay special and a plain added token plain: skipping them drops the same ones.
    ids = source.encode("<tool_call>x</tool_call><|im_start|>user\nHi<|im_end|><|endoftext|>")
    assert read.decode(ids, skip_special_tokens=True) == source.decode(ids, skip_special_tokens=True)
    assert "<tool_call>" not in read.all_special_tokens and "<|im_end|>" in read.all_special_tokens
    # The one difference, llama.cpp's: Qwen2.5's `"special": false` tokens that look special
    # (<|fim_prefix|>, <|repo_name|>, ...) are CONTROL tokens in its files, so they read back special.
    if arch == "qwen2":
        assert set(read.all_special_tokens) - set(source.all_special_tokens) == {
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
        }


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_convert_gguf_gives_back_the_checkpoint(files, folders, arch, tmp_path):
    folder = folders[arch]
    back = convert_gguf(files[arch, "q8_0"], tmp_path / "back")
    source_config = json.loads((folder / "config.json").read_text())
    assert json.loads((back / "config.json").read_text()) == source_config
    gen = json.loads((back / "generation_config.json").read_text())
    assert gen == json.loads((folder / "generation_config.json").read_text())
    source, read = qwenkit.load_tokenizer(folder), qwenkit.load_tokenizer(back)
    for text in TEXTS:
        assert read.encode(text) == source.encode(text), text
        assert read.decode(source.encode(text)) == text
    ids, mask = source.encode_chat(MESSAGES)
    assert read.encode_chat(MESSAGES) == (ids, mask)


def test_yarn_and_a_head_dim_of_its_own_read_back(tmp_path):
    yarn = YarnScaling(factor=4.0, original_max_position_embeddings=32768, beta_fast=16.0, beta_slow=2.0)
    for arch in ("qwen2", "llama"):
        folder = checkpoint(tmp_path / arch, arch, head_dim=32, rope_scaling=yarn, max_position_embeddings=131072)
        meta, shapes, _ = read_meta(write_gguf(folder, tmp_path / f"{arch}.gguf"))
        config = from_hf_config(folder)
        assert config.head_dim == 32 and config.rope_scaling == yarn
        assert config_from_metadata(meta, shapes, torch_dtype=config.torch_dtype) == config
        assert meta[f"{arch}.rope.scaling.type"] == "yarn" and meta[f"{arch}.attention.key_length"] == 32


def test_the_real_qwen_tokenizer_survives_as_llama_cpp_writes_it(tok_qwen, tok_saved_dir):
    """The whole Qwen2.5 vocabulary, at the metadata's level (reading a file of it back takes the
    gguf reader seconds; the slow tests do): the tokens, token types and merges llama.cpp's
    converter writes (tests/gguf_files.qwen_vocab follows it), and the same ids read back."""
    config = tiny_config(vocab_size=151936)
    meta = gguf_metadata(config, tok_qwen, {}, "q8_0")
    converter = qwen_vocab(tok_saved_dir)
    assert meta["tokenizer.ggml.tokens"] == converter["tokens"]
    assert meta["tokenizer.ggml.token_type"] == converter["types"]
    assert meta["tokenizer.ggml.merges"] == converter["merges"]
    assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["tokenizer.chat_template"] == converter["template"]
    ids = {k: meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "padding")}
    assert ids == {"bos": 151643, "eos": 151645, "padding": 151643}
    backend, tconfig = tokenizer_from_metadata(meta)
    read = Tokenizer(backend, tconfig)
    chat = tok_qwen.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    for text in [*TEXTS, chat, "cafe\u0301 n\u0303"]:  # decomposed text: Qwen2's NFC normalizer
        assert read.encode(text) == tok_qwen.encode(text), text
    assert read.apply_chat_template(MESSAGES, tokenize=False) == tok_qwen.apply_chat_template(MESSAGES, tokenize=False)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_q8_0_logits_close_to_the_checkpoint(files, folders, arch, tmp_path, one_thread):
    original = load_model(folders[arch])  # the plain reference model: no kernels to build
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    want = logits(original, ids)
    for qtype, tolerance in (("q8_0", 0.02), ("q4_0", 0.3)):
        imported = load_model(convert_gguf(files[arch, qtype], tmp_path / qtype))
        err = (logits(imported, ids) - want).abs().max().item()
        print(f"{arch} {qtype}: max |logit diff| {err:.2e}, max |logit| {want.abs().max().item():.3f}")
        # Measured for these seeds: q8_0 about 1% of the largest logit, q4_0 8% to 15%. The bounds
        # catch a misread file (rows permuted, a wrong scale), which is off by the logits' own size.
        assert err <= tolerance * want.abs().max().item(), (qtype, err)


# ----------------------------------------------------------------------------------------------
# Errors: clear, and nothing left behind


def test_bad_inputs_are_clear_errors(tmp_path, folders):
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(QwenkitError, match="no such checkpoint folder"):
        write_gguf(tmp_path / "missing", out)
    with pytest.raises(QwenkitError, match="quantization type 'q5_k'"):
        write_gguf(folders["llama"], out, "q5_k")

    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({"model_type": "gemma2", "hidden_size": 8}))
    with pytest.raises(QwenkitError, match=r"config\.json: field 'model_type' is 'gemma2'"):
        write_gguf(gemma, out)

    no_tokenizer = tmp_path / "no-tokenizer"
    random_model(tiny_config(), seed=1).save_pretrained(no_tokenizer)
    with pytest.raises(QwenkitError, match="tokenizer.json is missing"):
        write_gguf(no_tokenizer, out)

    # A WordPiece-style pre-tokenizer: no GGUF name splits text as it does.
    other = tmp_path / "other"
    checkpoint(other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(QwenkitError, match="pre-tokenizer"):
        write_gguf(other, out)

    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(QwenkitError, match="is a folder"):
        write_gguf(folders["llama"], tmp_path / "folder.gguf")
    assert not out.exists() and (not out.parent.exists() or no_leftovers(out.parent) == [])


def test_existing_output_is_kept_unless_overwrite(tmp_path, folders):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(QwenkitError, match="already exists"):
        write_gguf(folders["llama"], out)
    assert out.read_bytes() == b"mine"
    write_gguf(folders["llama"], out, overwrite=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    assert no_leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", ["truncated shard", "Ctrl-C"])
def test_failure_while_writing_leaves_nothing(tmp_path, folders, monkeypatch, failure):
    folder = tmp_path / "m"
    checkpoint(folder)
    out = tmp_path / "out.gguf"
    if failure == "truncated shard":  # found when the shard's header is read, before writing
        shard = folder / "model.safetensors"
        shard.write_bytes(shard.read_bytes()[:-1000])
        error = QwenkitError
    else:
        calls = iter(range(100))

        def interrupted(data, qtype):
            if next(calls) == 5:
                raise KeyboardInterrupt
            return quantize(data, qtype)

        quantize = gguf.quants.quantize
        monkeypatch.setattr(gguf.quants, "quantize", interrupted)
        error = KeyboardInterrupt
    with pytest.raises(error):
        write_gguf(folder, out)
    assert not out.exists() and no_leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# The command


def test_quantize_command(tmp_path, folders, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["quantize", "--model", str(folders["llama"]), "--type", "q4_0", "--out", str(out)]) == 0
    assert f"wrote {out} (q4_0" in capsys.readouterr().out
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    assert main(["quantize", "--model", str(folders["llama"]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", "--model", str(folders["llama"]), "--out", str(out), "--overwrite"]) == 0
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert main(["quantize", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(folders["llama"]), "--type", "q5_k", "--out", str(out)])
    assert "invalid choice: 'q5_k'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for words in ("8.5 bits", "4.5 bits", "llama.cpp", 'qwenkit.load_model("X.gguf")', "--overwrite"):
        assert words in help_text, words


# ----------------------------------------------------------------------------------------------
# llama.cpp runs the files (slow: builds llama.cpp's tools if they are missing)

LLAMA_CPP = Path(
    os.environ.get("QWENKIT_LLAMA_CPP")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwenkit" / "llama.cpp-0.3.36"
)


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """The folder of llama.cpp's tools, built by benchmarks/build_llama_cpp.sh (idempotent) if needed."""
    tools = [LLAMA_CPP / "bin" / t for t in ("llama-simple", "llama-tokenize")] + [LLAMA_CPP / "convert_hf_to_gguf.py"]
    if not all(t.exists() for t in tools):
        script = Path(__file__).resolve().parents[1] / "benchmarks" / "build_llama_cpp.sh"
        proc = subprocess.run(
            ["bash", str(script), str(LLAMA_CPP)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHON": sys.executable},
        )
        missing = [str(t) for t in tools if not t.exists()]
        if proc.returncode != 0 or missing:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            pytest.fail(
                f"llama.cpp's tools are needed and could not be built with {script} (exit status "
                f"{proc.returncode}; missing: {', '.join(missing) or 'none'}). It needs cmake, a C++ compiler "
                f"and PyPI (or set QWENKIT_LLAMA_CPP to a built folder). Its output ended:\n{tail}"
            )
    return LLAMA_CPP


def llama_run(tool: Path, *args: str) -> str:
    proc = subprocess.run([str(tool), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{tool.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


def llama_simple(llama_cpp: Path, path: Path, prompt: str, n: int) -> str:
    """llama-simple's greedy continuation of `prompt` (it prints the prompt, then the new text)."""
    out = llama_run(llama_cpp / "bin" / "llama-simple", "-m", str(path), "-n", str(n), prompt)
    assert out.startswith(prompt), out[:200]  # the prompt's tokens read back as the prompt
    return out[len(prompt) :].removesuffix("\n")


@pytest.fixture(scope="session")
def qwen_vocab_folder(tmp_path_factory, tok_qwen):
    """A tiny Qwen2 checkpoint with the real Qwen2.5 tokenizer and Qwen2.5-Instruct's generation defaults."""
    folder = tmp_path_factory.mktemp("export-qwen") / "qwen2.5-vocab"
    random_model(tiny_config(vocab_size=151936), seed=3).save_pretrained(folder)  # every token has a row
    tok_qwen.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_real_qwen_vocabulary_file_reads_back(qwen_vocab_folder, tmp_path):
    path = write_gguf(qwen_vocab_folder, tmp_path / "q.gguf", "q4_0")
    check_tensors(path, qwen_vocab_folder, "q4_0")
    back = convert_gguf(path, tmp_path / "back")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((back / name).read_text()) == json.loads((qwen_vocab_folder / name).read_text()), name
    source, read = qwenkit.load_tokenizer(qwen_vocab_folder), qwenkit.load_tokenizer(back)
    chat = source.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    for text in [*TEXTS, chat]:
        assert read.encode(text) == source.encode(text), text
    assert read.encode_chat(MESSAGES) == source.encode_chat(MESSAGES)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen2.5-vocab"])
def test_llama_cpp_tokenizes_like_qwenkit_and_generates(llama_cpp, files, folders, qwen_vocab_folder, arch, tmp_path):
    folder = qwen_vocab_folder if arch == "qwen2.5-vocab" else folders[arch]
    tok = qwenkit.load_tokenizer(folder)
    chat = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    for qtype in QTYPES:
        path = files.get((arch, qtype)) or write_gguf(folder, tmp_path / f"{qtype}.gguf", qtype)
        for i, text in enumerate([*TEXTS, chat]):
            prompt = tmp_path / f"{i}.txt"
            prompt.write_text(text, encoding="utf-8")
            tokenize = llama_cpp / "bin" / "llama-tokenize"
            out = llama_run(tokenize, "-m", str(path), "-f", str(prompt), "--ids", "--log-disable")
            assert json.loads(out.strip().splitlines()[-1]) == tok.encode(text), text
        # Random weights: the words mean nothing, but llama.cpp loads the file and runs 8 steps.
        assert llama_simple(llama_cpp, path, "Hello, world! The quick", 8)


@pytest.mark.slow
def test_llama_cpp_writes_the_same_file_and_continues_smollm2_like_qwenkit(llama_cpp, default_model_dir, tmp_path):
    """The real SmolLM2-135M-Instruct: llama.cpp's own converter (convert_hf_to_gguf.py --outtype
    q8_0) writes the same tensors, byte for byte, and llama.cpp's greedy continuation of our file is
    qwenkit's, on the checkpoint itself, word for word."""
    ours = write_gguf(default_model_dir, tmp_path / "smollm2-q8_0.gguf", "q8_0")
    theirs = tmp_path / "reference.gguf"
    subprocess.run(
        [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(default_model_dir), "--outtype", "q8_0"]
        + ["--outfile", str(theirs)],
        check=True,
        capture_output=True,
    )
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor_type == y.tensor_type and np.array_equal(x.data, y.data), x.name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.pre"):
        assert a.fields[key].contents() == b.fields[key].contents(), key

    prompt = "The capital of France is"
    model, tok = load_model(default_model_dir), qwenkit.load_tokenizer(default_model_dir)
    ids = tok.encode(prompt, return_tensors="pt")
    want = tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :])
    got = llama_simple(llama_cpp, ours, prompt, 8)
    assert "Paris" in got and got == want, (got, want)
