"""GGUF files written as llama.cpp's convert_hf_to_gguf.py writes them, with the gguf package's own
writer (its tensor names from `gguf.get_tensor_name_map`, its q/k permutation for llama, its token
types): shared by test_gguf.py and test_default_model.py."""

from __future__ import annotations

import json
from pathlib import Path

import gguf  # part of the dev set-up
import numpy as np

Q = gguf.GGMLQuantizationType
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # llama.cpp's token types

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), applied to llama q/k weights."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab(size: int = 512) -> dict:
    """A small byte-level BPE vocabulary: the 256 byte characters, three merges, ChatML specials, padding."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += specials
    types = [NORMAL] * (len(tokens) - 3) + [CONTROL] * 3
    tokens += [f"[PAD{i}]" for i in range(len(tokens), size)]
    types += [UNUSED] * (size - len(types))
    ids = {t: i for i, t in enumerate(tokens)}
    return dict(
        tokens=tokens,
        types=types,
        merges=["Ġ t", "h e", "Ġt he"],
        pre="qwen2",
        bos=ids["<|endoftext|>"],
        eos=ids["<|im_end|>"],
        pad=ids["<|endoftext|>"],
        template=CHATML,
    )


def qwen_vocab(saved_tokenizer_dir: Path, size: int = 151936) -> dict:
    """The built-in Qwen2.5 tokenizer as llama.cpp's converter puts it in a GGUF: every token, the
    added ones CONTROL when special or `<|...|>`-looking and USER_DEFINED otherwise, `[PADn]` UNUSED
    rows up to the embedding size, bos/eos/pad from Qwen2.5-Instruct's config, its chat template."""
    spec = json.loads((saved_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((saved_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    types = {i: NORMAL for i in by_id}
    for added in spec["added_tokens"]:
        by_id[added["id"]] = added["content"]
        looks_special = added["content"].startswith("<|") and added["content"].endswith("|>")
        types[added["id"]] = CONTROL if added["special"] or looks_special else USER_DEFINED
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return dict(
        tokens=tokens,
        types=[types.get(i, UNUSED) for i in range(size)],
        merges=merges,
        pre="qwen2",
        bos=151643,
        eos=151645,
        pad=151643,
        template=config["chat_template"],
    )


def write_gguf(
    path: Path, model, vocab: dict, qtype=Q.F32, raw: dict | None = None, split_max_tensors: int = 0
) -> Path:
    """Write `model` (a qwenkit model, arch from its config) as llama.cpp would, 2-D weights in `qtype`.

    Args:
        raw: {gguf tensor name: (uint8 bytes (rows, row bytes), ggml type)} stored as given instead.
        split_max_tensors: split into NAME-0000i-of-0000N.gguf parts of this many tensors, as
            gguf-split does (the path returned is then part 1's).
    """
    c = model.config
    arch = c.model_type
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "llama":  # as llama.cpp's LlamaModel writes them
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(c.dim_per_head)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_pad_token_id(vocab["pad"])
    w.add_add_bos_token(False)
    w.add_chat_template(vocab["template"])

    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers
    )
    for hf_name, p in model.named_parameters():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        data = p.detach().float().numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            data = llamacpp_permute(data, c.num_attention_heads, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            data = llamacpp_permute(data, c.num_attention_heads, c.num_key_value_heads)
        if raw and name in raw:
            blob, raw_type = raw[name]
            w.add_tensor(name, blob, raw_dtype=raw_type)
        elif data.ndim == 2 and qtype != Q.F32:  # llama.cpp keeps norms and biases in F32
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    parts = sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))
    return parts[0] if split_max_tensors and parts else path


# Texts of every kind, for tokenizer comparisons.
CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   \n\n\tand tabs\r\nand CRLF",
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n\nprint(add(2, 40))\n",
    "for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }",
    "1234567890 3.14159 -42 1e-5 0x1F 2024-11-24 $1,000,000",
    "汉字和标点符号：你好，世界！今天天气很好。",
    "日本語のテキスト、한국어 텍스트, Ünïcödé façade naïve café",
    "emoji 🎉🚀👍🏽 👨‍👩‍👧 flags 🇫🇷",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|><|im_start|>",
    "don't won't I'm you'll they've she'd IT'S",
    "       ",
    "",
]
