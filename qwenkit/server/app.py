"""The OpenAI-compatible HTTP API over the engine: FastAPI, served by uvicorn.

POST /v1/chat/completions and /v1/completions, GET /v1/models, /v1/models/{id} and /health.
A call is validated (protocol.py), rendered and tokenized, split into `n` engine requests, and
answered whole or as server-sent events ending with `data: [DONE]`, its tool calls parsed by
tool_calls.py. Every error answers with OpenAI's error body; the server goes on serving.

The engine runs on its own thread; each call gets its outputs through an asyncio queue, filled
on the event loop by one wake-up per engine step (`_Mailbox`). When a client goes away (a closed stream, or a dropped
connection while a whole answer is being made) the call's engine requests are cancelled, which
frees their rows at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from qwenkit.errors import ContextLengthError
from qwenkit.generate import SamplingParams, check_fits
from qwenkit.server.engine import Engine, Output, QueueFull, Request
from qwenkit.server.protocol import APIError, ChatRequest, CompletionRequest, chat_messages, parse_request
from qwenkit.server.tool_calls import ToolCallWatch, parse_tool_calls, parses_tools, tool_prefix

DEFAULT_MAX_BODY = 4 * 2**20


def create_app(
    engine: Engine, model_name: str, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY
) -> FastAPI:
    """The FastAPI app; it starts the engine's loop on startup and stops it on shutdown.

    Args:
        engine: the engine (its model and tokenizer serve every call).
        model_name: the one model id this server answers to (GET /v1/models, the `model` field).
        api_key: if set, /v1/ calls need `Authorization: Bearer <api_key>` (401 otherwise).
        max_body_bytes: larger request bodies are refused with 413.
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="qwenkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    if api_key:
        app.add_middleware(_RequireKey, api_key=api_key)
    api = _API(engine, model_name, max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):  # unknown path (404), wrong method (405)
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request, e: Exception):
        return JSONResponse(
            APIError(500, f"Internal server error: {type(e).__name__}", "server_error").body(), status_code=500
        )

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "active": engine.active,
            "waiting": engine.waiting,
            "max_batch": engine.max_batch,
            "max_queue": engine.max_queue,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [api.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        api.check_model(model_id, param=None)
        return api.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await api.chat(http)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await api.complete(http)

    return app


class _RequireKey:
    """ASGI middleware: /v1/ calls need the API key, checked before the body is read."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization")
            if given is None or not hmac.compare_digest(given, self.expected):
                message = (
                    "You didn't provide an API key: pass it as 'Authorization: Bearer KEY'."
                    if given is None
                    else "Incorrect API key provided."
                )
                response = JSONResponse(
                    APIError(401, message, code="invalid_api_key").body(),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _Mailbox:
    """Hands outputs from the engine's thread to the event loop, waking the loop once for all the
    outputs of a step rather than once per request (32 wake-ups a step add up under load)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, Any]] = []
        self.lock = threading.Lock()

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.items.append((queue, item))
            if len(self.items) > 1:  # a wake-up is already on its way
                return
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


class _Run:
    """The engine requests of one API call, their outputs delivered to this call's event loop."""

    def __init__(
        self, engine: Engine, mailbox: _Mailbox, prompts: list[list[int]], params: list[SamplingParams], stop: list[str]
    ):
        self.engine = engine
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.requests = [
            Request(prompt, p, stop, functools.partial(self._deliver, mailbox, i))
            for i, (prompt, p) in enumerate(zip(prompts, params))
        ]

    def _deliver(self, mailbox: _Mailbox, index: int, out: Output) -> None:
        mailbox.post(self.queue, (index, out))  # called on the engine's thread

    def submit(self) -> None:
        capacity = self.engine.max_batch + self.engine.max_queue
        if len(self.requests) > capacity:  # a 429 would invite retrying what can never fit
            raise APIError(
                400,
                f"This call asks for {len(self.requests)} sequences (prompts x n); this server "
                f"runs and queues at most {capacity}.",
                param="n",
            )
        try:
            self.engine.submit(self.requests)
        except QueueFull as e:
            raise APIError(
                429,
                f"The server is busy ({e}); retry shortly.",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from None

    async def outputs(self) -> AsyncIterator[dict[int, Output]]:
        """Each choice's news, as it arrives; outputs queued since the last yield come merged, so a
        slow reader gets fewer, larger events rather than falling behind."""
        pending = len(self.requests)
        while pending:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            merged: dict[int, Output] = {}
            for i, out in items:
                if i in merged:
                    out = dataclasses.replace(out, text=merged[i].text + out.text)
                merged[i] = out
                pending -= out.finish_reason is not None
            yield merged

    def cancel(self) -> None:
        for r in self.requests:
            if not r.finished:
                self.engine.cancel(r)


class _EventStream(StreamingResponse):
    """Server-sent events whose engine requests are cancelled however the response ends: finished,
    client gone (Starlette cancels the body iterator on http.disconnect), or failed."""

    def __init__(self, events: AsyncIterator[dict[str, Any]], run: _Run):
        super().__init__(
            _sse(events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.run = run

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for event in events:
        yield b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


class _API:
    def __init__(self, engine: Engine, model_name: str, max_body_bytes: int):
        self.engine, self.tok, self.model_name = engine, engine.tok, model_name
        self.max_body = max_body_bytes
        self.created = int(time.time())
        self._mailbox: _Mailbox | None = None

    def mailbox(self) -> _Mailbox:
        loop = asyncio.get_running_loop()  # the server's loop: the same for every call
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        return self._mailbox

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "qwenkit",
            "max_model_len": self.engine.max_len,
        }

    def check_model(self, name: str, param: str | None = "model") -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                param=param,
                code="model_not_found",
            )

    async def read_json(self, http: HTTPRequest) -> Any:
        length = http.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise self._too_large(int(length))
        body = bytearray()
        async for chunk in http.stream():  # a chunked body has no length to check up front
            body += chunk
            if len(body) > self.max_body:
                raise self._too_large(len(body))
        try:
            return json.loads(body, parse_constant=_no_constant)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise APIError(400, f"The request body is not valid JSON: {e}.", code="invalid_json") from None

    def _too_large(self, size: int) -> APIError:
        return APIError(
            413,
            f"The request body is {size} bytes or more; this server accepts at most {self.max_body}.",
            code="request_too_large",
        )

    def sampling(self, request, prompt_len: int, max_tokens: int | None, what: str) -> list[SamplingParams]:
        """Each choice's parameters: the checkpoint's generation_config.json, then the request's
        (`SamplingParams.from_model` holds the temperature rule); a seeded call gives choice i the
        seed + i, so that its n choices differ yet reproduce."""
        limit = self.engine.max_len
        try:
            check_fits(prompt_len, limit)
        except ContextLengthError:  # the one context rule, answered in OpenAI's words, which clients match
            raise _context_exceeded(limit, f"your {what} resulted in {prompt_len} tokens", what, what) from None
        if max_tokens is not None and prompt_len + max_tokens > limit:  # OpenAI's rule for max_tokens
            asked = (
                f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the {what}, "
                f"{max_tokens} in the completion)"
            )
            raise _context_exceeded(limit, asked, f"{what} or completion", "max_tokens")
        overrides = {
            k: getattr(request, k)
            for k in (
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "repetition_penalty",
                "presence_penalty",
                "frequency_penalty",
                "seed",
            )
        }
        params = SamplingParams.from_model(
            self.engine.model, max_new_tokens=max_tokens or limit - prompt_len, **overrides
        )
        if params.seed is None:
            return [params] * request.n
        return [dataclasses.replace(params, seed=params.seed + i) for i in range(request.n)]

    async def chat(self, http: HTTPRequest) -> Response:
        request: ChatRequest = parse_request(ChatRequest, await self.read_json(http))
        self.check_model(request.model)
        messages = chat_messages(request)
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
        prefix = tool_prefix(request)
        try:  # rendering and tokenizing is CPU work: off the event loop
            prompt = await asyncio.to_thread(
                self.tok.apply_chat_template, messages, tools=tools, add_generation_prompt=True
            )
        except Exception as e:  # the template's own raise_exception, or content it cannot render
            raise APIError(400, f"The chat template could not render these messages: {e}", param="messages") from None
        if prefix:
            prompt = prompt + self.tok.encode(prefix)
        n = request.n
        params = self.sampling(request, len(prompt), request.max_completion_tokens or request.max_tokens, "messages")
        run = _Run(self.engine, self.mailbox(), [prompt] * n, params, request.stops())
        run.submit()
        tools_on = parses_tools(request)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if request.stream:
            events = _chat_events(run, head, len(prompt), tools_on, prefix, request.include_usage())
            return _EventStream(events, run)
        outs = await _collect(http, run)
        if outs is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        choices = []
        for i, (text, finish, _) in enumerate(outs):
            message: dict[str, Any] = {"role": "assistant", "content": prefix + text}
            if tools_on:
                content, calls = parse_tool_calls(prefix + text)
                if calls:
                    message, finish = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": finish})
        return JSONResponse(
            {
                **head,
                "object": "chat.completion",
                "choices": choices,
                "usage": _usage(len(prompt), sum(t for _, _, t in outs)),
            }
        )

    async def complete(self, http: HTTPRequest) -> Response:
        request: CompletionRequest = parse_request(CompletionRequest, await self.read_json(http))
        self.check_model(request.model)
        prompts = await asyncio.to_thread(self._prompts, request.prompt)
        max_tokens = 16 if request.max_tokens is None else request.max_tokens  # OpenAI's default here
        all_prompts, all_params = [], []
        for prompt in prompts:
            all_params += self.sampling(request, len(prompt), max_tokens, "prompt")
            all_prompts += [prompt] * request.n
        run = _Run(self.engine, self.mailbox(), all_prompts, all_params, request.stops())
        run.submit()
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        prompt_tokens = sum(map(len, prompts))
        if request.stream:
            return _EventStream(_completion_events(run, head, prompt_tokens, request.include_usage()), run)
        outs = await _collect(http, run)
        if outs is None:
            return Response(status_code=499)
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            for i, (text, finish, _) in enumerate(outs)
        ]
        return JSONResponse({**head, "choices": choices, "usage": _usage(prompt_tokens, sum(t for _, _, t in outs))})

    def _prompts(self, prompt: str | list) -> list[list[int]]:
        """A completion's prompts as token ids: a string, strings, token ids, or lists of them."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "Invalid value for 'prompt': no prompt given.", param="prompt")
        out = []
        vocab = self.engine.model.config.vocab_size
        for p in prompt:
            ids = self.tok.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(
                    400,
                    "Invalid value for 'prompt': a prompt is empty (this model has no "
                    "beginning-of-text token to start from).",
                    param="prompt",
                )
            if not all(0 <= t < vocab for t in ids):
                raise APIError(400, f"Invalid value for 'prompt': token ids must be in [0, {vocab}).", param="prompt")
            out.append(ids)
        return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _context_exceeded(limit: int, asked: str, reduce: str, param: str) -> APIError:
    return APIError(
        400,
        f"This model's maximum context length is {limit} tokens. However, {asked}. "
        f"Please reduce the length of the {reduce}.",
        param=param,
        code="context_length_exceeded",
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _server_error(out: Output) -> APIError:
    return APIError(500, f"Generation failed: {out.error}", "server_error")


async def _collect(http: HTTPRequest, run: _Run) -> list[tuple[str, str, int]] | None:
    """Every choice's (text, finish_reason, tokens); None if the client disconnects first (the
    run is then cancelled)."""

    async def gather():
        texts, finish, tokens = [""] * len(run.requests), [""] * len(run.requests), [0] * len(run.requests)
        async for merged in run.outputs():
            for i, out in merged.items():
                if out.error:
                    raise _server_error(out)
                texts[i] += out.text
                tokens[i] = out.tokens
                if out.finish_reason:
                    finish[i] = out.finish_reason
        return list(zip(texts, finish, tokens))

    async def disconnected():
        while (await http.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        return work.result() if work.done() else None
    finally:
        for task in (work, gone):
            task.cancel()
        run.cancel()


async def _stream(
    run: _Run,
    head: dict,
    prompt_tokens: int,
    include_usage: bool,
    events: Callable[[int, Output], Iterable[dict[str, Any]]],
) -> AsyncIterator[dict[str, Any]]:
    """A streamed run's events: `events(i, out)` for each output of choice i (choices in order within
    an engine step), an error body for a failed choice, and the usage chunk last if asked for. The
    events carry `head` (id, object, created, model)."""
    tokens = [0] * len(run.requests)
    async for merged in run.outputs():
        for i, out in sorted(merged.items()):
            if out.error:
                yield _server_error(out).body()
                continue
            tokens[i] = out.tokens
            for event in events(i, out):
                yield event
    if include_usage:
        yield {**head, "choices": [], "usage": _usage(prompt_tokens, sum(tokens))}


async def _chat_events(
    run: _Run, head: dict, prompt_tokens: int, tools_on: bool, prefix: str, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed chat completion: the role first, then content deltas; with tools,
    text inside a tool call is held back and the calls are sent when the choice finishes."""
    head = {**head, "object": "chat.completion.chunk"}
    watches = [ToolCallWatch(prefix) if tools_on else None for _ in run.requests]

    def chunk(i: int, delta: dict, finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def events(i: int, out: Output) -> Iterator[dict[str, Any]]:
        text = watches[i].feed(out.text) if watches[i] else out.text
        if text:
            yield chunk(i, {"content": text})
        if out.finish_reason is None:
            return
        finish = out.finish_reason
        if watches[i]:
            rest, calls = watches[i].finish()
            if rest:
                yield chunk(i, {"content": rest})
            if calls:
                finish = "tool_calls"
                yield chunk(i, {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]})
        yield chunk(i, {}, finish)

    for i in range(len(run.requests)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for event in _stream(run, head, prompt_tokens, include_usage, events):
        yield event


def _completion_events(run: _Run, head: dict, prompt_tokens: int, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed completion: each choice's text as it comes, and its finish reason."""

    def events(i: int, out: Output) -> Iterator[dict[str, Any]]:
        if out.text or out.finish_reason:
            yield {
                **head,
                "choices": [{"index": i, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}],
            }

    return _stream(run, head, prompt_tokens, include_usage, events)
