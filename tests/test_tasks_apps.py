"""The five applications end to end on a tiny random checkpoint: the seed's example prompts through
their commands, label scoring against a direct forward pass, the reference perplexity against the
model's own loss, sentence batching, and `eval --model`. The model is random, so its text is
gibberish: these tests check well-formed output and plumbing, never quality."""

import json
import math

import pytest
import torch

from qwenkit.cli import apps, main
from qwenkit.hub import load
from qwenkit.tasks import sentiment, translate, write
from qwenkit.tasks.scoring import answer_ids

SAMPLED = ["--temperature", "1", "--seed", "0"]  # greedy decoding of a random model repeats one token


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-tasks")
    assert main(["new", "--preset", "tiny", "--seed", "1", "--dtype", "float32", "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load(tiny_dir)


# ---- the seed's example prompts -------------------------------------------------------------------------


def test_translate_the_house_is_wonderful(tiny_dir, capsys):
    assert (
        main(
            [
                "translate",
                "The house is wonderful.",
                "--to",
                "fr",
                "--model",
                tiny_dir,
                "--max-new-tokens",
                "12",
                *SAMPLED,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "source language: English (detected)" in captured.err
    out = captured.out
    assert out.endswith("\n") and out.count("\n") == 1  # one sentence in, one line out
    text = out[:-1]
    assert text == text.strip() and "<|" not in text
    assert translate.clean_translation(text, "The house is wonderful.") == text  # nothing chatty left to strip


def test_answer_what_is_the_capital_of_france(tiny_dir, capsys):
    assert main(["qa", "What is the capital of France?", "--model", tiny_dir, "--max-new-tokens", "16", *SAMPLED]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].strip()  # the answer, or "(no answer)", on one line


def test_answer_from_documents_reports_sources(tiny_dir, tmp_path, capsys):
    (tmp_path / "france.txt").write_text("The capital of France is Paris.\n\nFrance is in Europe.")
    (tmp_path / "germany.txt").write_text("The capital of Germany is Berlin.")
    assert (
        main(
            [
                "qa",
                "What is the capital of France?",
                "--model",
                tiny_dir,
                "--context",
                str(tmp_path),
                "--top-k",
                "2",
                "--max-new-tokens",
                "16",
                *SAMPLED,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].strip()
    assert out[1] in ("Sources:", "Sources: none cited")
    assert all(line.startswith("  [") for line in out[2:])


def test_classify_i_love_this_product(tiny_dir, capsys):
    # The command function itself: a positional TEXT that --input makes optional.
    assert apps.sentiment("I love this product!", model=tiny_dir) == 0
    lines = capsys.readouterr().out.splitlines()
    label, rows = lines[0], [line.strip().split(": ") for line in lines[1:]]
    probs = {name: float(p) for name, p in rows}
    assert set(probs) == {"positive", "negative", "neutral"}
    assert sum(probs.values()) == pytest.approx(1.0, abs=2e-3)  # printed with 3 decimals
    assert label == max(probs, key=probs.get) == rows[0][0]


def test_write_a_function_that_adds_two_numbers(tiny_dir, tmp_path, capsys):
    tests = tmp_path / "test_add.py"
    tests.write_text("assert add(2, 3) == 5\nassert add(-1, 1) == 0\n")
    status = main(
        [
            "code",
            "Generate a Python function to add two numbers",
            "--model",
            tiny_dir,
            "--test",
            str(tests),
            "--repair",
            "1",
            "--max-new-tokens",
            "24",
            *SAMPLED,
        ]
    )
    err = capsys.readouterr().err
    assert status in (0, 1)
    attempts = [line for line in err.splitlines() if line.startswith("attempt ")]
    assert attempts[0].startswith("attempt 1: ") and "tests " in attempts[0]
    if status == 1:  # failed tests: the repair round ran and the verdict is reported
        assert len(attempts) == 2 and "tests failed after 2 attempt(s)" in err
    else:
        assert "tests passed" in err


def test_continue_once_upon_a_time(tiny_dir, capsys):
    assert main(["write", "Once upon a time", "--model", tiny_dir, "--max-new-tokens", "12", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and "<|" not in out


# ---- sentiment by label log-likelihoods -------------------------------------------------------------------


def test_sentiment_probabilities_sum_to_one_and_match_a_direct_forward(tiny):
    model, tok = tiny
    texts = ["I love this product!", "Terrible quality, it broke after two days.", "The package arrived on Tuesday."]
    labels = ["positive", "negative", "neutral", "mixed feelings"]  # labels of different token lengths
    results = sentiment.classify(model, tok, texts, labels, batch_size=2)
    for text, r in zip(texts, results):
        assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        assert r.label == max(r.probabilities, key=r.probabilities.get)
        # Oracle: one unpadded forward pass per label over the full chat, log-softmax, the answer's tokens.
        direct = []
        for label in labels:
            prompt, answer = answer_ids(tok, sentiment.build_messages(text, labels), label)
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logp = model(ids).logits[0].float().log_softmax(-1)
            direct.append(sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer)))
        assert [r.logprobs[label] for label in labels] == pytest.approx(direct, abs=1e-3)
        expected = torch.tensor(direct).softmax(0).tolist()
        assert [r.probabilities[label] for label in labels] == pytest.approx(expected, abs=1e-4)


def test_label_answer_is_what_the_template_renders(tok_qwen):
    messages = sentiment.build_messages("I love it", ["positive", "negative"])
    prompt, answer = answer_ids(tok_qwen, messages, "positive")
    assert tok_qwen.decode(answer) == "positive<|im_end|>"
    assert tok_qwen.decode(prompt).endswith("<|im_start|>assistant\n")


def test_sentiment_file_in_batches(tiny_dir, tmp_path, capsys):
    rows = [{"id": i, "text": t} for i, t in enumerate(["Great!", "Awful.", "It is blue.", "Fine.", "Bad."])]
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(
            [
                "sentiment",
                "--input",
                str(tmp_path / "reviews.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
                "--model",
                tiny_dir,
                "--batch-size",
                "2",
                "--labels",
                "good,bad",
            ]
        )
        == 0
    )
    assert "classifying" in capsys.readouterr().err  # the progress bar
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [0, 1, 2, 3, 4]
    for r in out:
        assert set(r["probabilities"]) == {"good", "bad"} and sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["prediction"] == max(r["probabilities"], key=r["probabilities"].get)


# ---- writing: the perplexity of references -----------------------------------------------------------------


def test_reference_nll_equals_the_models_own_loss(tiny):
    model, tok = tiny
    prompts, refs = ["Once upon a time", "Write about rain"], ["there was a king.", "Rain fell all day on the town."]
    nll, counts = write.reference_nll(model, tok, prompts, refs, ["continue", "story"], batch_size=2)
    for prompt, ref, style, n, c in zip(prompts, refs, ["continue", "story"], nll, counts):
        p, a = answer_ids(tok, write.build_messages(prompt, style), ref)
        ids = torch.tensor([p + a])
        labels = ids.clone()
        labels[0, : len(p)] = -100  # score the reference (and its end of turn) only
        with torch.no_grad():
            loss = model(ids, labels=labels).loss.item()  # mean over the len(a) scored tokens
        assert c == len(a) and n == pytest.approx(loss * len(a), rel=1e-4)


# ---- translation in sentence batches ----------------------------------------------------------------------


def test_long_input_is_split_into_sentences_and_batched(tiny, monkeypatch):
    model, tok = tiny
    calls = []
    real_chat = translate.chat

    def spy(model_, tok_, conversations, params, batch_size=8, **kw):
        calls.append(([c[-1]["content"] for c in conversations], batch_size))
        return real_chat(model_, tok_, conversations, params, batch_size, **kw)

    monkeypatch.setattr(translate, "chat", spy)
    text = "The weather was beautiful. We walked along the river.\n\nThen we had dinner. It was late!"
    params = translate.TASK.sampling(model, 6, temperature=1.0, seed=0)
    out = translate.translate(model, tok, [text, "Short one."], "de", params, "en", batch_size=2)
    assert calls == [
        (
            [
                "The weather was beautiful.",
                "We walked along the river.",
                "Then we had dinner.",
                "It was late!",
                "Short one.",
            ],
            2,
        )
    ]
    assert len(out) == 2 and out[0].count("\n") == 2 and out[0].split("\n")[1] == ""  # the line layout is kept
    system = translate.build_messages("x", "German", "English")[0]["content"]
    assert "from English into German" in system and "translation only" in system


# ---- eval --model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, keys",
    [
        ("sentiment", {"accuracy", "macro_f1", "confusion_matrix"}),
        ("qa", {"exact_match", "f1"}),
        ("translate", {"bleu", "chrf", "bleu_signature", "chrf_signature", "pairs"}),
        ("code", {"pass@1"}),
        ("write", {"perplexity", "distinct_1", "distinct_2"}),
    ],
)
def test_eval_with_a_model_generates_then_scores(tiny_dir, tmp_path, task, keys, capsys):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                task,
                "--model",
                tiny_dir,
                "--limit",
                "2",
                "--output",
                str(out),
                "--max-new-tokens",
                "8",
                "--seed",
                "0",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed == metrics and keys <= set(metrics) and metrics["task"] == task
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["prediction"], str) for r in rows)
    if task == "write":
        assert metrics["perplexity"] > 1 and math.isfinite(metrics["perplexity"])
    if task == "code":
        assert 0.0 <= metrics["pass@1"] <= 1.0 and all("result" in r for r in rows)


def test_eval_scores_given_predictions_with_the_model_for_perplexity(tiny_dir, tmp_path, capsys):
    preds = tmp_path / "pred.jsonl"
    preds.write_text('{"prediction": "the king was here"}\n{"prediction": "the rain went on"}\n')
    assert (
        main(
            [
                "eval",
                "write",
                "--predictions",
                str(preds),
                "--model",
                tiny_dir,
                "--limit",
                "2",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["distinct_1"] == pytest.approx(7 / 8)  # "the" twice among 8 words
    assert metrics["perplexity"] > 1 and math.isfinite(metrics["perplexity"])
    capsys.readouterr()
