"""Write a GGUF file (llama.cpp's format) from a Hugging Face checkpoint folder, quantized to Q8_0 or Q4_0.

`write_gguf(folder, out, qtype)` is the inverse of qwenkit/gguf.py: its metadata are what
`config_from_metadata`, `tokenizer_from_metadata` and `generation_config_from_metadata` read back
as the folder's config, tokenizer and generation defaults, and its tensors carry the names of
gguf.py's tables. Both are written as llama.cpp's convert_hf_to_gguf.py writes them (keys, key
types, token types, the llama q/k permutation), so llama.cpp loads and runs the file.

Which tensors are quantized follows llama.cpp: 2-D weights take the file's type, norms and biases
stay F32, and a weight whose rows are not a whole number of 32-value blocks stays F16. For Q4_0,
llama-quantize gives the output head (the embedding when the head is tied) Q6_K; the `gguf`
package has no Q6_K quantizer, so it is Q8_0 here, a little larger and a little more exact.

The checkpoint is read one tensor at a time (`checkpoint.iter_tensors`) and each tensor is
quantized in slices of rows and written before the next is read, so memory holds one tensor (in
fp32) and its quantized copy. The file is written under a temporary name beside `out` and renamed
into place at the end: an error or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwenkit.checkpoint import checkpoint_files, iter_tensors, read_generation_config, resolve_model_path
from qwenkit.config import QwenConfig, from_hf_config
from qwenkit.errors import CheckpointError, GGUFError, UserError
from qwenkit.files import atomic_path
from qwenkit.gguf import BLOCK_TENSORS, GLOBAL_TENSORS, SPLIT_PATTERNS, gguf_lib, tokenizer_from_metadata
from qwenkit.model import QwenForCausalLM
from qwenkit.tokenizer import Tokenizer, load_tokenizer

# The file types offered, by llama.cpp's names (the tensor type of the 2-D weights).
QTYPES = ("q8_0", "q4_0")

# Hugging Face parameter names -> llama.cpp tensor names: gguf.py's tables, inverted.
_HF_GLOBAL = {hf: name for name, hf in GLOBAL_TENSORS.items()}
_HF_BLOCK = {hf: name for name, hf in BLOCK_TENSORS.items()}

# llama.cpp's token types (tokenizer.ggml.token_type).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5

# Values quantized at once: a bounded slice of rows, so the quantizer's temporaries stay small.
_CHUNK_VALUES = 1 << 22

# The text llama.cpp's converter tokenizes to tell pre-tokenizers apart (get_vocab_base_pre), and
# more that a wrong normalizer or added-token rule would split differently.
_CHECK_TEXTS = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "def add(a: int, b: int) -> int:\n    return a + b  # 2024-11-24 $1,000,000\r\n",
    "cafe\u0301 n\u0303 Ünïcödé 汉字 日本語 한국어",
)


def write_gguf(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    qtype: str = "q8_0",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a checkpoint folder (Qwen2/Qwen2.5 or Llama architecture) as a quantized GGUF file.

    llama.cpp runs the file, and qwenkit reads it back (`qwenkit.gguf.convert_gguf`) with the
    folder's config, tokenizer, chat template and generation defaults.

    Args:
        folder: the checkpoint folder: config.json, safetensors, tokenizer.json and
            tokenizer_config.json (generation_config.json if it has one).
        out: the .gguf file to write.
        qtype: "q8_0" (8.5 bits per weight, close to lossless) or "q4_0" (4.5 bits per weight;
            the output head stays Q8_0).
        overwrite: replace `out` if it exists.
        progress: show a progress bar over the tensors on stderr.

    Returns:
        the file's path.
    """
    gguf = gguf_lib()
    if qtype not in QTYPES:
        raise UserError(f"quantization type {qtype!r}: choose {' or '.join(QTYPES)}")
    source = resolve_model_path(folder)
    config = from_hf_config(source / "config.json")  # a ConfigError names any other model_type
    out = Path(out)
    if out.is_dir():
        raise GGUFError(f"{out} is a folder; name the .gguf file to write")
    if out.exists() and not overwrite:
        raise GGUFError(f"{out} already exists; choose another name (or pass overwrite=True)")

    try:
        tok = load_tokenizer(source)
    except (FileNotFoundError, ValueError) as e:
        raise GGUFError(f"{source}: a GGUF file carries its tokenizer, and this one cannot be read: {e}") from None
    meta = gguf_metadata(config, tok, read_generation_config(source), qtype, name=source.resolve().name)
    _check_tokenizer(meta, tok, source)  # seconds, before minutes of weights

    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in QwenForCausalLM(config).named_parameters()}
    # iter_tensors yields the checkpoint's tensors in the order of its files; the tensor infos,
    # written before any data, list them in that order.
    order = [name for names in checkpoint_files(source).values() for name in names if name in expected]
    missing = sorted(set(expected) - set(order))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing tensors {', '.join(missing[:5])}{more}")
    base = gguf.GGMLQuantizationType[qtype.upper()]
    tied = config.tie_word_embeddings
    plan = {name: (_gguf_name(name), expected[name]) for name in order}
    types = {name: _tensor_type(gguf, gname, shape, base, tied) for name, (gname, shape) in plan.items()}

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, config.model_type)
        try:
            _add_metadata(writer, meta)
            for name, (gname, shape) in plan.items():
                writer.add_tensor_info(gname, shape, np.float32, _nbytes(gguf, shape, types[name]), types[name])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            tensors = iter_tensors(source, expected, torch.float32, tied)
            if progress:
                from tqdm import tqdm

                tensors = tqdm(tensors, total=len(plan), desc=f"quantizing to {qtype}", unit="tensor", leave=False)
            written = 0
            for name, tensor in tensors:
                assert name == order[written], (name, order[written])  # the order the tensor infos promised
                writer.write_tensor_data(_encode(gguf, tensor, name, types[name], config))
                written += 1
                del tensor  # before iter_tensors reads the next one
            assert written == len(order), (written, len(order))
        finally:
            writer.close()
    return out


# ----------------------------------------------------------------------------------------------
# Tensors


def _gguf_name(hf_name: str) -> str:
    if hf_name in _HF_GLOBAL:
        return _HF_GLOBAL[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m is None or m.group(2) not in _HF_BLOCK:  # every parameter of QwenForCausalLM is in the tables
        raise AssertionError(f"no GGUF name for {hf_name}")
    return f"blk.{m.group(1)}.{_HF_BLOCK[m.group(2)]}"


def _tensor_type(gguf, name: str, shape: tuple[int, ...], base, tied: bool):
    """The tensor type llama.cpp gives a tensor of a file of type `base`."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return Q.F32  # norms and biases: llama.cpp's kernels want them in F32
    qtype = base
    if base == Q.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        qtype = Q.Q8_0  # llama-quantize's Q6_K for the head; gguf has no Q6_K quantizer
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return Q.F16  # rows that are not whole blocks: the converter's and llama-quantize's fallback
    return qtype


def _nbytes(gguf, shape: tuple[int, ...], qtype) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf `LlamaModel.permute`, the inverse of gguf._unpermute: within
    # each head, the two rotary halves are interleaved into llama.cpp's pairwise RoPE layout.
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(gguf, tensor: torch.Tensor, name: str, qtype, config: QwenConfig) -> np.ndarray:
    """One tensor's data as the file stores it: permuted for llama q/k, then quantized."""
    w = tensor.numpy()  # (out, in) or (n,), fp32
    if config.model_type == "llama" and ".self_attn.q_proj." in name:
        w = _permute(w, config.num_attention_heads)
    elif config.model_type == "llama" and ".self_attn.k_proj." in name:
        w = _permute(w, config.num_key_value_heads)
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(w)
    if qtype == Q.F16:
        return w.astype(np.float16)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = w.reshape(-1, w.shape[-1])
    data = np.empty((rows.shape[0], rows.shape[1] // block * type_size), dtype=np.uint8)  # (out, bytes per row)
    step = max(1, _CHUNK_VALUES // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        data[start : start + step] = gguf.quants.quantize(rows[start : start + step], qtype)
    return data


# ----------------------------------------------------------------------------------------------
# Metadata


def gguf_metadata(
    config: QwenConfig, tok: Tokenizer, generation_config: dict[str, Any], qtype: str, name: str = "model"
) -> dict[str, Any]:
    """The file's metadata, {key: value}, as llama.cpp's converter writes them for qwen2 and llama.

    Args:
        config: the checkpoint's config.
        tok: its tokenizer.
        generation_config: its generation_config.json ({} when it has none).
        qtype: "q8_0" or "q4_0".
        name: general.name (the folder's name).
    """
    gguf = gguf_lib()
    arch = config.model_type
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.MOSTLY_Q4_0
    meta: dict[str, Any] = {
        "general.architecture": arch,
        "general.type": "model",
        "general.name": name,
        "general.file_type": int(file_type),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
    }
    if arch == "llama":
        meta[f"{arch}.vocab_size"] = config.vocab_size
    meta.update(
        {
            f"{arch}.context_length": config.max_position_embeddings,
            f"{arch}.embedding_length": config.hidden_size,
            f"{arch}.feed_forward_length": config.intermediate_size,
            f"{arch}.block_count": config.num_hidden_layers,
            f"{arch}.attention.head_count": config.num_attention_heads,
            f"{arch}.attention.head_count_kv": config.num_key_value_heads,
            f"{arch}.rope.freq_base": float(config.rope_theta),
            f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        }
    )
    if arch == "llama":  # LlamaModel writes it always; llama.cpp's llama graph rotates this many dims
        meta[f"{arch}.rope.dimension_count"] = config.dim_per_head
    if config.head_dim is not None:  # a head dim that is not hidden / heads
        meta[f"{arch}.attention.key_length"] = config.head_dim
        meta[f"{arch}.attention.value_length"] = config.head_dim
    if config.rope_scaling is not None:
        s = config.rope_scaling
        meta[f"{arch}.rope.scaling.type"] = "yarn"
        meta[f"{arch}.rope.scaling.factor"] = float(s.factor)
        meta[f"{arch}.rope.scaling.original_context_length"] = s.original_max_position_embeddings
        meta[f"{arch}.rope.scaling.yarn_beta_fast"] = float(s.beta_fast)
        meta[f"{arch}.rope.scaling.yarn_beta_slow"] = float(s.beta_slow)
        if s.attention_factor is not None:
            meta[f"{arch}.rope.scaling.yarn_attn_factor"] = float(s.attention_factor)
    meta.update(_tokenizer_metadata(config, tok))
    meta.update(_sampling_metadata(generation_config))
    return meta


def _tokenizer_metadata(config: QwenConfig, tok: Tokenizer) -> dict[str, Any]:
    """tokenizer.ggml.*: the vocabulary in id order padded to the embedding's rows, token types,
    merges, the pre-tokenizer's name, special ids and the chat template (gguf's SpecialVocab)."""
    # The Tokenizer class has no public accessor for its backend and config; both are read here.
    backend, tconfig = tok._tk, tok._config
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFError(
            f"tokenizer model {model.get('type')!r}: GGUF export writes byte-level BPE ('gpt2') "
            "tokenizers, as Qwen2.5 and SmolLM2 use"
        )
    vocab = backend.get_vocab(with_added_tokens=True)
    size = config.vocab_size
    if max(vocab.values()) >= size:
        raise GGUFError(f"the tokenizer has ids up to {max(vocab.values())}, past the embedding's {size} rows")
    added = backend.get_added_tokens_decoder()
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        if i in added:
            text = added[i].content
            # llama.cpp's converter: CONTROL for special tokens and for those that look special
            # (<|fim_prefix|> is `special: false` in Qwen2.5, but llama.cpp runs it as a control
            # token and warns otherwise); USER_DEFINED for the rest (<tool_call>).
            looks_special = text.startswith("<|") and text.endswith("|>")
            tokens.append(text)
            types.append(_CONTROL if added[i].special or looks_special else _USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(_NORMAL)
        else:  # rows past the tokenizer (151665..151935 in Qwen2.5), as llama.cpp names them
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def token_id(key: str) -> int | None:
        text = tconfig.get(key)
        text = text.get("content") if isinstance(text, dict) else text
        return vocab.get(text) if text else None

    first = lambda ids: ids[0] if isinstance(ids, list) and ids else ids
    bos = token_id("bos_token")
    bos = first(config.bos_token_id) if bos is None else bos  # SpecialVocab falls back on config.json
    eos = token_id("eos_token")
    eos = first(config.eos_token_id) if eos is None else eos
    # Whether encoding adds bos and eos: the tokenizer_config's flags, else what the post-processor does.
    plain, with_special = (backend.encode("a", add_special_tokens=s).ids for s in (False, True))
    added_some = len(with_special) > len(plain)
    add_bos = tconfig.get("add_bos_token", added_some and bos is not None and with_special[0] == bos)
    add_eos = tconfig.get("add_eos_token", added_some and eos is not None and with_special[-1] == eos)
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer_name(spec),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    ids = {"bos": bos, "eos": eos, "unknown": token_id("unk_token"), "padding": token_id("pad_token")}
    meta.update({f"tokenizer.ggml.{key}_token_id": int(i) for key, i in ids.items() if i is not None})
    meta["tokenizer.ggml.add_bos_token"] = bool(add_bos)
    meta["tokenizer.ggml.add_eos_token"] = bool(add_eos)
    if config.model_type == "llama" and tconfig.get("add_prefix_space") is not None:
        meta["tokenizer.ggml.add_space_prefix"] = bool(tconfig["add_prefix_space"])  # LlamaModel.set_vocab
    if tconfig.get("chat_template"):  # the folder's own; the built-in one is qwenkit's default anyway
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """The `tokenizer.ggml.pre` llama.cpp (and gguf.tokenizer_from_metadata) splits text by as this
    tokenizer.json's normalizer and pre-tokenizer do."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"]:
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name in ("qwen2", "llama-bpe"):
            if pattern == SPLIT_PATTERNS[name]:
                return name
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex"):
        return "smollm"  # SmolLM's: single digits, then GPT-2's byte-level regex
    elif kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    raise GGUFError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is none that GGUF names and qwenkit "
        "reads back (Qwen2's, SmolLM's, Llama 3's or GPT-2's); splitting text another way would change the tokens"
    )


def _sampling_metadata(generation_config: dict[str, Any]) -> dict[str, Any]:
    """general.sampling.*, from generation_config.json, when it samples by default: gguf.py reads
    their presence as do_sample (llama.cpp's converter writes them whenever they are there)."""
    if not generation_config.get("do_sample"):
        return {}
    keys = {
        "temperature": "temp",
        "top_k": "top_k",
        "top_p": "top_p",
        "min_p": "min_p",
        "repetition_penalty": "penalty_repeat",
    }
    meta = {}
    for name, key in keys.items():
        value = generation_config.get(name)
        if value is not None:
            meta[f"general.sampling.{key}"] = int(value) if key == "top_k" else float(value)
    return meta


def _add_metadata(writer, meta: dict[str, Any]) -> None:
    """Each key with the value type llama.cpp's writer gives it: counts and ids uint32, reals
    float32, top_k int32, token types an int32 array."""
    for key, value in meta.items():
        if key == "general.architecture":
            continue  # the writer's constructor writes it
        if key == "general.sampling.top_k":
            writer.add_int32(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)


def _check_tokenizer(meta: dict[str, Any], tok: Tokenizer, where: Path) -> None:
    """Rebuild the tokenizer from the metadata as gguf.py reads it, and compare: a tokenizer that
    would read back splitting text differently is an error now, not a silently different model."""
    backend, _ = tokenizer_from_metadata(meta, where=str(where))
    added = [t.content for _, t in sorted(tok._tk.get_added_tokens_decoder().items())]
    texts = [*_CHECK_TEXTS, "x ".join(added) + " text\n"]
    for text in texts:
        for add_special in (False, True):
            want = tok.encode(text, add_special_tokens=add_special)
            got = backend.encode(text, add_special_tokens=add_special).ids
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                raise GGUFError(
                    f"{where}: the tokenizer does not survive the GGUF format (pre-tokenizer "
                    f"{meta['tokenizer.ggml.pre']!r}): {text[:40]!r}... reads back as ids {got[at : at + 5]} "
                    f"where the checkpoint's tokenizer gives {want[at : at + 5]} (token {at})"
                )
            if backend.decode(want, skip_special_tokens=False) != tok.decode(want):
                raise GGUFError(f"{where}: the tokenizer does not survive the GGUF format: {text[:40]!r} decodes apart")


__all__ = ["QTYPES", "gguf_metadata", "write_gguf"]
