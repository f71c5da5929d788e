"""Chat rendering equals transformers' with the official Qwen2.5 template; a checkpoint's own
template wins; the assistant mask covers exactly what the model writes."""

import copy
import json

import pytest
import torch

from qwenkit import load_tokenizer
from qwenkit.chat import ChatTemplate
from qwenkit.tokenizer import encode_chat

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": '搜索网页 <b>and</b> return "snippets" & links.',
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
    },
}


def _call(name, arguments, wrapped=True):
    return (
        {"type": "function", "function": {"name": name, "arguments": arguments}}
        if wrapped
        else {"name": name, "arguments": arguments}
    )


SYSTEM = {"role": "system", "content": "You are a terse assistant."}
U1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "Paris."}
U2 = {"role": "user", "content": "And of Germany?"}
A2 = {"role": "assistant", "content": "Berlin.\n\nIt has been since 1990."}
CALL_PARIS = {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Paris"})]}
CALL_TWO = {
    "role": "assistant",
    "content": "Let me check both.",
    "tool_calls": [
        _call("get_weather", {"city": "Paris", "unit": "c"}),
        _call("get_weather", {"city": "東京"}, wrapped=False),
    ],
}
CALL_NONE_CONTENT = {
    "role": "assistant",
    "content": None,
    "tool_calls": [_call("search", {"q": "qwen 2.5", "n": [1, 2]}, wrapped=False)],
}
TOOL_PARIS = {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'}
TOOL_TOKYO = {"role": "tool", "content": '{"temp": 18, "sky": "雨"}'}
ZH_U = {"role": "user", "content": "你好！请用中文介绍一下你自己。"}
ZH_A = {"role": "assistant", "content": "你好！我是通义千问，由阿里云开发的大语言模型。😀"}

CONVERSATIONS = {
    "single user": ([U1], None),
    "system + user": ([SYSTEM, U1], None),
    "one exchange": ([U1, A1], None),
    "system one exchange": ([SYSTEM, U1, A1], None),
    "multi-turn": ([U1, A1, U2, A2], None),
    "system multi-turn": ([SYSTEM, U1, A1, U2, A2], None),
    "multi-turn open": ([SYSTEM, U1, A1, U2], None),
    "chinese": ([ZH_U, ZH_A], None),
    "chinese system": ([{"role": "system", "content": "你是一个乐于助人的助手。"}, ZH_U], None),
    "mid system": ([U1, A1, {"role": "system", "content": "Answer in French."}, U2], None),
    "tools only": ([U1], [WEATHER]),
    "tools + system": ([SYSTEM, U1], [WEATHER, SEARCH]),
    "tool call": ([U1, CALL_PARIS], [WEATHER]),
    "tool call + response": ([U1, CALL_PARIS, TOOL_PARIS], [WEATHER]),
    "tool round trip": ([SYSTEM, U1, CALL_PARIS, TOOL_PARIS, A1], [WEATHER]),
    "two calls, two responses": ([U1, CALL_TWO, TOOL_PARIS, TOOL_TOKYO], [WEATHER]),
    "two calls, full loop": ([U1, CALL_TWO, TOOL_PARIS, TOOL_TOKYO, A2, U2], [WEATHER]),
    "call with no content": ([ZH_U, CALL_NONE_CONTENT, TOOL_TOKYO], [SEARCH]),
    "tool calls without tools": ([U1, CALL_PARIS, TOOL_PARIS, A1], None),
    "string arguments": (
        [U1, {"role": "assistant", "content": "", "tool_calls": [_call("search", '{"q": "x"}')]}],
        [SEARCH],
    ),
    "chinese tools": (
        [{"role": "system", "content": "你是助手。"}, ZH_U, CALL_NONE_CONTENT, TOOL_TOKYO, ZH_A],
        [SEARCH, WEATHER],
    ),
    "special-looking text": ([{"role": "user", "content": "say <tool_call> and </tool_response> please"}, A1], None),
    "whitespace content": (
        [{"role": "user", "content": "  \n\tspaced\n\n"}, {"role": "assistant", "content": "  ok \n\n"}],
        None,
    ),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_equals_transformers_with_the_official_template(
    name, add_generation_prompt, tok_qwen, tok_hf, tok_official_template
):
    messages, tools = CONVERSATIONS[name]
    kwargs = dict(tools=tools, add_generation_prompt=add_generation_prompt)
    theirs = tok_hf.apply_chat_template(
        copy.deepcopy(messages), chat_template=tok_official_template, tokenize=False, **kwargs
    )
    ours = tok_qwen.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours == theirs
    their_ids = tok_hf.apply_chat_template(
        copy.deepcopy(messages), chat_template=tok_official_template, tokenize=True, return_dict=False, **kwargs
    )
    assert tok_qwen.apply_chat_template(messages, **kwargs) == list(their_ids)


def test_builtin_template_is_the_official_one(tok_qwen, tok_official_template):
    assert tok_qwen.chat_template == tok_official_template
    text = tok_qwen.apply_chat_template([U1], add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok_qwen.apply_chat_template([U1], add_generation_prompt=True, return_tensors="pt")
    assert ids.dtype == torch.long and ids.shape == (1, len(tok_qwen.encode(text)))
    assert ChatTemplate(tok_qwen.chat_template).render([U1]) == tok_qwen.apply_chat_template([U1], tokenize=False)
    inputs = tok_qwen.apply_chat_template([U1], add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], ids) and inputs["attention_mask"].shape == ids.shape


CUSTOM = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "### {{ m.role | upper }}\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
    "{% if tools %}TOOLS {{ tools | tojson(indent=2) }}\n{% endif %}"
    "{% if add_generation_prompt %}### ASSISTANT\n{% endif %}"
)


def test_a_checkpoints_own_template_is_used(tok_qwen, tmp_path):
    tok = copy.copy(tok_qwen)
    tok.chat_template = CUSTOM
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template == CUSTOM
    messages = [SYSTEM, ZH_U, ZH_A]
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path)
    for kwargs in (dict(add_generation_prompt=True), dict(tools=[SEARCH])):
        ours = loaded.apply_chat_template(messages, tokenize=False, **kwargs)
        assert ours == hf.apply_chat_template(copy.deepcopy(messages), tokenize=False, **kwargs)
        assert "<|im_start|>" not in ours and "### USER\n你好" in ours
    # A chat_template.jinja file, as newer transformers saves it, wins over the config's.
    (tmp_path / "chat_template.jinja").write_text("{{ messages[-1].content }}", encoding="utf-8")
    assert load_tokenizer(tmp_path).apply_chat_template(messages, tokenize=False) == ZH_A["content"]


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages | tojson }}",
        "{{ tools | tojson(indent=2) }}|{{ messages[0] | tojson(ensure_ascii=True) }}",
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
        "{% generation %}{{ messages[0].content }}{% endgeneration %}",
        "{{ strftime_now('%Y') | length }}{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}",
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    ],
)
def test_template_helpers_behave_as_in_transformers(template, tok_qwen, tok_hf):
    messages = [ZH_U, {"role": "assistant", "content": '<b>&amp;</b> "q"'}]
    kwargs = dict(chat_template=template, tools=[SEARCH], tokenize=False, add_generation_prompt=True)
    assert tok_qwen.apply_chat_template(messages, **kwargs) == tok_hf.apply_chat_template(
        copy.deepcopy(messages), **kwargs
    )


def test_template_errors_are_clear(tok_qwen):
    with pytest.raises(ValueError, match="roles must alternate"):
        tok_qwen.apply_chat_template([U1], chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="does not compile"):
        tok_qwen.apply_chat_template([U1], chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match="chat template failed"):
        tok_qwen.apply_chat_template([U1], chat_template="{{ messages[0].content.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="chat template failed"):
        tok_qwen.apply_chat_template([U1], chat_template="{{ messages.append(1) }}")  # immutable sandbox


@pytest.mark.parametrize(
    "messages, error, match",
    [
        ("hello", TypeError, "list of dicts"),
        ([], ValueError, "empty"),
        ([U1, "hi"], TypeError, r"messages\[1\]"),
        ([U1, {"content": "no role"}], ValueError, r"messages\[1\].*role"),
        ([SYSTEM, U1, {"role": "user"}], ValueError, r"messages\[2\].*content"),
        ([U1, {"role": "user", "content": 3}], ValueError, r"messages\[1\].*string"),
        ([U1, {"role": "assistant", "content": None}], ValueError, r"messages\[1\]"),
    ],
)
def test_bad_messages_name_the_message(messages, error, match, tok_qwen):
    with pytest.raises(error, match=match):
        tok_qwen.apply_chat_template(messages)
    with pytest.raises(error, match=match):
        encode_chat(tok_qwen, messages)


def _expected_assistant_text(message):
    # What the official template writes after `<|im_start|>assistant\n`, up to `<|im_end|>`.
    calls = []
    for call in message.get("tool_calls", []):
        call = call.get("function", call)
        arguments = json.dumps(call["arguments"], ensure_ascii=False)
        calls.append(f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {arguments}}}\n</tool_call>')
    content = message.get("content") or ""
    return "\n".join(([content] if content else []) + calls) + "<|im_end|>"


def _runs(mask):
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize(
    "name", [n for n, (messages, _) in CONVERSATIONS.items() if any(m["role"] == "assistant" for m in messages)]
)
def test_assistant_mask_covers_exactly_the_assistant_turns(name, tok_qwen):
    messages, tools = CONVERSATIONS[name]
    ids, mask = tok_qwen.encode_chat(messages, tools=tools)
    assert ids == tok_qwen.apply_chat_template(messages, tools=tools)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    assistants = [m for m in messages if m["role"] == "assistant"]
    runs = _runs(mask)
    assert [tok_qwen.decode(ids[a:b]) for a, b in runs] == [_expected_assistant_text(m) for m in assistants]
    header = tok_qwen.encode("<|im_start|>assistant\n")
    for a, b in runs:
        assert ids[a - len(header) : a] == header  # the header is not learned...
        assert ids[b - 1] == tok_qwen.eos_token_id  # ...the closing <|im_end|> is...
        assert tok_qwen.decode(ids[b : b + 1]) == "\n"  # ...and the newline after it is not


def test_assistant_mask_when_the_content_starts_with_a_newline(tok_qwen):
    # The header's "\n" and the content's merge into one token: it is kept in the mask, so all of
    # the content is learned (transformers' offset rule does the same).
    messages = [U1, {"role": "assistant", "content": "\n\nPlan:\n1. go"}]
    ids, mask = encode_chat(tok_qwen, messages)
    assert ids == tok_qwen.apply_chat_template(messages)
    ((a, b),) = _runs(mask)
    assert tok_qwen.decode(ids[a:b]) == "\n\n\nPlan:\n1. go<|im_end|>"


def test_assistant_mask_of_a_conversation_without_answers_is_empty(tok_qwen):
    ids, mask = encode_chat(tok_qwen, [SYSTEM, U1, U2])
    assert len(ids) == len(mask) and not any(mask)
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        encode_chat(tok_qwen, [A1, U1])
