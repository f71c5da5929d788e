"""The OpenAI API's request bodies, validated, and the pieces of its response bodies.

Requests are pydantic models in strict mode, so a wrong type is an error rather than a silent
coercion (`"temperature": "hot"` or `"n": true` are refused, as OpenAI refuses them); unknown
fields are ignored, as vLLM ignores them, except those that would change the output in a way this
server cannot honour (`logprobs`, `logit_bias`, `response_format` other than text...), which are
refused by name rather than dropped. Every error becomes OpenAI's body
`{"error": {"message", "type", "param", "code"}}` through `APIError`.

The model's Hermes-style tool calls (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`,
the format Qwen2.5's chat template asks for) are parsed into OpenAI `tool_calls` here too, by
`parse_tool_calls`, the one function both the streamed and the whole responses use.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered with OpenAI's error body and an HTTP status.

    Args:
        status: the HTTP status code.
        message: what went wrong, for a person.
        type: OpenAI's error type (invalid_request_error, authentication_error, ...).
        param: the request field at fault, if one is.
        code: a machine-readable code (context_length_exceeded, invalid_api_key, ...).
        headers: extra response headers (Retry-After on a 429).
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any]


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _Sampling(_Strict):
    """The options both endpoints share. Ranges are OpenAI's; top_k, min_p and repetition_penalty
    are vLLM's extensions (send them with the client's `extra_body`)."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(1, ge=1, le=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Accepted only in their "off" form: silently ignoring them would return something else
    # than what was asked for.
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: dict[str, Any] | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


def parse_request(cls: type[_Sampling], data: Any) -> _Sampling:
    """Validate a decoded JSON body; the first problem becomes a 400 that names its field."""
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, not {_json_type(data)}.")
    try:
        request = cls.model_validate(data)
    except ValidationError as e:
        # The deepest error is the telling one: for content [{"type": "image_url"}] it is the part's
        # type, not "expected a string", which only says the first member of the union failed.
        raise _as_api_error(max(e.errors(), key=lambda error: len(error["loc"]))) from None
    _refuse_unsupported(request)
    if request.n is None:  # an explicit null means the default, as for every other option
        request.n = 1
    return request


def _as_api_error(error: dict[str, Any]) -> APIError:
    param = _param(error["loc"])
    if error["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if error["type"].endswith("_type") or error["type"] in ("model_type", "model_attributes_type"):
        return APIError(
            400,
            f"Invalid type for '{param}': {error['msg']}, but got {_json_type(error['input'])}.",
            param=param,
            code="invalid_type",
        )
    return APIError(400, f"Invalid value for '{param}': {error['msg']}.", param=param, code="invalid_value")


# pydantic puts the member of a union it tried into the error's location ('str',
# 'list[TextPart]', 'function-after[...]'); OpenAI names only the field.
_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or any(c in part for c in "[(-"):
            continue
        else:
            out += f".{part}" if out else part
    return out


def _json_type(value: Any) -> str:
    names = {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _refuse_unsupported(request: _Sampling) -> None:
    if request.logprobs not in (None, False, 0) or request.top_logprobs not in (None, 0):
        raise APIError(400, "logprobs are not supported by this server.", param="logprobs")
    if request.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server.", param="logit_bias")
    if isinstance(request, ChatRequest):
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise APIError(
                400,
                "response_format other than text is not supported by this server (it would need constrained decoding).",
                param="response_format",
            )
    elif isinstance(request, CompletionRequest):
        if request.echo:
            raise APIError(400, "echo is not supported by this server.", param="echo")
        if request.suffix:
            raise APIError(400, "suffix is not supported by this server.", param="suffix")
        if request.best_of not in (None, request.n):
            raise APIError(400, "best_of must equal n on this server.", param="best_of")


def chat_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The messages as the chat template wants them: text content, `developer` as `system`, and
    tool-call arguments as objects (the template writes them with `tojson`)."""
    out = []
    for i, m in enumerate(request.messages):
        content = m.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        if content is None:
            if m.role != "assistant" or not m.tool_calls:
                raise APIError(
                    400,
                    f"Missing required parameter: 'messages[{i}].content'.",
                    param=f"messages[{i}].content",
                    code="missing_required_parameter",
                )
            content = ""
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.role == "assistant" and m.tool_calls:
            message["tool_calls"] = [
                {
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments, f"messages[{i}]"),
                    },
                }
                for call in m.tool_calls
            ]
        out.append(message)
    return out


def _arguments(arguments: str | dict[str, Any], where: str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise APIError(
            400,
            f"Invalid value for '{where}.tool_calls': function arguments must be a JSON object.",
            param=f"{where}.tool_calls",
        )
    return value


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
        return "<tool_call>\n"
    names = [t.function.name for t in request.tools]
    if choice.function.name not in names:
        raise APIError(
            400,
            f"tool_choice names the function {choice.function.name!r}, which is not among the "
            f"tools ({', '.join(names)}).",
            param="tool_choice",
        )
    return '<tool_call>\n{"name": ' + json.dumps(choice.function.name) + ', "arguments": '


def parses_tools(request: ChatRequest) -> bool:
    return bool(request.tools) and request.tool_choice != "none"


TOOL_CALL_START = "<tool_call>"
# A call runs to its closing tag, or to the end of the text when the model stopped without one.
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)


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
