"""Text cleaning on the way in and out of the model: untrusted text without the special tokens'
spellings (in), and replies without the chatty lead-in models put before the content (out)."""

from __future__ import annotations

import re

from qwenkit.tokenizer import Tokenizer


def strip_special_tokens(tok: Tokenizer, text: str) -> str:
    """Untrusted text (documents, rows of a data file) without the special tokens' spellings, so that
    a document holding `<|im_end|>` cannot close its turn and forge another when the rendered prompt
    is tokenized."""
    for special in tok.all_special_tokens:
        text = text.replace(special, "")
    return text


_PREAMBLE = re.compile(
    r"^\s*(sure|certainly|of course|okay|ok|absolutely|here('s| is| are)|below is|the (following|translation)"
    r"|translation|translated)\b",
    re.IGNORECASE,
)
_ACKNOWLEDGEMENT = re.compile(r"\s*(sure|certainly|of course|okay)[!.,]?\s*", re.IGNORECASE)


def strip_preamble(reply: str) -> str:
    """A reply without the chatty lead-in models put before the content ("Sure! Here's the ...:")."""
    lines = reply.strip().splitlines()
    while len(lines) > 1 and (
        not lines[0].strip()
        or (_PREAMBLE.match(lines[0]) and lines[0].rstrip().endswith(":"))
        or _ACKNOWLEDGEMENT.fullmatch(lines[0])
    ):
        lines.pop(0)
    return "\n".join(lines).strip()
