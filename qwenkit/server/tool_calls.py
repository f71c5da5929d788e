"""Hermes-style tool calls, the format Qwen2.5's chat template asks for, as OpenAI `tool_calls`.

The model writes `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks in its reply.
`parse_tool_calls` turns a whole reply into content and calls (the one parser, for whole and
streamed answers alike); `ToolCallWatch` streams a reply's content while holding back everything
from `<tool_call>` on, to be parsed when the reply ends; `tool_prefix` opens the call in the prompt
when `tool_choice` asks for one.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from qwenkit.server.protocol import APIError, ChatRequest
from qwenkit.text import StopMatcher

TOOL_CALL_START = "<tool_call>"
# A call runs to its closing tag, or to the end of the text when the model stopped without one.
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)


def parses_tools(request: ChatRequest) -> bool:
    """Whether the reply is read for tool calls: the request offers tools and does not forbid them."""
    return bool(request.tools) and request.tool_choice != "none"


def tool_prefix(request: ChatRequest) -> str:
    """Text the reply is made to start with: `tool_choice` "required" or a named function opens the
    tool call in the prompt, so the model can only go on with it. (Without constrained decoding
    the arguments are still the model's own.) Also checks tool_choice against tools."""
    choice = request.tool_choice
    if choice in (None, "none", "auto"):
        return ""
    if not request.tools:
        raise APIError(400, "tool_choice needs tools.", param="tool_choice")
    if choice == "required":
        return TOOL_CALL_START + "\n"
    names = [t.function.name for t in request.tools]
    if choice.function.name not in names:
        raise APIError(
            400,
            f"tool_choice names the function {choice.function.name!r}, which is not among the "
            f"tools ({', '.join(names)}).",
            param="tool_choice",
        )
    return TOOL_CALL_START + '\n{"name": ' + json.dumps(choice.function.name) + ', "arguments": '


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split Qwen's reply into content and OpenAI `tool_calls`.

    Each `<tool_call>` block must hold a JSON object with a string "name" and "arguments" (an
    object, or a string of one); if any block does not, nothing is parsed and the whole text stays
    content, as vLLM's Hermes parser does: a half call is shown, never half-executed.

    Returns:
        (content outside the calls, or None when there is none; the calls).
    """
    if TOOL_CALL_START not in text:
        return text, []
    calls = []
    for match in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call["name"], "arguments": arguments},
            }
        )
    content = _TOOL_CALL.sub("", text).strip()
    return content or None, calls


class ToolCallWatch:
    """Streams a reply's content, but holds back everything from `<tool_call>` on (even a partial
    `<tool_` that may become one), to be parsed into tool_calls when the reply ends.

    Args:
        prefix: the text `tool_prefix` put in the prompt; when given, the reply is inside a call
            from its first token.
    """

    def __init__(self, prefix: str = ""):
        self.matcher = StopMatcher([TOOL_CALL_START])
        self.seen, self.sent = "", 0
        self.held: str | None = prefix or None  # a forced prefix is a call already opened

    def feed(self, text: str) -> str:
        """Add a delta of the reply; return the content safe to send now."""
        if self.held is not None:
            self.held += text
            return ""
        self.seen += text
        safe, hit = self.matcher.feed(text)
        self.sent += len(safe)
        if hit:
            self.held = self.seen[self.sent :]
        return safe

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still to send, tool calls)."""
        if self.held is None:
            return self.matcher.flush(), []
        content, calls = parse_tool_calls(self.held)
        return (content or "", calls) if calls else (self.held, [])
