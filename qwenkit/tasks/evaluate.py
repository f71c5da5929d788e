"""`qwenkit eval`: generate with a model then score, or score predictions made elsewhere.

Generic over `tasks.base.Task`: what differs between tasks (their fields, how rows are named, their
decoding defaults, how they predict and score) is asked of the task. Data are JSONL rows in the
task's format (see the table in `qwenkit.tasks`); predictions are rows carrying a `prediction` field
(or `completion`, as HumanEval's samples.jsonl): either the data rows themselves with the field
added, or rows joined to the data by the task's key field (`Task.key`), or by line order. The
output folder gets predictions.jsonl (every row, scored) and metrics.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from qwenkit.errors import DataError, UserError
from qwenkit.files import atomic_write
from qwenkit.model import QwenForCausalLM
from qwenkit.tasks import EvalOptions, get_task, sample_data
from qwenkit.tasks.base import CategoricalTask, Context, GenerativeTask, Task
from qwenkit.tasks.jsonl import read_jsonl, write_jsonl
from qwenkit.tokenizer import Tokenizer


def has_fields(task: Task, row: dict) -> bool:
    return all(f in row for f in task.required)


def check_rows(task: Task, rows: Sequence[dict], file: str | Path) -> None:
    """Every row has the task's fields, or a DataError says which row lacks which."""
    for n, row in enumerate(rows, 1):
        missing = [f for f in task.required if f not in row]
        if missing:
            needs = ", ".join(task.required)
            raise DataError(f"row {n}: missing {', '.join(missing)} (a {task.name} row needs {needs})", file=file)


def with_prediction(row: dict, n: int, file: str | Path | None = None) -> dict:
    """A prediction row with its `prediction` field, read from HumanEval's `completion` if need be."""
    if "prediction" not in row and "completion" in row:
        row = {**row, "prediction": row["completion"]}
    if "prediction" not in row:
        raise DataError(f"row {n}: no `prediction` field", file=file)
    return row


def join_predictions(
    task: Task | str, data: Sequence[dict], predictions: Sequence[dict], file: str | Path | None = None
) -> list[dict]:
    """Data rows with their predictions: predictions that carry the task's fields stand alone; else
    they are joined by the task's key field (several predictions may name one row), or by line order.

    Args:
        task: the task, or its name.
        data: the data rows.
        predictions: rows with `prediction` (or `completion`).
        file: where the predictions come from, for error messages.
    """
    task = get_task(task) if isinstance(task, str) else task
    preds = [with_prediction(p, n, file) for n, p in enumerate(predictions, 1)]
    if all(has_fields(task, p) for p in preds):
        return preds
    key = task.key
    if preds and all(key in p for p in preds) and all(key in row for row in data):
        by_key = {row[key]: row for row in data}
        missing = [p[key] for p in preds if p[key] not in by_key]
        if missing:
            raise DataError(f"predictions for unknown {key}(s): {', '.join(map(str, missing[:5]))}", file=file)
        return [{**by_key[p[key]], **p} for p in preds]
    if len(preds) != len(data):
        raise DataError(f"{len(preds)} predictions for {len(data)} data rows, and no {key} to join them by", file=file)
    return [{**row, **p} for row, p in zip(data, preds)]


def limit_predictions(task: Task, rows: Sequence[dict], preds: Sequence[dict], limit: int | None) -> list[dict]:
    """The predictions of the first `limit` rows: those whose key names one of `rows` (the data's
    first rows, or with no data the first `limit` keys the predictions name), else the first `limit`."""
    if limit is None:
        return list(preds)
    key = task.key
    if not all(key in p for p in preds):
        return list(preds[:limit])
    if rows and all(key in r for r in rows):
        keep = {r[key] for r in rows}
    else:
        keep = set(list(dict.fromkeys(p[key] for p in preds))[:limit])
    return [p for p in preds if p[key] in keep]


def generate_predictions(
    task: Task, model: QwenForCausalLM, tok: Tokenizer, rows: Sequence[dict], options: EvalOptions
) -> list[dict]:
    """The task's predictions for rows: a categorical task scores its answers; a generative one
    decodes `options.samples` replies per row, with its own decoding defaults unless the options set them."""
    if isinstance(task, CategoricalTask):
        if options.samples != 1:
            raise UserError(f"--samples: {task.name} scores fixed answers, so it has one prediction per row")
        return task.predict(model, tok, rows, options.batch_size)
    if not isinstance(task, GenerativeTask):
        raise TypeError(f"task {task.name!r} is neither a GenerativeTask nor a CategoricalTask")
    params = task.sampling(model, options.max_new_tokens, options.temperature, options.seed, options.samples)
    return task.predict(model, tok, [row for row in rows for _ in range(options.samples)], params, options.batch_size)


def evaluate(
    task: str | Task,
    data: str | Path | None = None,
    *,
    model: QwenForCausalLM | None = None,
    tok: Tokenizer | None = None,
    **options,
) -> dict:
    """Score a task, from predictions or by generating them; write predictions.jsonl and metrics.json.

    Args:
        task: a task of `qwenkit.tasks.TASKS`, or its name.
        data: the JSONL data (default: the task's sample file shipped with qwenkit).
        model: a loaded model, to generate predictions; with `predictions` too, it only scores (the
            metrics that need the model, as write's reference perplexity).
        tok: its tokenizer.
        options: `EvalOptions`' fields, which it documents: predictions, limit, output, batch_size,
            max_new_tokens, temperature, samples, timeout and seed (another name is a TypeError).
    """
    task = get_task(task) if isinstance(task, str) else task
    opts = EvalOptions(**options)
    data_path = Path(data) if data is not None else sample_data(task.name)
    preds = None
    if opts.predictions is not None:
        lines = read_jsonl(opts.predictions)
        if not lines:
            raise DataError("no predictions in the file", file=opts.predictions)
        preds = [with_prediction(p, n, opts.predictions) for n, p in enumerate(lines, 1)]
    # Predictions that carry the task's fields are scored as they are; only then is --data not needed.
    standalone = preds is not None and all(has_fields(task, p) for p in preds)
    all_rows = [] if standalone and data is None else read_jsonl(data_path)
    if not standalone and not all_rows:
        raise DataError("no rows in the data file", file=data_path)
    if not standalone:
        task = task.for_data(all_rows)
    rows = all_rows[: opts.limit]
    started = time.time()
    if preds is not None:
        # Standalone predictions are limited by their own keys, joined ones by the data's first rows.
        kept = limit_predictions(task, [] if standalone else rows, preds, opts.limit)
        records = join_predictions(task, rows, kept, opts.predictions)
        check_rows(task, records, opts.predictions)
    elif model is not None and tok is not None:
        check_rows(task, rows, data_path)
        records = generate_predictions(task, model, tok, rows, opts)
    else:
        raise UserError("give --model to generate predictions, or --predictions FILE to score existing ones")
    scores, scored = task.score(records, Context(model, tok, opts.batch_size, opts.timeout))
    out = Path(opts.output) if opts.output is not None else Path(f"eval-{task.name}")
    write_jsonl(out / "predictions.jsonl", scored)
    result = {
        "task": task.name,
        "data": None if standalone and data is None else str(data_path),
        "predictions": str(opts.predictions) if opts.predictions else None,
        **scores,
        "seconds": round(time.time() - started, 2),
    }
    atomic_write(out / "metrics.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result
