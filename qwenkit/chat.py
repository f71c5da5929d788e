"""Chat rendering with the checkpoint's own jinja template, and the assistant mask for fine-tuning.

Templates are untrusted code from checkpoint folders, so they run in jinja2's immutable sandbox,
with the helpers transformers gives them (`raise_exception`, `tojson`, `strftime_now`, the special
tokens as variables) so that a template renders here exactly as it does there.

`encode_chat` returns a conversation's ids with a mask of the tokens the model must learn: each
assistant turn's content and its closing `<|im_end|>`. Qwen2.5's template has no
`{% generation %}` markers, so the mask is derived from the renderer itself, by rendering the
conversation's prefixes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from qwenkit.tokenizer import BatchEncoding, Tokenizer


class _GenerationBlock(jinja2.ext.Extension):
    # `{% generation %}...{% endgeneration %}` (assistant markers some fine-tuning templates carry)
    # renders its body unchanged: the mask here comes from prefixes, not from markers.
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    # transformers' filter: jinja's own escapes HTML characters and would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not compile: {e.message} (template line {e.lineno})") from e


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts with 'role' and 'content', not {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', not {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] has no string 'role': {dict(m)!r}")
        content = m.get("content")
        if content is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise ValueError(f"messages[{i}] ({m['role']}) has no 'content'")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(
                f"messages[{i}] content must be a string (or a list of parts), not {type(content).__name__}"
            )
        # As transformers does: a None value is a missing key, so templates test it with `is defined`.
        checked.append({k: v for k, v in m.items() if v is not None})
    return checked


def _render(
    tok: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    add_generation_prompt: bool,
    chat_template: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    checked = _check_messages(messages)
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise TypeError("tools must be a list of dicts (JSON schemas)")
    variables = {"bos_token": tok.bos_token or "", "eos_token": tok.eos_token or "", **(extra or {})}
    try:
        return _compile(chat_template or tok.chat_template).render(
            messages=checked, tools=tools, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from e


def apply_chat_template(
    tok: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    tokenize: bool = True,
    chat_template: str | None = None,
    return_tensors: str | None = None,
    return_dict: bool = False,
    **extra: Any,
) -> str | list[int] | torch.Tensor | BatchEncoding:
    """Render (and tokenize) a conversation with the tokenizer's chat template.

    Args:
        tok: the tokenizer; its `chat_template` is the checkpoint's own, else Qwen2.5-7B-Instruct's.
        messages: dicts with "role" ("system", "user", "assistant", "tool") and "content";
            assistant turns may carry "tool_calls" ([{"function": {"name", "arguments"}}]).
        tools: JSON schemas of callable tools, or None.
        add_generation_prompt: end with `<|im_start|>assistant\\n` so that the model answers.
        tokenize: return ids (True) or the text (False).
        chat_template: a template to use instead of the tokenizer's.
        return_tensors: with tokenize, None for a list of ids or "pt" for a (1, T) LongTensor.
        return_dict: with tokenize, return `input_ids` and `attention_mask` (as `tok(text)` does)
            instead of the ids alone.
        **extra: more template variables (e.g. a template's own flags).
    """
    text = _render(tok, messages, tools, add_generation_prompt, chat_template, extra)
    if not tokenize:
        return text
    if return_dict:
        return tok(text, return_tensors=return_tensors)
    return tok.encode(text, return_tensors=return_tensors)


def encode_chat(
    tok: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    chat_template: str | None = None,
) -> tuple[list[int], list[int]]:
    """Ids of a whole conversation and its assistant mask, for fine-tuning.

    The mask is 1 on each assistant turn's content (tool calls included) and the special token that
    closes it (`<|im_end|>`), 0 elsewhere: the system and user turns, tool results, the
    `<|im_start|>assistant\\n` headers and the newline after `<|im_end|>`. The ids are those of
    `apply_chat_template(messages, tools)`.

    Args:
        tok: the tokenizer.
        messages: the conversation, as for `apply_chat_template`.
        tools: JSON schemas of callable tools, or None.
        chat_template: a template to use instead of the tokenizer's.
    """
    text = _render(tok, messages, tools, False, chat_template)
    # Each assistant turn's text is what rendering messages[:i+1] adds to messages[:i] with the
    # generation prompt: exactly what the model writes when asked to answer after messages[:i].
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        if i == 0:
            raise ValueError("messages[0] is an assistant turn: encode_chat needs a turn before it")
        before = _render(tok, messages[:i], tools, True, chat_template)
        through = _render(tok, messages[: i + 1], tools, False, chat_template)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                f"the chat template renders messages[{i}] differently depending on what follows it, "
                "so its assistant tokens cannot be found"
            )
        spans.append((len(before), len(through)))

    encoding = tok._encode_with_offsets(text)
    ids = encoding.ids
    special = set(tok.all_special_ids)
    mask = [0] * len(ids)
    t = 0
    for start, end in spans:
        # Tokens overlapping the span (a token may straddle its start when the content begins with
        # whitespace that merges with the header's newline; it is kept, as transformers does).
        while t < len(ids) and encoding.offsets[t][1] <= start:
            t += 1
        first = t
        while t < len(ids) and encoding.offsets[t][0] < end:
            t += 1
        # The turn's text ends with the template's glue after the closing special token ("\n"):
        # the model never writes that, so it is not learned.
        last = max((j for j in range(first, t) if ids[j] in special), default=t - 1)
        mask[first : last + 1] = [1] * (last + 1 - first)
    return ids, mask
