"""The OpenAI-compatible server, live on 127.0.0.1 (a free port) and driven by the official `openai`
client: chat (whole and streamed), completions, models, tool calls, every bad-input answer, outputs
equal to `model.generate`, concurrent streams under load, and cancelled clients leaving no row held.

Two tiny checkpoints are written per module: a random one, and a scripted one whose weights make
it say fixed texts (so that a real tool call comes out of the real engine, deterministically).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import uvicorn
from reference import random_model, tiny_config

import qwenkit
from qwenkit.checkpoint import default_generation_config
from qwenkit.errors import ContextLengthError, QwenkitError
from qwenkit.generate import SamplingParams
from qwenkit.server.app import create_app
from qwenkit.server.engine import Engine, QueueFull, Request, wait_idle
from qwenkit.server.protocol import APIError
from qwenkit.server.tool_calls import ToolCallWatch, parse_tool_calls
from qwenkit.text import TextStream

KEY = "test-key"
MODEL = "tiny"
ERROR_KEYS = {"message", "type", "param", "code"}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# What the scripted model says after a chat prompt (which ends "assistant\n"), after "Say:", and
# after a call opened for it by a named tool_choice (which ends '"arguments": ').
TOOL_REPLY = 'Let me check.<tool_call>{"name":"get_weather","arguments":{"city": "Paris"}}</tool_call><|im_end|>'
SAY_REPLY = "Hello there, general Kenobi!<|im_end|>"
ARGUMENTS_REPLY = "{}}</tool_call><|im_end|>"


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory, tok_qwen):
    """A tiny random checkpoint with an untied head at ten times the init scale: its logits spread
    (std ~1.6), so greedy text varies and no pick is near a tie (at init scale the tiny model
    repeats one token, which would make "equal outputs" a weak check)."""
    out = tmp_path_factory.mktemp("random")
    model = random_model(tiny_config(vocab_size=151936, tie_word_embeddings=False), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model.generation_config = default_generation_config(model.config)  # Qwen2.5-Instruct's sampling defaults
    model.save_pretrained(out)
    tok_qwen.save_pretrained(out)
    return out


def scripted_checkpoint(out, tok, scripts: dict[int, str]):
    """A checkpoint whose next token depends only on the current one, wired to continue each start
    token with its script. Attention and MLP outputs are zeroed, so the last hidden state is the
    normed embedding of the current token; each token of a script gets its own basis direction
    and the head maps that direction to the next token with a logit far above the rest."""
    model = random_model(tiny_config(vocab_size=151936, tie_word_embeddings=False), seed=1)
    nexts: dict[int, int] = {}
    for start, text in scripts.items():
        ids = [start] + tok.encode(text)
        for a, b in zip(ids, ids[1:]):
            assert nexts.setdefault(a, b) == b, f"token {a} would need two successors"
    assert len(nexts) <= model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        for d, (a, b) in enumerate(nexts.items()):
            model.model.embed_tokens.weight[a] = 0.0
            model.model.embed_tokens.weight[a, d] = 1.0
            model.lm_head.weight[b, d] += 10.0
    model.generation_config = default_generation_config(model.config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory, tok_qwen):
    chat_end = tok_qwen.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)[-1]
    say_end = tok_qwen.encode("Say:")[-1]
    arguments_end = tok_qwen.encode('"arguments": ')[-1]
    scripts = {chat_end: TOOL_REPLY, say_end: SAY_REPLY, arguments_end: ARGUMENTS_REPLY}
    return scripted_checkpoint(tmp_path_factory.mktemp("scripted"), tok_qwen, scripts)


@contextmanager
def running(
    model_dir,
    api_key: str | None = KEY,
    max_batch: int = 8,
    max_queue: int = 32,
    max_model_len: int = 512,
    max_body_bytes: int = 256 * 1024,
):
    """A real uvicorn server on 127.0.0.1, port chosen by the OS, in a thread of this process (so
    that the test can look at its engine)."""
    model, tok = qwenkit.load_model(model_dir), qwenkit.load_tokenizer(model_dir)
    engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len)
    app = create_app(engine, MODEL, api_key=api_key, max_body_bytes=max_body_bytes)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        yield SimpleNamespace(
            url=url,
            engine=engine,
            model=model,
            tok=tok,
            client=openai.OpenAI(base_url=url + "/v1", api_key=api_key or "none", max_retries=0, timeout=60),
        )
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def srv(random_dir):
    with running(random_dir) as s:
        yield s


@pytest.fixture(scope="module")
def scripted(scripted_dir):
    with running(scripted_dir) as s:
        yield s


def chat_ids(tok, messages, tools=None) -> list[int]:
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True)


def generate_text(s, ids: list[int], **kwargs) -> tuple[str, int]:
    """The reference: `model.generate` on the prompt alone; (text, number of new tokens)."""
    new = s.model.generate(torch.tensor([ids]), **kwargs)[0, len(ids) :]
    return s.tok.decode(new, skip_special_tokens=True), len(new)


# ---- the API, whole and streamed -------------------------------------------------------------------


def test_models_and_health(srv):
    assert [m.id for m in srv.client.models.list().data] == [MODEL]
    assert srv.client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(srv.url + "/health")  # no key needed: load balancers probe it
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_chat_greedy_equals_generate(srv):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    r = srv.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    ids = chat_ids(srv.tok, messages)
    text, n_new = generate_text(srv, ids, max_new_tokens=20, do_sample=False)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text and len(set(text)) > 5
    assert choice.finish_reason == ("length" if n_new == 20 else "stop")
    usage = r.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), n_new, len(ids) + n_new)
    assert r.model == MODEL and r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_stream_equals_whole(srv):
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = srv.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    chunks = list(
        srv.client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_stream_is_server_sent_events_ending_with_done(srv):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST", srv.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_seeded_sampling_equals_generate(srv):
    """Per-request sampling parameters and seed reach the engine: the same draws as `generate`."""
    messages = [{"role": "user", "content": "Pick a word."}]
    options = dict(temperature=0.9, top_p=0.95, presence_penalty=0.5, frequency_penalty=0.3, seed=7)
    r = srv.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, **options)
    text, _ = generate_text(srv, chat_ids(srv.tok, messages), max_new_tokens=24, do_sample=True, **options)
    assert r.choices[0].message.content == text
    again = srv.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, **options)
    assert again.choices[0].message.content == text


def test_n_choices(srv):
    r = srv.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, n=3, temperature=1.0, seed=1
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # seed + i per choice: they differ
    assert r.usage.completion_tokens == 3 * 8


def test_completion_greedy_equals_generate(srv):
    r = srv.client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    text, n_new = generate_text(srv, srv.tok.encode("Once upon a time"), max_new_tokens=12, do_sample=False)
    assert r.object == "text_completion" and r.choices[0].text == text
    assert r.usage.completion_tokens == n_new
    # Several prompts, n each: prompt-major indexes, each prompt as if alone; token-id prompts too.
    many = srv.client.completions.create(
        model=MODEL, prompt=["The quick brown fox", "Once upon a time"], max_tokens=12, temperature=0, n=2
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.text for c in many.choices][2:] == [text, text]
    ids = srv.tok.encode("The quick brown fox")
    alone, _ = generate_text(srv, ids, max_new_tokens=12, do_sample=False)
    assert many.choices[0].text == many.choices[1].text == alone
    by_ids = srv.client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == many.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    streamed = srv.client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text


def test_concurrent_requests_each_equal_generate(srv):
    """Requests that join and leave a running batch (different prompt and output lengths) get
    exactly what they get alone."""
    prompts = [[{"role": "user", "content": "word " * k}] for k in (1, 7, 3, 12, 5)]
    lengths = [5, 30, 12, 20, 8]
    out = [None] * len(prompts)

    def ask(i):
        out[i] = (
            srv.client.chat.completions.create(model=MODEL, messages=prompts[i], max_tokens=lengths[i], temperature=0)
            .choices[0]
            .message.content
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join()
    for i, messages in enumerate(prompts):
        assert out[i] == generate_text(srv, chat_ids(srv.tok, messages), max_new_tokens=lengths[i], do_sample=False)[0]


# ---- tool calls and stop strings (the scripted model) ------------------------------------------------


def test_tool_call_end_to_end(scripted):
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = scripted.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # The tools reached the prompt in the template's own format.
    assert r.usage.prompt_tokens == len(chat_ids(scripted.tok, messages, tools=[WEATHER_TOOL]))

    chunks = list(
        scripted.client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=40, stream=True
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert content == "Let me check." and "<tool" not in content
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The call goes back as an assistant turn with its result: the template renders both.
    follow = messages + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    again = scripted.client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER_TOOL], max_tokens=40)
    assert again.usage.prompt_tokens == len(
        chat_ids(
            scripted.tok,
            [
                messages[0],
                {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                    ],
                },
                {"role": "tool", "content": '{"temp_c": 21}'},
            ],
            tools=[WEATHER_TOOL],
        )
    )


def test_tool_choice_none_leaves_text(scripted):
    r = scripted.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_tokens=40,
    )
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == TOOL_REPLY.removesuffix("<|im_end|>")


def test_named_tool_choice_opens_the_call(scripted):
    """tool_choice naming a function starts the reply inside that call; the model writes the
    arguments (here the scripted `{}`), and the server parses the whole call."""
    choice = {"type": "function", "function": {"name": "get_weather"}}
    messages = [{"role": "user", "content": "hi"}]
    r = scripted.client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice=choice, max_tokens=10
    )
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {})
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    opened = '<tool_call>\n{"name": "get_weather", "arguments": '
    assert r.usage.prompt_tokens == len(chat_ids(scripted.tok, messages, [WEATHER_TOOL]) + scripted.tok.encode(opened))
    chunks = list(
        scripted.client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice=choice, max_tokens=10, stream=True
        )
    )
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert [tc.function.name for tc in calls] == ["get_weather"] and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_stop_strings_and_length(scripted):
    said = SAY_REPLY.removesuffix("<|im_end|>")
    ask = lambda **kw: scripted.client.completions.create(model=MODEL, prompt="Say:", **kw).choices[0]
    full = ask(max_tokens=20)
    assert (full.text, full.finish_reason) == (said, "stop")  # stopped by the end-of-turn token
    cut = ask(max_tokens=20, stop=["general"])
    assert (cut.text, cut.finish_reason) == ("Hello there, ", "stop")
    across = ask(max_tokens=20, stop=["ere, gen", "nothing"])  # a stop string spanning three tokens
    assert (across.text, across.finish_reason) == ("Hello th", "stop")
    short = ask(max_tokens=3)
    assert (short.text, short.finish_reason) == ("Hello there,", "length")
    streamed = scripted.client.completions.create(
        model=MODEL, prompt="Say:", max_tokens=20, stop="ere, gen", stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == "Hello th"


def test_tool_call_parser():
    content, calls = parse_tool_calls(
        'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": "{\\"y\\": 2}"}\n</tool_call>'
    )
    assert content == "Sure."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("f", {"x": 1}),
        ("g", {"y": 2}),
    ]
    assert len({c["id"] for c in calls}) == 2
    # An unclosed last call (the model stopped on its end-of-turn token) still parses.
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}')[1][0]["function"]["arguments"] == "{}"
    # Anything that is not a whole call stays text: nothing is half-executed.
    for text in [
        "no call here",
        '<tool_call>{"name": "f", "argu',
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "f"}</tool_call><tool_call>[1]</tool_call>',
    ]:
        assert parse_tool_calls(text) == (text, [])


def test_streamed_tool_call_is_held_back_across_deltas():
    watch = ToolCallWatch()
    pieces = ["Checking", " now <to", "ol_", 'call>{"name": "f", ', '"arguments": {"a": [1]}}', "</tool_call>"]
    shown = "".join(watch.feed(p) for p in pieces)
    rest, calls = watch.finish()
    assert shown + rest == "Checking now " and "<" not in shown
    assert calls[0]["function"]["name"] == "f" and json.loads(calls[0]["function"]["arguments"]) == {"a": [1]}
    # Text that only looked like the start of a call is released at the end.
    watch = ToolCallWatch()
    shown = "".join(watch.feed(p) for p in ["a <", "tool"])
    assert shown + watch.finish()[0] == "a <tool"


# ---- bad input ------------------------------------------------------------------------------------------


def raw_post(s, path: str, content: bytes, key: str | None = KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    return httpx.post(s.url + path, content=content, headers=headers, timeout=30)


def assert_error(status: int, body: dict, param: str | None = None) -> str:
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]["message"]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(srv):
    user = [{"role": "user", "content": "hi"}]
    r = raw_post(srv, "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert r.status_code == 400 and "not valid JSON" in assert_error(400, r.json())
    r = raw_post(srv, "/v1/chat/completions", json.dumps({"model": MODEL}).encode())
    assert r.status_code == 400 and "Missing required parameter" in assert_error(400, r.json(), "messages")

    cases = [  # (keyword arguments of the client call, the field the error must name)
        (dict(messages=user, temperature="hot"), "temperature"),
        (dict(messages=user, max_tokens=2.5), "max_tokens"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
        (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (dict(messages=user, temperature=2.5), "temperature"),
        (dict(messages=user, temperature=-0.1), "temperature"),
        (dict(messages=user, n=0), "n"),
        (dict(messages=user, logprobs=True), "logprobs"),  # refused, not silently dropped
        (
            dict(messages=user, tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}),
            "tool_choice",
        ),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            srv.client.chat.completions.create(model=MODEL, **kwargs)
        assert e.value.status_code == 400
        assert_error(400, e.value.response.json(), param)
    with pytest.raises(openai.NotFoundError) as e:
        srv.client.chat.completions.create(model="gpt-4o", messages=user)
    assert_error(404, e.value.response.json(), "model")
    # Still serving.
    assert srv.client.chat.completions.create(model=MODEL, messages=user, max_tokens=2).choices[0].finish_reason


def test_prompt_longer_than_the_context_names_the_lengths(srv):
    messages = [{"role": "user", "content": "word " * 600}]
    n = len(chat_ids(srv.tok, messages))
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    message = assert_error(400, e.value.response.json(), "messages")
    assert f"{n} tokens" in message and "512" in message
    assert e.value.response.json()["error"]["code"] == "context_length_exceeded"
    short = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:  # fits alone, but not with the completion asked for
        srv.client.chat.completions.create(model=MODEL, messages=short, max_tokens=600)
    message = assert_error(400, e.value.response.json(), "max_tokens")
    assert f"{len(chat_ids(srv.tok, short)) + 600} tokens" in message and "512" in message
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.completions.create(model=MODEL, prompt="word " * 600, max_tokens=4)
    assert f"{len(srv.tok.encode('word ' * 600))} tokens" in assert_error(400, e.value.response.json(), "prompt")


def test_api_key(srv):
    wrong = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.status_code == 401 and assert_error(401, e.value.response.json())
    r = raw_post(srv, "/v1/chat/completions", b"{}", key=None)
    assert r.status_code == 401 and assert_error(401, r.json())


def test_oversized_body(srv):
    with pytest.raises(openai.APIStatusError) as e:
        srv.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 300_000}])
    assert e.value.status_code == 413 and "262144" in assert_error(413, e.value.response.json())


def test_full_queue_answers_429(random_dir):
    with running(random_dir, max_batch=1, max_queue=1) as s:
        body = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=400, stream=True)
        first = s.client.chat.completions.create(**body)
        next(iter(first))  # holds the only row (or is about to: the first chunk comes before the row)
        second = s.client.chat.completions.create(**body)  # waits in the queue
        with pytest.raises(openai.RateLimitError) as e:
            s.client.chat.completions.create(**body)
        assert e.value.status_code == 429 and assert_error(429, e.value.response.json())
        assert e.value.response.headers["retry-after"]
        first.close()
        second.close()
        assert wait_idle(s.engine), "closed streams still hold the engine"
        ok = s.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert ok.usage.completion_tokens == 2


# ---- load, and clients that go away --------------------------------------------------------------------


def test_32_concurrent_streams_complete(srv):
    """32 streaming clients at once on loopback, more than there are rows (8): all complete, and
    the engine decoded them together (far fewer steps than tokens)."""
    n_clients, max_tokens = 32, 16
    steps_before, tokens_before = srv.engine.stats["steps"], srv.engine.stats["tokens"]

    async def one(client, i):
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Client {i} says hello " * (1 + i % 4)}],
            max_tokens=max_tokens,
            temperature=0.8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return text, finish, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n_clients)))

    results = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert len(results) == n_clients
    for _text, finish, usage in results:
        assert finish in ("stop", "length") and usage is not None
        assert finish == "stop" or usage.completion_tokens == max_tokens
    tokens = srv.engine.stats["tokens"] - tokens_before
    steps = srv.engine.stats["steps"] - steps_before
    assert tokens == sum(u.completion_tokens for _, _, u in results)
    assert steps < tokens / 4, f"{steps} decode steps for {tokens} tokens: requests were not batched"
    assert wait_idle(srv.engine) and srv.engine.active == 0


def test_disconnected_clients_free_their_rows(srv):
    """Streams closed after a few chunks, and a whole answer whose client times out: each is
    cancelled (not run to its 480 tokens) and its row freed."""
    cancelled_before, tokens_before = srv.engine.stats["cancelled"], srv.engine.stats["tokens"]
    streams = [
        srv.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"go {i}"}], max_tokens=480, stream=True
        )
        for i in range(6)
    ]
    for stream in streams:
        for _, _ in zip(range(3), stream):
            pass
        stream.close()
    impatient = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "long"}], max_tokens=480)
    assert wait_idle(srv.engine, timeout=15), f"{srv.engine.active} rows still held"
    assert srv.engine.active == 0 and srv.engine.waiting == 0
    assert srv.engine.stats["cancelled"] - cancelled_before == 7
    assert srv.engine.stats["tokens"] - tokens_before < 7 * 480 / 2
    assert all(slot is None for slot in srv.engine.slots) and int(srv.engine.cache.lengths.sum()) == 0


def test_engine_without_http(random_dir):
    """The engine alone: its blocking `generate` equals `model.generate`, a full queue raises
    QueueFull (all of a call's requests or none), and a prompt that leaves no room is refused."""
    model, tok = qwenkit.load_model(random_dir), qwenkit.load_tokenizer(random_dir)
    engine = Engine(model, tok, max_batch=1, max_queue=1, max_model_len=64).start()
    try:
        ids = tok.encode("Once upon a time")
        params = SamplingParams.from_model(model, max_new_tokens=10, do_sample=False)
        done = engine.generate(ids, params, timeout=60)
        new = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids) :]
        assert done.token_ids == new.tolist() and done.text == tok.decode(new, skip_special_tokens=True)
        with pytest.raises(QueueFull):
            engine.submit([Request(ids, params) for _ in range(3)])
        assert engine.waiting == 0 and engine.stats["rejected"] == 3
        with pytest.raises(ContextLengthError, match="64 tokens"):
            engine.submit([Request(list(range(64)), params)])
    finally:
        engine.close()


def test_engine_text_equals_text_stream(random_dir):
    """The engine and `text.TextStream` share one token-to-text state machine: for a prompt alone
    they give the same text, ids and finish reason, with and without a stop string."""
    model, tok = qwenkit.load_model(random_dir), qwenkit.load_tokenizer(random_dir)
    engine = Engine(model, tok, max_batch=2, max_queue=2, max_model_len=64).start()
    try:
        ids = tok.encode("Once upon a time")
        params = SamplingParams.from_model(model, max_new_tokens=12, do_sample=False)
        free = engine.generate(ids, params, timeout=60)
        middle = len(free.text) // 2
        stop = free.text[middle : middle + 2]
        assert free.finish_reason == "length" and stop.strip() and "\ufffd" not in stop
        for stops in ([], [stop]):
            served = engine.generate(ids, params, stops, timeout=60)
            run = TextStream(model, tok, [ids], params, stops)
            for _ in run:
                pass
            local = run.completions[0]
            assert (served.text, served.token_ids, served.finish_reason) == (
                local.text,
                local.token_ids,
                local.finish_reason,
            )
        assert local.finish_reason == "stop" and stop not in local.text
    finally:
        engine.close()


def test_server_errors_share_the_one_base():
    assert issubclass(QueueFull, QwenkitError)
    e = APIError(400, "n must be at most 16.", param="n")
    assert isinstance(e, QwenkitError) and e.field == "n" and str(e) == "n: n must be at most 16."
    assert e.body() == {
        "error": {"message": "n must be at most 16.", "type": "invalid_request_error", "param": "n", "code": None}
    }


# ---- the command -------------------------------------------------------------------------------------


def test_serve_command_binds_loopback_and_serves(random_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = (
        "from qwenkit.cli.serve import serve; "
        f"serve(model={str(random_dir)!r}, port={port}, api_key='k', max_model_len=64, max_batch=2)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve did not come up"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=30)
        name = random_dir.name
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens == 3 and r.model == name
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert f"serving {name} at http://127.0.0.1:{port}/v1" in out
