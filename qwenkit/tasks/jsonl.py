"""JSONL files of rows, the applications' data and output format: one JSON object per line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from qwenkit.errors import DataError
from qwenkit.files import atomic_write


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSONL file, blank lines skipped; a bad line is a DataError naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not JSON ({e.msg})", file=path, line=n) from None
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}", file=path, line=n)
            rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    """Write rows as JSONL, atomically: a reader sees the old file or the whole new one."""
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
