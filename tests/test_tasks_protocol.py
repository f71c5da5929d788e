"""The Task protocol: every application implements it with exact signatures, and `evaluate` is generic
over it: it names no task, and a task it has never seen, registered here, is evaluated like the five."""

import ast
import dataclasses
import inspect
import json
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwenkit.cli import apps
from qwenkit.cli.signature import function_params
from qwenkit.errors import DataError, UserError
from qwenkit.generate import SamplingParams
from qwenkit.tasks import TASKS, EvalOptions, evaluate
from qwenkit.tasks.base import CategoricalTask, Context, GenerativeTask, Task

# Enough of a model for SamplingParams.from_model: its generation_config.json and eos ids.
FAKE_MODEL = SimpleNamespace(
    generation_config={"do_sample": True, "temperature": 0.7, "top_p": 0.8, "max_new_tokens": 99},
    config=SimpleNamespace(eos_token_id=[1, 2]),
)
FAKE_TOK = SimpleNamespace(all_special_tokens=[])


class Echo(GenerativeTask):
    """A generative task the toolkit does not ship: the prediction is the row's text, upper-cased."""

    name = "echo"
    required = ("text",)
    max_new_tokens = 7

    def __init__(self):
        self.calls = []

    def build_messages(self, tok, row):
        return [{"role": "user", "content": row["text"]}]

    def parse(self, reply, row):
        return {"prediction": reply}

    def predict(self, model, tok, rows, params, batch_size=8):
        self.calls.append((list(rows), params, batch_size))
        return [{**row, **self.parse(row["text"].upper(), row)} for row in rows]

    def score(self, records, ctx):
        right = [r["prediction"] == r.get("gold") for r in records]
        return {"accuracy": sum(right) / len(records), "count": len(records), "timeout": ctx.timeout}, list(records)


class Pick(CategoricalTask):
    """A categorical task the toolkit does not ship: the answer is the first choice of the whole file."""

    name = "pick"
    required = ("text", "gold")

    def __init__(self, choices=None):
        self.choices = choices

    def for_data(self, rows):
        return Pick(sorted({r["gold"] for r in rows}))

    def build_messages(self, tok, row):
        return [{"role": "user", "content": row["text"]}]

    def predict(self, model, tok, rows, batch_size=8):
        return [{**row, "prediction": self.choices[0]} for row in rows]

    def score(self, records, ctx):
        return {"choices": self.choices, "count": len(records)}, list(records)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_every_task_follows_the_protocol():
    cli_choices = typing.get_args(typing.get_type_hints(apps.eval_)["task"])
    assert set(TASKS) == set(cli_choices)  # `qwenkit eval`'s choices are the registry's names
    for name in TASKS:
        task = TASKS[name]
        assert isinstance(task, Task) and task.name == name and task.required
        kind = CategoricalTask if name == "sentiment" else GenerativeTask
        assert isinstance(task, kind) and task.eval_type == ("categorical" if name == "sentiment" else "generative")
        if isinstance(task, GenerativeTask):
            assert task.max_new_tokens >= 1 and isinstance(task.sampled, bool)
        for method in ("build_messages", "predict", "score", "parse"):
            if hasattr(task, method):  # exact signatures: a misspelt keyword raises, none is swallowed
                kinds = {p.kind for p in inspect.signature(getattr(task, method)).parameters.values()}
                assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{name}.{method}"
    assert TASKS["write"].sampled and not TASKS["qa"].sampled and TASKS["code"].key == "task_id"


def test_evaluate_names_no_task():
    tree = ast.parse(Path(evaluate.__file__).read_text(encoding="utf-8"))
    names = set(TASKS)
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    identifiers = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    identifiers |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & strings and not names & identifiers
    assert not any(m.split(".")[-1] in names for m in modules)


def test_a_new_generative_task_is_evaluated_generically(tmp_path, monkeypatch):
    echo = Echo()
    monkeypatch.setitem(TASKS, "echo", echo)
    data = [{"id": i, "text": t, "gold": t.upper()} for i, t in enumerate(["a", "b", "c"])]
    data[2]["gold"] = "wrong"
    path = write_jsonl(tmp_path / "echo.jsonl", data)
    out = tmp_path / "out"
    result = evaluate.evaluate("echo", path, model=FAKE_MODEL, tok=FAKE_TOK, output=out, samples=2, limit=2)
    assert result["task"] == "echo" and result["count"] == 4 and result["accuracy"] == 1.0
    rows, params, _ = echo.calls[-1]
    assert [r["id"] for r in rows] == [0, 0, 1, 1]  # two samples of each of the first two rows
    assert params.do_sample and params.temperature == 0.7 and params.max_new_tokens == 7  # the task's length
    assert json.loads((out / "metrics.json").read_text()) == result
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    # one sample: the task's default, greedy; a temperature decides by the one rule
    evaluate.evaluate(echo, path, model=FAKE_MODEL, tok=FAKE_TOK, output=out)
    assert not echo.calls[-1][1].do_sample and len(echo.calls[-1][0]) == 3
    evaluate.evaluate(echo, path, model=FAKE_MODEL, tok=FAKE_TOK, output=out, temperature=0.5, max_new_tokens=3)
    assert echo.calls[-1][1].do_sample and echo.calls[-1][1].temperature == 0.5
    assert echo.calls[-1][1].max_new_tokens == 3
    # predictions made elsewhere, joined by the task's key; --limit keeps those of the first rows
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": 2, "prediction": "C"}, {"id": 0, "prediction": "A"}])
    result = evaluate.evaluate("echo", path, predictions=preds, output=out, timeout=3.0)
    assert result["count"] == 2 and result["accuracy"] == 0.5 and result["timeout"] == 3.0
    assert evaluate.evaluate("echo", path, predictions=preds, output=out, limit=1)["count"] == 1
    with pytest.raises(DataError, match="row 1: missing text"):
        evaluate.evaluate("echo", write_jsonl(tmp_path / "bad.jsonl", [{"id": 0}]), model=FAKE_MODEL, tok=FAKE_TOK)


def test_a_new_categorical_task_sees_the_whole_file_and_takes_no_samples(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "pick", Pick())
    path = write_jsonl(tmp_path / "pick.jsonl", [{"text": "x", "gold": g} for g in ("b", "a", "c")])
    result = evaluate.evaluate("pick", path, model=FAKE_MODEL, tok=FAKE_TOK, output=tmp_path / "out", limit=1)
    assert result["choices"] == ["a", "b", "c"] and result["count"] == 1  # set up from the whole file
    with pytest.raises(UserError, match="--samples"):
        evaluate.evaluate("pick", path, model=FAKE_MODEL, tok=FAKE_TOK, output=tmp_path / "out", samples=2)
    with pytest.raises(UserError, match="unknown task 'nope'"):
        evaluate.evaluate("nope", path, model=FAKE_MODEL, tok=FAKE_TOK)


def test_evaluate_takes_exactly_the_options_eval_offers(tmp_path, monkeypatch):
    # One declaration: each EvalOptions field is a flag of `qwenkit eval` and a keyword of `evaluate`.
    flags = [p.name for p in function_params(apps.eval_) if p.group is not None and p.group.name == "options"]
    assert flags == [f.name for f in dataclasses.fields(EvalOptions)]
    monkeypatch.setitem(TASKS, "pick", Pick())
    path = write_jsonl(tmp_path / "pick.jsonl", [{"text": "x", "gold": "a"}])
    with pytest.raises(TypeError, match="limt"):  # a misspelt option raises, none is swallowed
        evaluate.evaluate("pick", path, model=FAKE_MODEL, tok=FAKE_TOK, limt=1)
    for option in ("limit", "samples", "max_new_tokens"):
        with pytest.raises(UserError, match=f"--{option.replace('_', '-')} must be at least 1, got 0"):
            evaluate.evaluate("pick", path, model=FAKE_MODEL, tok=FAKE_TOK, **{option: 0})


def test_task_decoding_defaults_follow_the_one_temperature_rule():
    write, qa, code = TASKS["write"], TASKS["qa"], TASKS["code"]
    checkpoint = SamplingParams.from_model(FAKE_MODEL)
    assert write.sampling(FAKE_MODEL) == SamplingParams.from_model(FAKE_MODEL, max_new_tokens=write.max_new_tokens)
    assert checkpoint.do_sample and not qa.sampling(FAKE_MODEL).do_sample  # qa is greedy by default
    assert code.sampling(FAKE_MODEL, samples=5).do_sample  # several greedy samples would all be the same
    assert (
        qa.sampling(FAKE_MODEL, temperature=0.3).do_sample and not write.sampling(FAKE_MODEL, temperature=0).do_sample
    )
    assert qa.sampling(FAKE_MODEL, max_new_tokens=5, seed=3).max_new_tokens == 5
    with pytest.raises(UserError, match="temperature"):
        write.sampling(FAKE_MODEL, temperature=-1)


def test_scoring_takes_what_its_metric_needs_from_the_context():
    records = [{"question": "q", "answers": ["Paris"], "prediction": "paris"}]
    assert TASKS["qa"].score(records, Context())[0]["exact_match"] == 100.0
    with pytest.raises(TypeError):
        TASKS["qa"].score(records, Context(), timeot=3)  # a misspelt keyword is an error, not ignored
