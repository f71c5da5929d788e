"""`qwenkit eval TASK --predictions FILE`: scoring without a model, on the shipped sample data.
Perfect predictions score perfectly, empty ones zero, HumanEval samples are run in the sandbox, and
the numbers written are those of the reference implementations."""

import json

import pytest
import sacrebleu

from qwenkit.cli import main
from qwenkit.tasks import TASKS, sample_data


def rows(task):
    return [json.loads(line) for line in sample_data(task).read_text(encoding="utf-8").splitlines()]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def run_eval(tmp_path, task, predictions, *extra):
    out = tmp_path / f"out-{task}"
    status = main(
        [
            "eval",
            task,
            "--predictions",
            write_jsonl(tmp_path / f"{task}-pred.jsonl", predictions),
            "--output",
            str(out),
            *extra,
        ]
    )
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    scored = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return metrics, scored


def test_sample_files_ship_a_few_dozen_rows_in_the_documented_format():
    fields = {
        "sentiment": {"text", "label"},
        "qa": {"question", "answers"},
        "translate": {"source", "reference", "src_lang", "tgt_lang"},
        "code": {"task_id", "prompt", "test", "entry_point"},
        "write": {"prompt"},
    }
    for task in TASKS:
        data = rows(task)
        assert 20 <= len(data) <= 60, task
        assert all(fields[task] <= set(r) for r in data), task
    assert any("context" not in r for r in rows("qa")) and any("context" in r for r in rows("qa"))


def test_code_perfect_wrong_and_several_samples(tmp_path, capsys):
    problems = rows("code")
    # human-eval's own samples format: task_id and completion
    perfect = [{"task_id": r["task_id"], "completion": r["canonical_solution"]} for r in problems]
    metrics, scored = run_eval(tmp_path, "code", perfect)
    assert metrics["pass@1"] == 1.0 and metrics["problems"] == len(problems)
    assert all(r["passed"] and r["result"].startswith("passed") for r in scored)
    wrong = [{"task_id": r["task_id"], "prediction": "    return None\n"} for r in problems]
    metrics, scored = run_eval(tmp_path, "code", wrong)
    assert metrics["pass@1"] == 0.0 and not any(r["passed"] for r in scored)
    empty = [{"task_id": r["task_id"], "prediction": ""} for r in problems[:3]]
    assert run_eval(tmp_path, "code", empty, "--limit", "3")[0]["pass@1"] == 0.0
    # two samples per problem, one right and one wrong: pass@1 = 1/2, pass@2 = 1
    mixed = [
        {"task_id": r["task_id"], "prediction": p}
        for r in problems[:4]
        for p in (r["canonical_solution"], "    raise RuntimeError('no')\n")
    ]
    metrics, _ = run_eval(tmp_path, "code", mixed, "--limit", "4")
    assert metrics["pass@1"] == pytest.approx(0.5) and metrics["pass@2"] == pytest.approx(1.0)
    assert metrics["samples_per_problem"] == 2
    capsys.readouterr()


def test_code_hostile_completions_are_contained(tmp_path):
    problem = rows("code")[0]
    hostile = [
        "    while True:\n        pass\n",
        "    import os\n    os.system('echo pwned > /tmp/qwenkit-pwned')\n    return a + b\n",
        "    import socket\n    socket.create_connection(('127.0.0.1', 22))\n",
    ]
    records = [{**problem, "prediction": p} for p in hostile]
    metrics, scored = run_eval(tmp_path, "code", records, "--timeout", "1", "--limit", "1")
    assert metrics["pass@1"] == 0.0
    assert [r["result"].split(":")[0] for r in scored] == ["timeout", "failed", "failed"]


def test_qa_perfect_empty_and_official_normalization(tmp_path):
    data = rows("qa")
    metrics, scored = run_eval(tmp_path, "qa", [{"id": r["id"], "prediction": r["answers"][-1]} for r in data])
    assert metrics["exact_match"] == 100.0 and metrics["f1"] == 100.0 and metrics["count"] == len(data)
    empty, _ = run_eval(tmp_path, "qa", [{"prediction": ""} for _ in data])  # joined by line order
    assert empty["exact_match"] == 0.0 and empty["f1"] == 0.0
    # case, articles and punctuation do not count; rows that carry their own fields need no join
    own = [
        {"question": "Q?", "answers": ["the Pacific Ocean"], "prediction": "PACIFIC ocean!"},
        {"question": "Q?", "answers": ["Gustave Eiffel"], "prediction": "Eiffel"},
    ]
    metrics, scored = run_eval(tmp_path, "qa", own)
    assert [r["exact_match"] for r in scored] == [1.0, 0.0]
    assert scored[1]["f1"] == pytest.approx(2 / 3)  # precision 1, recall 1/2


def test_sentiment_perfect_and_confusion(tmp_path):
    data = rows("sentiment")
    metrics, _ = run_eval(tmp_path, "sentiment", [{**r, "prediction": r["label"]} for r in data])
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0
    cm = metrics["confusion_matrix"]
    assert cm["labels"] == ["positive", "negative", "neutral"]
    assert cm["matrix"] == [[12, 0, 0], [0, 12, 0], [0, 0, 12]]
    metrics, scored = run_eval(tmp_path, "sentiment", [{**r, "prediction": "positive"} for r in data])
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["confusion_matrix"]["matrix"][1] == [12, 0, 0]
    assert metrics["macro_f1"] == pytest.approx((2 * 12 / (2 * 12 + 24)) / 3)


def test_translate_scores_are_sacrebleus(tmp_path):
    data = rows("translate")
    metrics, _ = run_eval(tmp_path, "translate", [{"id": r["id"], "prediction": r["reference"]} for r in data])
    assert metrics["bleu"] == pytest.approx(100.0) and metrics["chrf"] == pytest.approx(100.0)
    assert metrics["pairs"]["en-zh"]["bleu_signature"].count("tok:zh") == 1
    # imperfect: lower-cased references, scored by sacrebleu directly as the oracle
    preds = [r["reference"].lower() for r in data]
    metrics, _ = run_eval(tmp_path, "translate", [{"prediction": p} for p in preds])
    refs = [r["reference"] for r in data]
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    en_fr = [(p, r["reference"]) for p, r in zip(preds, data) if (r["src_lang"], r["tgt_lang"]) == ("en", "fr")]
    assert metrics["pairs"]["en-fr"]["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu([p for p, _ in en_fr], [[r for _, r in en_fr]]).score
    )
    assert "nrefs:1" in metrics["bleu_signature"] and "chrF2" not in metrics["bleu_signature"]
    empty, _ = run_eval(tmp_path, "translate", [{"prediction": ""} for _ in data])
    assert empty["bleu"] == 0.0 and empty["chrf"] == 0.0


def test_write_distinct_without_a_model(tmp_path):
    data = rows("write")[:2]
    metrics, _ = run_eval(tmp_path, "write", [{"prediction": "a b a b"}, {"prediction": "a b c"}], "--limit", "2")
    assert metrics["distinct_1"] == pytest.approx(3 / 7) and metrics["distinct_2"] == pytest.approx(3 / 5)
    assert metrics["perplexity"] is None and "--model" in metrics["note"]
    assert len(data) == 2


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prediction": "x", "question": "q"}])
    data = write_jsonl(tmp_path / "data.jsonl", [{"question": "q"}])
    assert main(["eval", "qa", "--data", data, "--predictions", bad]) == 2
    assert "missing answers" in capsys.readouterr().err
    assert main(["eval", "qa"]) == 2
    assert "--model" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    assert main(["eval", "qa", "--predictions", str(tmp_path / "broken.jsonl")]) == 2
    assert "broken.jsonl:1: not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:  # refused while parsing, as a bad type is, before any loading
        main(["eval", "qa", "--limit", "0"])
    assert exit.value.code == 2 and "--limit must be at least 1, got 0" in capsys.readouterr().err


def test_standalone_predictions_need_no_data_file(tmp_path):
    records = [
        {"text": "Great.", "label": "good", "prediction": "good"},
        {"text": "Meh.", "label": "bad", "prediction": "good"},
        {"text": "Awful.", "label": "bad", "prediction": "bad"},
    ]
    metrics, scored = run_eval(tmp_path, "sentiment", records)
    assert metrics["data"] is None
    assert metrics["confusion_matrix"] == {"labels": ["bad", "good"], "matrix": [[1, 1], [0, 1]]}
    assert metrics["accuracy"] == pytest.approx(2 / 3) and [r["correct"] for r in scored] == [True, False, True]


def test_an_empty_predictions_file_is_an_error(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["eval", "code", "--predictions", str(tmp_path / "empty.jsonl")]) == 2
    assert "no predictions" in capsys.readouterr().err
