"""Chat rendering with the checkpoint's own jinja template, and where the assistant's text is.

Templates are untrusted code from checkpoint folders, so they run in jinja2's immutable sandbox,
with the helpers transformers gives them (`raise_exception`, `tojson`, `strftime_now`, the special
tokens as variables) so that a template renders here exactly as it does there.

`ChatTemplate` works on text only and knows no tokenizer: `render` gives the prompt, and
`assistant_spans` the character spans of each assistant turn, from which the tokenizer
(`Tokenizer.encode_chat`) makes the fine-tuning mask. Qwen2.5's template has no `{% generation %}`
markers, so the spans come from the renderer itself, by rendering the conversation's prefixes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


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


class ChatTemplate:
    """A checkpoint's chat template, compiled once, with the special tokens it may name.

    Args:
        template: the jinja source (tokenizer_config.json's `chat_template`).
        bos_token, eos_token: what the template's `bos_token` and `eos_token` variables hold.
    """

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        self.template = _compile(template)
        self.variables = {"bos_token": bos_token, "eos_token": eos_token}

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        **extra: Any,
    ) -> str:
        """The conversation as the model reads it.

        Args:
            messages: dicts with "role" ("system", "user", "assistant", "tool") and "content";
                assistant turns may carry "tool_calls" ([{"function": {"name", "arguments"}}]).
            tools: JSON schemas of callable tools, or None.
            add_generation_prompt: end with `<|im_start|>assistant\\n` so that the model answers.
            **extra: more template variables (e.g. a template's own flags).
        """
        checked = _check_messages(messages)
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise TypeError("tools must be a list of dicts (JSON schemas)")
        try:
            return self.template.render(
                messages=checked, tools=tools, add_generation_prompt=add_generation_prompt, **self.variables, **extra
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template failed: {e}") from e

    def assistant_spans(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation, and the [start, end) character span of each assistant turn in it.

        Each turn's text is what rendering messages[:i+1] adds to messages[:i] with the generation
        prompt: exactly what the model writes when asked to answer after messages[:i] (its content,
        tool calls included, its closing special token and the template's glue after it).
        """
        text = self.render(messages, tools)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            if i == 0:
                raise ValueError("messages[0] is an assistant turn: encode_chat needs a turn before it")
            before = self.render(messages[:i], tools, add_generation_prompt=True)
            through = self.render(messages[: i + 1], tools)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    f"the chat template renders messages[{i}] differently depending on what follows it, "
                    "so its assistant tokens cannot be found"
                )
            spans.append((len(before), len(through)))
        return text, spans
