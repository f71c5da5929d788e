"""`qwenkit eval`: generate with a model then score, or score predictions made elsewhere.

Data are JSONL rows in each task's format (see the table in `qwenkit.tasks`); predictions are rows
carrying a `prediction` field (for code, HumanEval's `completion` is read too): either the data rows
themselves with the field added, or rows joined to the data by `task_id` (code), by `id`, or by
line order. The output folder gets predictions.jsonl (every row, scored) and metrics.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from qwenkit.tasks import TASKS, sample_data
from qwenkit.tasks.common import read_jsonl, write_jsonl


def _module(task: str):
    import importlib

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return importlib.import_module(f"qwenkit.tasks.{task}")


def check_rows(task: str, rows: Sequence[dict], what: str) -> None:
    """Every row has the task's fields, or a ValueError says which row lacks which."""
    required = _module(task).REQUIRED
    for n, row in enumerate(rows, 1):
        missing = [f for f in required if f not in row]
        if missing:
            raise ValueError(
                f"{what}, row {n}: missing {', '.join(missing)} (a {task} row needs {', '.join(required)})"
            )


def join_predictions(task: str, data: Sequence[dict], predictions: Sequence[dict]) -> list[dict]:
    """Data rows with their predictions: predictions that carry the task's fields stand alone; else
    they are joined by task_id (code), by id, or by line order."""
    required = _module(task).REQUIRED
    preds = []
    for n, p in enumerate(predictions, 1):
        if "prediction" not in p and "completion" in p:
            p = {**p, "prediction": p["completion"]}  # human-eval's samples.jsonl
        if "prediction" not in p:
            raise ValueError(f"predictions, row {n}: no `prediction` field")
        preds.append(p)
    if all(all(f in p for f in required) for p in preds):
        return preds
    if task == "code":
        by_id = {row["task_id"]: row for row in data}
        missing = [p.get("task_id") for p in preds if p.get("task_id") not in by_id]
        if missing:
            raise ValueError(f"predictions for unknown task_id(s): {', '.join(map(str, missing[:5]))}")
        return [{**by_id[p["task_id"]], **p} for p in preds]
    if preds and all("id" in p for p in preds) and all("id" in row for row in data):
        by_id = {row["id"]: row for row in data}
        missing = [p["id"] for p in preds if p["id"] not in by_id]
        if missing:
            raise ValueError(f"predictions for unknown id(s): {', '.join(map(str, missing[:5]))}")
        return [{**by_id[p["id"]], **p} for p in preds]
    if len(preds) != len(data):
        raise ValueError(f"{len(preds)} predictions for {len(data)} data rows, and no ids to join them by")
    return [{**row, **p} for row, p in zip(data, preds)]


def evaluate(
    task: str,
    data: str | Path | None = None,
    *,
    model=None,
    tok=None,
    predictions: str | Path | None = None,
    limit: int | None = None,
    output: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    samples: int = 1,
    timeout: float = 10.0,
    seed: int | None = None,
) -> dict:
    """Score a task, from predictions or by generating them; write predictions.jsonl and metrics.json.

    Args:
        task: sentiment, qa, translate, code or write.
        data: the JSONL data (default: the task's sample file shipped with qwenkit).
        model: a loaded model, to generate predictions; with `predictions` too, it only scores (the
            references' perplexity, for write).
        tok: its tokenizer.
        predictions: a JSONL file of rows with `prediction` (or HumanEval's `completion`); no model
            is needed.
        limit: use the first N data rows only.
        output: the folder to write (default: eval-TASK).
        batch_size: rows generated together.
        max_new_tokens: the longest generation (default: per task).
        temperature: sampling temperature (default: greedy, or the checkpoint's for write and for code
            with several samples).
        samples: completions per problem, for code's pass@k.
        timeout: seconds per program, for code.
        seed: random seed for sampled generation.
    """
    from qwenkit.tasks import common

    module = _module(task)
    data_path = Path(data) if data is not None else sample_data(task)
    preds = None
    if predictions is not None:
        preds = [
            {**p, "prediction": p["completion"]} if "prediction" not in p and "completion" in p else p
            for p in read_jsonl(predictions)
        ]
        if not preds:
            raise ValueError(f"{predictions}: no predictions in the file")
    # Predictions that carry the task's fields are scored as they are; only then is --data not needed.
    standalone = preds is not None and all(all(f in p for f in module.REQUIRED) for p in preds)
    all_rows = [] if standalone and data is None else read_jsonl(data_path)
    if not standalone and not all_rows:
        raise ValueError(f"{data_path}: no rows in the data file")
    rows = all_rows[:limit]
    extra = {}
    if task == "sentiment" and not standalone and all("label" in r for r in all_rows):
        # the whole file's labels, so that a --limit slice is classified and scored among the same ones
        extra["labels"] = module.dataset_labels(all_rows)
    started = time.time()
    if preds is not None:
        if limit is not None and task == "code" and not standalone:
            keep = {r["task_id"] for r in rows}
            preds = [p for p in preds if p.get("task_id") in keep]
        elif limit is not None and task == "code":
            keep = list(dict.fromkeys(p.get("task_id") for p in preds))[:limit]
            preds = [p for p in preds if p.get("task_id") in keep]
        elif limit is not None:
            preds = preds[:limit]
        records = join_predictions(task, rows, preds)
        check_rows(task, records, str(predictions))
    elif model is not None:
        check_rows(task, rows, str(data_path))
        defaults = {"write": 256, "code": 512, "translate": 256, "qa": 64, "sentiment": 1}
        sampled = task == "write" or (task == "code" and samples > 1)
        params = common.sampling(model, max_new_tokens or defaults[task], temperature, seed, greedy=not sampled)
        if task == "code":
            records = module.predict(model, tok, rows, params, batch_size, samples=samples)
        elif task == "sentiment":
            records = module.predict(model, tok, rows, batch_size, **extra)
        else:
            records = module.predict(model, tok, rows, params, batch_size)
    else:
        raise ValueError("give --model to generate predictions, or --predictions FILE to score existing ones")
    scores, scored = module.score(records, model=model, tok=tok, timeout=timeout, **extra)
    out = Path(output) if output is not None else Path(f"eval-{task}")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "predictions.jsonl", scored)
    result = {
        "task": task,
        "data": None if standalone and data is None else str(data_path),
        "predictions": str(predictions) if predictions else None,
        **scores,
        "seconds": round(time.time() - started, 2),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result
