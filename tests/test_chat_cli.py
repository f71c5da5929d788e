"""`qwenkit chat`: history kept and trimmed to the context, commands, scripted use; and the file
mode of `qwenkit generate`."""

import io
import json
import subprocess
import sys

import pytest
from reference import random_model, tiny_config

from qwenkit.cli import main
from qwenkit.cli.repl import ChatSession, ContextFull, run
from qwenkit.generate import SamplingParams

PARAMS = SamplingParams(max_new_tokens=6, eos_token_id=(151645, 151643), pad_token_id=151643)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(vocab_size=151936))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("chatmodel")
    assert main(["new", "--preset", "tiny", "--seed", "2", "--dtype", "float32", "--out", str(out)]) == 0
    return out


def test_session_keeps_the_history(model, tok_qwen):
    s = ChatSession(model, tok_qwen, PARAMS, system="Be brief.")
    first = "".join(s.ask("What is the capital of France?"))
    "".join(s.ask("And of Italy?"))
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert s.messages[2]["content"] == first
    # The second prompt carried the first exchange: the rendered conversation holds both questions.
    text = tok_qwen.apply_chat_template(s.messages, tokenize=False)
    assert "capital of France" in text and "And of Italy?" in text and "Be brief." in text


def test_oldest_turns_are_dropped_to_fit_the_context(tok_qwen):
    small = random_model(tiny_config(vocab_size=151936, max_position_embeddings=64))
    notices = io.StringIO()
    s = ChatSession(small, tok_qwen, PARAMS, notice=notices)
    for question in ("one two three four five", "six seven eight nine ten", "eleven twelve thirteen"):
        "".join(s.ask(question))
        assert len(tok_qwen.apply_chat_template(s.messages, add_generation_prompt=True)) <= 64
    assert "dropped the oldest turn" in notices.getvalue()
    assert s.turns[-2]["content"] == "eleven twelve thirteen"
    assert s.turns[0]["role"] == "user"  # whole exchanges go, never half of one
    with pytest.raises(ContextFull, match="the context holds 64"):
        "".join(s.ask("word " * 200))
    assert s.turns[-2]["content"] == "eleven twelve thirteen"  # the refused message left no trace


def test_repl_commands(model, tok_qwen, tmp_path):
    s = ChatSession(model, tok_qwen, PARAMS)
    saved = tmp_path / "conv.json"
    script = f"hello\n/system You are terse.\nsecond question\n/save {saved}\n/reset\nthird\n/quit\nnever read\n"
    out = io.StringIO()
    run(s, io.StringIO(script), out)
    conversation = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "user", "assistant"]
    assert conversation[0]["content"] == "You are terse." and conversation[3]["content"] == "second question"
    assert [m["content"] for m in s.messages if m["role"] == "user"] == ["third"]  # /reset kept the system
    assert s.system == "You are terse."
    assert "[conversation reset]" in out.getvalue()


def test_chat_from_a_script(model_dir):
    cmd = [
        sys.executable,
        "-m",
        "qwenkit",
        "chat",
        "--model",
        str(model_dir),
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
    ]
    one = subprocess.run(cmd + ["--message", "Hi there"], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    piped = subprocess.run(cmd, input="Hi there\n/save /dev/stdout\n", capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith(one.stdout)  # same greedy answer, then the saved conversation
    assert '"content": "Hi there"' in piped.stdout


def test_generate_file_mode_reports_bad_lines_and_does_the_rest(model_dir, tmp_path, capsys):
    source = tmp_path / "prompts.jsonl"
    source.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "Hello", "id": 1}),
                "{not json",
                json.dumps({"messages": [{"role": "user", "content": "你好"}], "id": 3}),
                json.dumps({"text": "no prompt field"}),
                json.dumps({"prompt": "Bye", "id": 5}),
            ]
        )
        + "\n"
    )
    dest = tmp_path / "out.jsonl"
    status = main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--input",
            str(source),
            "--output",
            str(dest),
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--batch-size",
            "2",
        ]
    )
    assert status == 1
    err = capsys.readouterr().err
    assert f"{source}:2:" in err and f"{source}:4:" in err and "prompt" in err
    rows = [json.loads(line) for line in dest.read_text().splitlines()]
    assert [r.get("id") for r in rows] == [1, None, 3, None, 5]
    assert [("error" in r) for r in rows] == [False, True, False, True, False]
    assert all(r["completion_tokens"] <= 4 for r in rows if "error" not in r)
    # The batch's greedy completion equals the single-prompt command's.
    main(["generate", "--model", str(model_dir), "--prompt", "Bye", "--max-new-tokens", "4", "--temperature", "0"])
    assert capsys.readouterr().out == rows[4]["completion"] + "\n"


def test_generate_stream_and_raw(model_dir, capsys):
    base = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]
    main(base + ["--raw"])
    raw = capsys.readouterr().out
    main(base + ["--raw", "--stream"])
    assert capsys.readouterr().out == raw
    main(base)
    assert capsys.readouterr().out != raw  # the chat template changes the prompt


def test_generate_rejects_a_prompt_longer_than_the_context(tmp_path, capsys):
    main(["new", "--preset", "tiny", "--out", str(tmp_path)])
    config = json.loads((tmp_path / "config.json").read_text())
    config["max_position_embeddings"] = 20
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "word " * 30]) == 2
    assert "the model's context holds 20" in capsys.readouterr().err
