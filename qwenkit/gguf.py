"""Import a GGUF file (llama.cpp's format) as a Hugging Face checkpoint folder.

`convert_gguf(file, out_dir)` reads the file with qwenkit.gguf_file (a one-pass reader of the
container; the `gguf` package's is 50x slower on a Qwen vocabulary), dequantizes every tensor
with `gguf.quants.dequantize`, builds a QwenForCausalLM from a QwenConfig made from the metadata
and saves it with qwenkit's own `save_pretrained`, next to a
tokenizer that the `tokenizers` library rebuilds from the embedded vocabulary, merges, token types,
special ids and chat template. The folder loads in qwenkit and in transformers like any checkpoint.

Two GGUF architectures are the Qwen2 network: `qwen2` (Qwen2, Qwen2.5) and `llama` (the same
network without q/k/v bias: SmolLM2, Llama 3, ...). llama.cpp's converter permutes the rows of a
llama q/k projection into its interleaved RoPE layout; that is undone here. qwen2 files are written
unpermuted (llama.cpp runs them with rotate-half "NEOX" RoPE), so they are read as they are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qwenkit.config import ConfigError, QwenConfig, YarnScaling
from qwenkit.config import torch_dtype as torch_dtype_named
from qwenkit.errors import GGUFError
from qwenkit.files import install_dir, temporary_name
from qwenkit.gguf_file import GGUFFile
from qwenkit.model import QwenForCausalLM
from qwenkit.quant import BLOCK_FORMATS, QuantEmbedding, QuantLinear
from qwenkit.qwen_vocab import QWEN2_PATTERN, bytes_to_unicode
from qwenkit.tokenizer import Tokenizer, added_tokens_decoder

ARCHITECTURES = ("llama", "qwen2")

# llama.cpp tensor names -> Hugging Face parameter names (blk.N.* -> model.layers.N.*).
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# llama.cpp's token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer regexes by `tokenizer.ggml.pre`, as llama.cpp and transformers' GGUF loader name them.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PATTERNS = {
    "qwen2": QWEN2_PATTERN,
    "deepseek-r1-qwen": QWEN2_PATTERN,  # the DeepSeek-R1 distills of Qwen2.5 (architecture qwen2)
    "llama3": _LLAMA3_PATTERN,
    "llama-v3": _LLAMA3_PATTERN,
    "llama-bpe": _LLAMA3_PATTERN,
    "smaug-bpe": _LLAMA3_PATTERN,
}
_NFC_PRE = {"qwen2", "deepseek-r1-qwen"}  # Qwen2's own tokenizer.json normalizes to NFC
_DIGITS_THEN_GPT2 = {"smollm"}  # SmolLM's tokenizer.json: single digits, then GPT-2's byte-level regex
_GPT2_PRE = {"gpt-2", "gpt2", "default"}

# Texts llama.cpp treats as end of generation (its `special_eog_ids`), whatever the file's eos id.
# Qwen2.5-Instruct stops on <|im_end|> and <|endoftext|>; without both, a model can run on forever.
_EOG_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>")


def gguf_lib():
    try:
        import gguf
    except ImportError:
        raise GGUFError("importing a GGUF file needs the `gguf` package: pip install 'qwenkit[gguf]'") from None
    return gguf


def convert_gguf(
    gguf_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a Hugging Face checkpoint folder from a GGUF file of the llama or qwen2 architecture.

    The folder holds config.json, generation_config.json, model.safetensors (or shards),
    tokenizer.json and tokenizer_config.json (with the file's chat template). It is built under a
    temporary name next to `out_dir` and renamed into place, so an error leaves nothing behind.

    Args:
        gguf_file: the .gguf file (F32, F16, BF16 or any quantized type the `gguf` package
            dequantizes: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ*, ...). For a file split
            by gguf-split, part 1 (NAME-00001-of-0000N.gguf), the other parts beside it.
        out_dir: the folder to write; it must not exist (or be empty) unless `overwrite`.
        dtype: "float32" (exact: every GGUF type dequantizes to fp32 without loss) or "bfloat16".
        overwrite: replace an existing `out_dir`.
        progress: show a progress bar over the tensors on stderr.

    Returns:
        the folder's path.
    """
    path, out = Path(gguf_file), Path(out_dir)
    torch_dtype = torch_dtype_named(dtype, GGUFError)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise GGUFError(f"{out} already exists and is not empty; choose a new folder (or pass overwrite=True)")
    reader = _open(path)
    meta = reader.metadata
    tensors = [(path, t) for t in reader.tensors] + _other_parts(path, meta, len(reader.tensors))
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for _, t in tensors}
    config = config_from_metadata(meta, shapes, where=str(path), torch_dtype=str(torch_dtype).removeprefix("torch."))
    # Build the tokenizer first: it is cheap, and an unsupported one should fail before minutes of weights.
    backend, tokenizer_config = tokenizer_from_metadata(meta, where=str(path))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(out)
    try:
        model = _build_model(tensors, config, path, torch_dtype, progress)
        model.generation_config = generation_config_from_metadata(meta)
        model.save_pretrained(tmp, dtype=torch_dtype)
        del model
        (tmp / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        install_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------------------------
# Reading


def _open(path: Path, mode: str = "r") -> GGUFFile:
    gguf_lib()  # the type names come from it
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    try:
        return GGUFFile(path, mode)
    except GGUFError:
        raise
    except (OSError, ValueError) as e:  # numpy's map of an empty file, an unreadable one
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from None


def _other_parts(path: Path, meta: dict[str, Any], first_count: int, mode: str = "r") -> list:
    """The tensors of parts 2..N of a split GGUF (gguf-split's NAME-00001-of-0000N.gguf; Qwen's
    official GGUFs of the larger models come so). Part 1 holds all the metadata."""
    count = meta.get("split.count", 1)
    if count <= 1:
        return []
    m = re.fullmatch(r"(.*)-(\d{5})-of-(\d{5})\.gguf", path.name)
    if meta.get("split.no", 0) != 0 or m is None or int(m.group(3)) != count:
        raise GGUFError(
            f"{path}: part of a GGUF split in {count} files; pass the first one, "
            f"named like NAME-00001-of-{count:05d}.gguf, with the others beside it"
        )
    tensors = []
    for i in range(2, count + 1):
        part = path.with_name(f"{m.group(1)}-{i:05d}-of-{count:05d}.gguf")
        reader = _open(part, mode)
        if reader.metadata.get("split.no") != i - 1:
            raise GGUFError(f"{part}: not part {i} of the split GGUF {path.name}")
        tensors += [(part, t) for t in reader.tensors]
    total = meta.get("split.tensors.count")
    if total is not None and first_count + len(tensors) != total:
        raise GGUFError(f"{path}: the split GGUF's parts hold a different number of tensors than its {total}")
    return tensors


def _f32(value: float) -> float:
    # GGUF stores floats as float32: 1e-5 comes back as 9.99999974738e-06. The shortest float32
    # repr gives back the value the original config.json had.
    return float(str(np.float32(value)))


def config_from_metadata(
    meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str = "GGUF", torch_dtype: str = "float32"
) -> QwenConfig:
    """A QwenConfig from a GGUF file's metadata and tensor shapes (torch order).

    Args:
        meta: {key: value} of the file's metadata.
        shapes: {tensor name: shape}, used for the vocabulary size and the tied head.
        where: the file, for error messages.
        torch_dtype: the dtype the saved config.json names.
    """
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{where}: architecture {arch!r}; qwenkit imports {' and '.join(ARCHITECTURES)} GGUF files")

    missing = object()

    def get(key: str, default: Any = missing) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is missing:
            raise GGUFError(f"{where}: metadata key '{full}' is missing")
        return default

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list) or isinstance(heads, list):
        raise GGUFError(f"{where}: per-layer head counts are not part of the Qwen2 network")
    head_dim = get("attention.key_length", hidden // heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{where}: '{arch}.attention.value_length' differs from the key length; not a Qwen2 network")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(
            f"{where}: '{arch}.rope.dimension_count' ({get('rope.dimension_count')}) is not the head "
            f"dimension ({head_dim}); partial rotary embeddings are not part of the Qwen2 network"
        )
    if "token_embd.weight" not in shapes:
        raise GGUFError(f"{where}: tensor 'token_embd.weight' is missing")
    if "rope_freqs.weight" in shapes:
        raise GGUFError(
            f"{where}: tensor 'rope_freqs.weight' (Llama 3.1-style rope scaling) is not supported; "
            "qwenkit implements YaRN only"
        )

    scaling = None
    kind = get("rope.scaling.type", "none")
    if kind == "yarn":
        scaling = YarnScaling(
            factor=_f32(get("rope.scaling.factor")),
            original_max_position_embeddings=int(
                get("rope.scaling.original_context_length", get("context_length", 32768))
            ),
            beta_fast=_f32(get("rope.scaling.yarn_beta_fast", 32.0)),
            beta_slow=_f32(get("rope.scaling.yarn_beta_slow", 1.0)),
        )
    elif kind != "none":
        raise GGUFError(f"{where}: '{arch}.rope.scaling.type' is {kind!r}; qwenkit implements 'yarn' only")

    try:
        return QwenConfig(
            vocab_size=shapes["token_embd.weight"][0],
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_hidden_layers=get("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=None if head_dim == hidden // heads else head_dim,
            max_position_embeddings=get("context_length", 32768),
            rope_theta=_f32(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
            # llama.cpp writes `output.weight` only when the head is not the embedding matrix.
            tie_word_embeddings="output.weight" not in shapes,
            attention_bias=arch == "qwen2",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            model_type=arch,
            torch_dtype=torch_dtype,
        )
    except (ConfigError, TypeError) as e:
        raise GGUFError(f"{where}: {e}") from None


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}"
    return None


def _parameter_name(tensor, params: dict, path: Path, config: QwenConfig) -> str:
    """The model parameter a file's tensor is, or a GGUFError naming it."""
    name = _hf_name(tensor.name)
    if name is None or name not in params:
        why = "not part of the Qwen2 network" if name is None else f"not expected by this {config.model_type} config"
        raise GGUFError(f"{path}: unexpected tensor '{tensor.name}' ({why})")
    return name


def _check_complete(params: dict, seen: set[str], path: Path) -> None:
    """A GGUFError naming the model's parameters that no tensor of the file gave."""
    missing = sorted(set(params) - seen)
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise GGUFError(f"{path}: no tensor for {', '.join(missing[:5])}{more}")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's convert_hf_to_gguf `permute`: within each head, rows (two halves of the rotary
    # pairs) are interleaved: reshape(n_head, 2, D/2, ...).swapaxes(1, 2). This is its inverse.
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(tensor, path: Path) -> np.ndarray:
    gguf = gguf_lib()
    qtype = tensor.tensor_type
    try:
        values = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise GGUFError(
            f"{path}: tensor '{tensor.name}' is stored as {qtype.name}, which the gguf package cannot dequantize; "
            "qwenkit imports F32, F16, BF16 and llama.cpp's quantized types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, "
            "Q2_K..Q6_K, IQ*)"
        ) from None
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ggml lists the fastest dimension first
    # F32 comes back as a read-only view of the mapped file; torch wants memory it may own.
    return np.require(values.reshape(shape), dtype=np.float32, requirements=["C", "W"])


def _build_model(tensors: list, config: QwenConfig, first: Path, dtype: torch.dtype, progress: bool):
    """The model, from [(file, tensor)] of every part of the GGUF (`first`: the file named to us)."""
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, desc="dequantizing", unit="tensor", leave=False)
    for path, tensor in tensors:
        name = _parameter_name(tensor, params, path, config)
        weight = torch.from_numpy(_dequantize(tensor, path))
        if config.model_type == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = _unpermute(weight, config.num_attention_heads)
        elif config.model_type == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = _unpermute(weight, config.num_key_value_heads)
        if tuple(weight.shape) != tuple(params[name].shape):
            raise GGUFError(
                f"{path}: tensor '{tensor.name}' has shape {list(weight.shape)}, the metadata asks for "
                f"{list(params[name].shape)} ({name})"
            )
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = nn.Parameter(weight.to(dtype), requires_grad=False)
        seen.add(name)
    _check_complete(params, seen, first)
    model.model.rotary_emb.reset_buffers("cpu")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Generation defaults and the tokenizer, from the metadata


def generation_config_from_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json: bos/pad ids, every end-of-generation id, sampling defaults if stated.

    Args:
        meta: the file's metadata.
    """
    tokens = meta.get("tokenizer.ggml.tokens") or []
    eos: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and value not in eos:
            eos.append(int(value))
    eos += [i for i, text in enumerate(tokens) if text in _EOG_TEXTS and i not in eos]
    config: dict[str, Any] = {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    # Newer llama.cpp converters copy the model's recommended sampling into general.sampling.*.
    sampling = {
        "temp": "temperature",
        "top_k": "top_k",
        "top_p": "top_p",
        "min_p": "min_p",
        "penalty_repeat": "repetition_penalty",
    }
    for key, name in sampling.items():
        value = meta.get(f"general.sampling.{key}")
        if value is not None:
            config[name] = value if isinstance(value, int) else _f32(value)
            config["do_sample"] = True
    return {k: v for k, v in config.items() if v is not None}


def tokenizer_from_metadata(meta: dict[str, Any], where: str = "GGUF"):
    """A `tokenizers.Tokenizer` and the fields of its tokenizer_config.json, from a byte-level BPE
    ("gpt2") vocabulary as Qwen2.5, SmolLM2 and Llama 3 files carry it.

    Built as transformers' GGUF loader builds it (same vocabulary spelling, merges, added tokens and
    split regex for each `tokenizer.ggml.pre`), with two choices taken from the original
    tokenizer.json files instead: Qwen2's NFC normalizer, and SmolLM's single-digit split.

    Args:
        meta: the file's metadata.
        where: the file, for error messages.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"{where}: tokenizer.ggml.model is {kind!r}; qwenkit imports byte-level BPE ('gpt2') "
            "tokenizers, as Qwen2.5, SmolLM2 and Llama 3 use"
        )
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    merges: list[str] | None = meta.get("tokenizer.ggml.merges")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or merges is None:
        raise GGUFError(f"{where}: the tokenizer has no {'tokens' if not tokens else 'merges'} in its metadata")
    if len(types) != len(tokens):
        raise GGUFError(f"{where}: {len(types)} token types for {len(tokens)} tokens")
    pre = meta.get("tokenizer.ggml.pre", "default")
    known = sorted({*SPLIT_PATTERNS, *_DIGITS_THEN_GPT2, *_GPT2_PRE})
    if pre not in known:
        raise GGUFError(
            f"{where}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer qwenkit does not know "
            f"(known: {', '.join(known)}); splitting text another way would change the tokens"
        )

    # Byte-level vocabularies spell every byte as a printable character; a token spelled otherwise
    # (llama.cpp writes some added tokens as plain text) is respelled, as transformers does.
    byte_char = bytes_to_unicode()
    alphabet = set(byte_char.values())
    vocab = {
        t if set(t) <= alphabet else "".join(byte_char[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{where}: merge {merge!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if pre in SPLIT_PATTERNS:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_PATTERNS[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGITS_THEN_GPT2:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _NFC_PRE:
        tk.normalizer = normalizers.NFC()
    tk.decoder = decoders.ByteLevel()

    # CONTROL tokens (<|im_end|>, ...) become special added tokens, USER_DEFINED ones (<tool_call>)
    # plain added tokens: both are then matched whole in text, as llama.cpp does. A CONTROL token
    # spelled outside the byte alphabet is a llama.cpp mislabel (transformers skips it too).
    control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    bos = token("bos_token_id")
    if add_bos and bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)

    config: dict[str, Any] = {
        "add_bos_token": add_bos,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder(tk),
        "bos_token": bos,
        "clean_up_tokenization_spaces": False,
        "eos_token": token("eos_token_id"),
        "errors": "replace",
        "model_max_length": meta.get(f"{meta.get('general.architecture')}.context_length", 32768),
        "pad_token": token("padding_token_id"),
        # The generic class: transformers then takes tokenizer.json as it is, with nothing rebuilt.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": token("unknown_token_id"),
    }
    if "tokenizer.ggml.add_eos_token" in meta:
        config["add_eos_token"] = bool(meta["tokenizer.ggml.add_eos_token"])
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tk, dict(sorted(config.items()))


# ----------------------------------------------------------------------------------------------
# Loading in place: the weights stay in their blocks, memory-mapped


def is_gguf(path: str | os.PathLike) -> bool:
    """A path that names a GGUF file (by its suffix, in any case: a folder is a checkpoint)."""
    return str(path).lower().endswith(".gguf") and not Path(path).is_dir()


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None) -> QwenForCausalLM:
    """A QwenForCausalLM over a GGUF file's weights as they are stored, memory-mapped.

    Linear layers in a block format (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, F16) become
    qwenkit.quant.QuantLinear over views of the mapped file, and a quantized token embedding a
    QuantEmbedding (the LM head, when tied, reads the same blocks); F32 and BF16 tensors are views
    too where they are in the model's dtype. Only the q and k rows of a `llama` file are copied,
    to undo the converter's permutation. The file's pages are read as the model runs (copy on
    write: the file itself never changes).

    Args:
        path: the .gguf file, or the first part of a split one.
        dtype: the activations' dtype; default float32, or bfloat16 for a file whose every weight is.
    """
    path = Path(path)
    reader = _open(path, "c")
    meta = reader.metadata
    tensors = [(path, t) for t in reader.tensors] + _other_parts(path, meta, len(reader.tensors), "c")
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for _, t in tensors}
    kinds = {t.tensor_type.name for _, t in tensors if len(t.shape) > 1}
    if dtype is None:
        dtype = torch.bfloat16 if kinds == {"BF16"} else torch.float32
    config = config_from_metadata(meta, shapes, where=str(path), torch_dtype=str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for part, tensor in tensors:
        name = _parameter_name(tensor, params, part, config)
        qtype = tensor.tensor_type.name
        shape = tuple(params[name].shape)
        if tuple(shapes[tensor.name]) != shape:
            raise GGUFError(
                f"{part}: tensor '{tensor.name}' has shape {list(shapes[tensor.name])}, the metadata asks for "
                f"{list(shape)} ({name})"
            )
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        quantized = len(shape) == 2 and qtype in BLOCK_FORMATS and (qtype != "F16" or dtype != torch.float16)
        if quantized:
            blocks = torch.from_numpy(tensor.data.reshape(shape[0], -1).view(np.uint8))  # (rows, row bytes)
            blocks = _permuted(blocks, name, config)
            if name == "model.embed_tokens.weight":
                model.model.embed_tokens = QuantEmbedding(blocks, qtype, shape[1], dtype)
            else:  # the layer's bias, where the file had it first, goes over to the new layer
                bias = module.bias if module.bias is not None and not module.bias.is_meta else None
                parent_name, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, QuantLinear(blocks, qtype, shape[1], bias))
        elif qtype in ("F32", "BF16", "F16"):
            data = tensor.data.view(np.int16) if qtype == "BF16" else tensor.data  # BF16 comes as bytes
            values = torch.from_numpy(data.reshape(shape))
            if qtype == "BF16":
                values = values.view(torch.bfloat16)
            values = _permuted(values, name, config).to(dtype)  # a view where it is already in dtype
            if isinstance(module, QuantLinear):  # a bias after its layer's blocks: QuantLinear's are fp32
                values = values.float()
            module._parameters[attr] = nn.Parameter(values, requires_grad=False)
        else:
            raise GGUFError(
                f"{part}: tensor '{tensor.name}' is stored as {qtype}, which qwenkit does not run in place "
                f"(it runs {', '.join(BLOCK_FORMATS)}, F32 and BF16); `qwenkit convert gguf {path.name} --out DIR` "
                "dequantizes any llama.cpp type into a checkpoint folder instead"
            )
        seen.add(name)
    _check_complete(params, seen, path)
    embed = model.model.embed_tokens
    if model.lm_head is None and isinstance(embed, QuantEmbedding):
        model.lm_head = embed.head  # tied: the head reads the embedding's blocks
    model.model.rotary_emb.reset_buffers("cpu")
    model.generation_config = generation_config_from_metadata(meta)
    model.quantized = any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
    model.gguf_file = path
    return model.eval()


def _permuted(t: torch.Tensor, name: str, config: QwenConfig) -> torch.Tensor:
    """A llama file's q or k rows (weights or bias, of any row format) back in Hugging Face's order."""
    if config.model_type != "llama":
        return t
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return _unpermute(t, config.num_attention_heads).contiguous()
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return _unpermute(t, config.num_key_value_heads).contiguous()
    return t


def load_gguf_tokenizer(path: str | os.PathLike):
    """The qwenkit Tokenizer a GGUF file's metadata describes (vocabulary, merges, special tokens,
    chat template), as `convert gguf` writes it into a folder."""
    path = Path(path)
    meta = _open(path).metadata
    backend, config = tokenizer_from_metadata(meta, where=str(path))
    return Tokenizer(backend, config)


__all__ = [
    "ARCHITECTURES",
    "GGUFError",
    "config_from_metadata",
    "convert_gguf",
    "is_gguf",
    "load_gguf",
    "load_gguf_tokenizer",
    "generation_config_from_metadata",
    "tokenizer_from_metadata",
]
