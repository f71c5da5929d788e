"""The applications' commands: `write`, `qa`, `translate`, `sentiment`, `code` and `eval`.

Typed functions over the tasks of qwenkit.tasks, whose signatures become the flags and whose
docstrings become `--help`. Heavy imports happen inside them, so `qwenkit --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Literal

from qwenkit.cli.common import Decoding, Sampling, WeightFlags, Weights, load_from_flags
from qwenkit.cli.signature import Flags
from qwenkit.errors import DataError, UserError
from qwenkit.tasks import EvalOptions

if TYPE_CHECKING:
    from qwenkit.tasks.base import GenerativeTask


def _sampling(task: GenerativeTask, m, sampling: Sampling):
    """The command's decoding: its task's defaults (greedy, or the checkpoint's sampling for write)."""
    return task.sampling(m, sampling.max_new_tokens, sampling.temperature, sampling.seed)


def write(
    prompt: str,
    *,
    model: str = "default",
    style: Literal["continue", "story", "news", "dialogue"] = "continue",
    sampling: Decoding = Sampling(max_new_tokens=256),
    weights: WeightFlags = Weights(),
) -> int:
    """Write with the model: continue a text, or write a story, a news article or a dialogue from a prompt.

    Sampling follows the checkpoint's generation_config.json (creative writing is sampled); pass
    --temperature 0 for greedy output.

    Args:
        prompt: the beginning to continue, or what to write about.
        model: a checkpoint folder, a .gguf file, a hub id, or "default" (a 135M stand-in; see `qwenkit models`).
        style: continue (the text itself, continued), story, news or dialogue.
        max_new_tokens: the longest piece, in tokens.
        temperature: sampling temperature; 0 means greedy.
        seed: random seed, to reproduce a sampled piece.
    """
    from qwenkit.tasks import write as task

    m, tok = load_from_flags(model, weights.dtype, weights.quantize, weights.adapter)
    params = _sampling(task.TASK, m, sampling)
    piece = task.write(m, tok, [prompt], params, style)[0]
    print(task.join(prompt, piece) if style == "continue" else piece)
    return 0


def qa(
    question: str,
    *,
    model: str = "default",
    context: list[str] | None = None,
    top_k: int = 3,
    sampling: Decoding = Sampling(max_new_tokens=128),
    weights: WeightFlags = Weights(),
) -> int:
    """Answer a question, closed-book or from given documents, citing the passages the answer used.

    With --context, the documents are split into passages; when there are more than --top-k of them,
    the most relevant are chosen by BM25. The answer is printed, then the passages it cites.

    Args:
        question: the question.
        model: a checkpoint folder, a .gguf file, a hub id, or "default" (a 135M stand-in; see `qwenkit models`).
        context: a document: a file, a folder of .txt/.md files, or the text itself (repeat for several).
        top_k: how many passages to retrieve and show the model.
        max_new_tokens: the longest reply, in tokens.
        temperature: sampling temperature (default: greedy).
        seed: random seed, to reproduce a sampled answer.
    """
    from qwenkit.tasks import qa as task

    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    m, tok = load_from_flags(model, weights.dtype, weights.quantize, weights.adapter)
    params = _sampling(task.TASK, m, sampling)
    result = task.answer(m, tok, [question], params, [context], top_k)[0]
    print(result.answer or "(no answer)")
    if context:
        if result.citations:
            print("Sources:")
            for p in result.citations:
                excerpt = p.text if len(p.text) <= 100 else p.text[:97] + "..."
                print(f"  [{p.number}] {p.source}: {excerpt}")
        else:
            print("Sources: none cited")
    return 0


def translate(
    text: str,
    *,
    model: str = "default",
    to: str,
    from_: str | None = None,
    batch_size: int = 8,
    sampling: Decoding = Sampling(max_new_tokens=256),
    weights: WeightFlags = Weights(),
) -> int:
    """Translate text into another language; prints the translation only.

    Languages are codes or names as people write them (fr, fra, French, français, pt-BR, 中文). Without
    --from, the source language is detected (a heuristic on the script and common words, reported on
    stderr). Long text is split into sentences, translated in batches, and joined back, line breaks
    kept. Pass - as the text to read it from standard input.

    Args:
        text: the text to translate, or - for standard input.
        model: a checkpoint folder, a .gguf file, a hub id, or "default" (a 135M stand-in; see `qwenkit models`).
        to: the target language.
        from_: the source language (default: detected).
        batch_size: sentences translated together.
        max_new_tokens: the longest translation of one sentence, in tokens.
        temperature: sampling temperature (default: greedy).
        seed: random seed, to reproduce a sampled translation.
    """
    from qwenkit.tasks import translate as task

    if text == "-":
        text = sys.stdin.read()
    target = task.resolve_language(to)
    source = task.resolve_language(from_) if from_ else None
    if source is None:
        detected = task.detect_language(text)
        source = task.resolve_language(detected)
        print(f"source language: {source[1]} (detected)", file=sys.stderr)
    m, tok = load_from_flags(model, weights.dtype, weights.quantize, weights.adapter)
    params = _sampling(task.TASK, m, sampling)
    print(task.translate(m, tok, [text], target[0], params, source[0], batch_size)[0])
    return 0


def sentiment(
    text: str | None = None,
    *,
    model: str = "default",
    labels: str = "positive,negative,neutral",
    input: str | None = None,
    output: str | None = None,
    batch_size: int = 8,
    calibrate: bool = False,
    weights: WeightFlags = Weights(),
) -> int:
    """Classify the sentiment of a text, or of every row of a JSONL file, with the labels' probabilities.

    Each label is scored by its log-likelihood as the assistant's reply under the chat template, and
    the probabilities are the softmax over those scores (no free text is parsed). A file's rows need
    a "text" field; each comes back with "prediction" and "probabilities", in --output or on stdout.

    Args:
        text: the text to classify.
        model: a checkpoint folder, a .gguf file, a hub id, or "default" (a 135M stand-in; see `qwenkit models`).
        labels: the candidate labels, comma-separated.
        input: a JSONL file of rows with "text", classified in batches with a progress bar.
        output: where the classified rows of --input go (default: standard output).
        batch_size: texts scored together.
        calibrate: correct for the model's prior over the labels (contextual calibration, Zhao et al. 2021).
    """
    from qwenkit.tasks import sentiment as task
    from qwenkit.tasks.jsonl import read_jsonl, write_jsonl

    if (text is None) == (input is None):
        raise UserError("give either a TEXT or --input FILE.jsonl")
    names = [label.strip() for label in labels.split(",") if label.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise UserError(f"--labels needs at least two distinct labels, got {labels!r}")
    rows = None
    if input is not None:
        rows = read_jsonl(input)
        bad = [n for n, r in enumerate(rows, 1) if not isinstance(r.get("text"), str)]
        if bad:
            raise DataError(f'row(s) {", ".join(map(str, bad[:5]))} have no "text" string', file=input)
    m, tok = load_from_flags(model, weights.dtype, weights.quantize, weights.adapter)
    if rows is None:
        result = task.classify(m, tok, [text], names, calibrate=calibrate)[0]
        print(result.label)
        for label, p in sorted(result.probabilities.items(), key=lambda kv: -kv[1]):
            print(f"  {label}: {p:.3f}")
        return 0
    scored = task.SentimentTask(tuple(names), calibrate).predict(m, tok, rows, batch_size)
    if output is None:
        for row in scored:
            print(json.dumps(row, ensure_ascii=False))
    else:
        write_jsonl(output, scored)
        print(f"wrote {len(scored)} rows to {output}", file=sys.stderr)
    return 0


def code(
    task: str,
    *,
    model: str = "default",
    lang: str = "python",
    test: str | None = None,
    entry_point: str | None = None,
    repair: int = 0,
    timeout: float = 10.0,
    sampling: Decoding = Sampling(max_new_tokens=512),
    weights: WeightFlags = Weights(),
) -> int:
    """Generate code for a task; with --test, run the tests in the sandbox, and with --repair N, feed
    failures back and retry up to N times.

    The code is taken from the reply's fenced block and printed on stdout; what happened (code
    found or not, each attempt's test result) goes to stderr. The exit status is 0 when the tests
    pass (or, without tests, when code was found) and 1 otherwise. The sandbox is a subprocess with
    a timeout, resource limits, an empty environment, no network and, where Linux allows, a
    read-only filesystem outside its own temporary folder.

    Args:
        task: what the code should do.
        model: a checkpoint folder, a .gguf file, a hub id, or "default" (a 135M stand-in; see `qwenkit models`).
        lang: the programming language (tests run for python only).
        test: a Python file of tests: asserts, or a HumanEval-style check(candidate) function.
        entry_point: the function check() is called with (default: the last function the code defines).
        repair: how many times to retry with the test failures fed back.
        timeout: seconds each test run may take.
        max_new_tokens: the longest reply, in tokens.
        temperature: sampling temperature (default: greedy).
        seed: random seed, to reproduce sampled replies.
    """
    from pathlib import Path

    from qwenkit.tasks import code as app

    if repair < 0:
        raise UserError(f"--repair must be >= 0, got {repair}")
    tests = None
    if test is not None:
        try:
            tests = Path(test).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"--test {test}: {e.strerror}") from None
        if app.normalize_lang(lang) != "python":
            raise UserError(f"--test runs Python tests; --lang {lang} cannot be tested")
    m, tok = load_from_flags(model, weights.dtype, weights.quantize, weights.adapter)
    params = _sampling(app.TASK, m, sampling)
    result = app.generate_code(
        m, tok, task, params, lang=lang, tests=tests, entry_point=entry_point, repair=repair, timeout=timeout
    )
    for n, attempt in enumerate(result.attempts, 1):
        found = (
            f"code found ({len(attempt.code.splitlines())} lines)"
            if attempt.code.strip()
            else "no code found in the reply"
        )
        outcome = f"; tests {attempt.result.summary()}" if attempt.result is not None else ""
        print(f"attempt {n}: {found}{outcome}", file=sys.stderr)
    if result.code.strip():
        print(result.code, end="")
    else:
        print(f"the reply was:\n{result.attempts[-1].reply}", file=sys.stderr)
    if result.passed is None:
        return 0 if result.code.strip() else 1
    print("tests passed" if result.passed else f"tests failed after {len(result.attempts)} attempt(s)", file=sys.stderr)
    return 0 if result.passed else 1


def eval_(
    task: Literal["sentiment", "qa", "translate", "code", "write"],
    *,
    data: str | None = None,
    model: str | None = None,
    options: Annotated[EvalOptions, Flags()] = EvalOptions(),  # passed on to `evaluate` as they are
    weights: WeightFlags = Weights(),
) -> int:
    """Evaluate a task with its standard metric: generate with --model then score, or score
    --predictions made elsewhere (no model needed; given both, the model only scores, as write's
    reference perplexity needs).

    Metrics: sentiment accuracy, macro-F1 and confusion matrix; qa SQuAD exact match and F1;
    translate sacreBLEU BLEU and chrF with signatures; code pass@1 (pass@k with --samples); write
    perplexity of the references (needs --model) and distinct-1/2. Writes predictions.jsonl and
    metrics.json into --output and prints the metrics.

    Args:
        task: sentiment, qa, translate, code or write.
        data: a JSONL file in the task's format (default: the sample file shipped with qwenkit).
        model: a checkpoint folder, to generate the predictions.
        predictions: a JSONL file of rows with "prediction" (code: HumanEval samples with task_id and
            "completion" or "prediction", the completion appended to the prompt).
        limit: evaluate the first N rows (code: problems) only.
        output: the folder for predictions.jsonl and metrics.json (default: eval-TASK).
        batch_size: rows generated together.
        max_new_tokens: the longest generation (default: per task).
        temperature: sampling temperature (default: greedy; write, and any task with --samples, use the
            checkpoint's).
        samples: replies per row (not for sentiment, which scores fixed labels); code scores pass@k over them.
        timeout: seconds each code program may run.
        seed: random seed for sampled generation.
    """
    from qwenkit.tasks.evaluate import evaluate

    m = tok = None
    if model is None and weights.adapter is not None:
        raise UserError("--adapter goes on a --model; scoring --predictions needs neither")
    if model is not None:
        m, tok = load_from_flags(model, weights.dtype, weights.quantize, weights.adapter)
    result = evaluate(task, data, model=m, tok=tok, **vars(options))
    print(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"wrote predictions.jsonl and metrics.json to {options.output or f'eval-{task}'}", file=sys.stderr)
    return 0


COMMANDS = {"write": write, "qa": qa, "translate": translate, "sentiment": sentiment, "code": code, "eval": eval_}
