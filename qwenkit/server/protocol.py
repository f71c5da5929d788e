"""The OpenAI API's request bodies, validated, and its error body.

Requests are pydantic models in strict mode, so a wrong type is an error rather than a silent
coercion (`"temperature": "hot"` or `"n": true` are refused, as OpenAI refuses them); unknown
fields are ignored, as vLLM ignores them, except those that would change the output in a way this
server cannot honour (`logprobs`, `logit_bias`, `response_format` other than text...), which are
refused by name rather than dropped. Every error becomes OpenAI's body
`{"error": {"message", "type", "param", "code"}}` through `APIError`. Tool calls in the model's
replies are `tool_calls.py`'s.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwenkit.errors import QwenkitError


class APIError(QwenkitError):
    """An error answered with OpenAI's error body and an HTTP status. The request field at fault
    (`param`) is the error's `field`.

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
        super().__init__(message, field=param)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers

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
