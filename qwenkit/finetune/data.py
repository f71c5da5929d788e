"""Fine-tuning data: the files people have, read into checked conversations.

Rows come from JSONL, JSON (an array of objects) or CSV files, or a folder saved by the `datasets`
library (where it is installed), in one of three formats, detected from the first row or named:

- alpaca: `instruction`, `input` (optional), `output`, `system` (optional);
- sharegpt: `conversations` of `{"from", "value"}` (from: system, human, gpt, tool...), optional
  top-level `system` and `tools`;
- openai: `messages` of `{"role", "content"}` (tool calls allowed), optional `tools`.

Each row becomes a `Conversation` whose roles are checked (in order, no empty assistant turn);
`batches.py` turns conversations into token ids and labels. A bad row is a DataError naming the
file, the line and what is wrong; with `skip_bad_rows` it is skipped and counted instead, never
silently.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwenkit.errors import DataError

FORMATS = ("alpaca", "sharegpt", "openai")
# ShareGPT speakers as the exporters in the wild name them.
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}
# The kinds of bad row that the skipped-rows count tells apart; any other is an "invalid row".
_ROW_ERRORS = (
    "missing field",
    "wrong role order",
    "empty assistant turn",
    "not JSON",
    "no assistant turn",
    "unknown speaker",
    "unknown role",
)


@dataclass(frozen=True)
class Where:
    """Where a row came from: its file and line, or its index where the source has no lines (a
    `datasets` folder, rows listed inside one JSON object)."""

    file: Path
    line: int | None = None
    row: int | None = None

    def error(self, message: str) -> DataError:
        """A DataError about this row (str: "file:line: message" or "file: row N: message")."""
        return DataError(message if self.row is None else f"row {self.row}: {message}", file=self.file, line=self.line)


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict] | None
    where: Where


@dataclass
class DataStats:
    rows: int = 0  # conversations kept
    skipped: Counter = field(default_factory=Counter)  # reason -> rows (skip_bad_rows)
    truncated: int = 0  # rows cut to max_seq_len
    dropped_no_target: int = 0  # rows whose assistant tokens all lay past max_seq_len
    format: str = ""

    def summary(self, name: str) -> str:
        parts = [f"{name}: {self.rows} rows ({self.format})"]
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
            parts.append(f"skipped {sum(self.skipped.values())} bad rows ({reasons})")
        if self.truncated:
            parts.append(f"truncated {self.truncated} rows to max_seq_len")
        if self.dropped_no_target:
            parts.append(f"dropped {self.dropped_no_target} rows with no assistant token within max_seq_len")
        return "; ".join(parts)


# ---- reading records -------------------------------------------------------------------------------


def read_records(path: str | os.PathLike, split: str | Sequence[str] | None = None) -> Iterator[tuple[Where, Any]]:
    """Yield (where, record) for each row of a file or `datasets` folder; `record` is a DataError
    when the row itself cannot be read (e.g. a JSONL line that is not JSON).

    Args:
        path: a .jsonl, .json or .csv file, or a folder saved by `datasets.save_to_disk`.
        split: for a saved DatasetDict, the split to read, or splits in order of preference
            (default: train, or the only split).
    """
    p = Path(path)
    if p.is_dir():
        yield from _read_datasets_folder(p, split)
        return
    if not p.exists():
        raise DataError("no such data file", file=p)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(p)
    elif suffix == ".json":
        yield from _read_json(p)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(p, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(
            f"unknown data file type {suffix!r}; use .jsonl, .json or .csv (or a folder saved by the datasets library)",
            file=p,
        )


def _not_json(e: json.JSONDecodeError, where: Where) -> DataError:
    return where.error(f"not JSON ({e.msg} at column {e.colno})")


def _read_jsonl(p: Path):
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = Where(p, n)
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, _not_json(e, where)


_WHITESPACE = re.compile(r"[ \t\r\n]*")  # JSON's whitespace


def _read_json(p: Path):
    """The rows of a JSON file: an array of row objects, an object holding one list of rows (e.g.
    {"data": [...]}), or a single row."""
    text = p.read_text(encoding="utf-8")
    start = _WHITESPACE.match(text).end()
    if text.startswith("[", start):
        yield from _read_json_array(p, text, start)
    elif text.startswith("{", start):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _not_json(e, Where(p, e.lineno)) from None
        lists = [v for v in obj.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) == 1 and not _looks_like_row(obj):
            for i, rec in enumerate(lists[0]):
                yield Where(p, row=i), rec
        else:
            yield Where(p, text.count("\n", 0, start) + 1), obj
    else:
        raise DataError("not JSON (expected an array of rows)", file=p, line=text.count("\n", 0, start) + 1)


def _read_json_array(p: Path, text: str, pos: int):
    """The rows of a JSON array that starts at text[pos], each named by the line it starts on.

    json.loads would give the rows but not where each one is; raw_decode reads one row and says
    where it ends, so an error can name the line of the bad row.
    """
    decoder = json.JSONDecoder()
    line, counted = 1, 0  # the line of text[counted], counted forward as the rows are read

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    pos = _WHITESPACE.match(text, pos + 1).end()  # past the "["
    if text.startswith("]", pos):
        return
    while True:
        try:
            rec, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # The rest of the file cannot be split into rows: an error even with skip_bad_rows.
            raise _not_json(e, Where(p, e.lineno)) from None
        yield Where(p, line_at(pos)), rec
        pos = _WHITESPACE.match(text, end).end()
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            raise DataError("not JSON (expected ',' or ']' between rows)", file=p, line=line_at(pos))
        pos = _WHITESPACE.match(text, pos + 1).end()


def _looks_like_row(obj: Mapping) -> bool:
    return any(k in obj for k in ("messages", "conversations", "instruction", "output"))


def _read_csv(p: Path, delimiter: str):
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        start = reader.line_num + 2  # the header is line 1
        for row in reader:
            where = Where(p, start)
            if None in row:
                yield where, where.error("more cells than the header has columns")
            else:
                yield where, {k: v for k, v in row.items() if k is not None}
            start = reader.line_num + 1  # a quoted cell may span lines: the next row starts after them


def _read_datasets_folder(p: Path, split: str | Sequence[str] | None):
    try:
        import datasets  # optional: only `datasets` folders need it
    except ImportError:
        raise DataError(
            "a folder of data needs the `datasets` library (pip install datasets); "
            "or give a .jsonl, .json or .csv file",
            file=p,
        ) from None
    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as e:
        raise DataError(f"not a folder saved by datasets.save_to_disk ({e})", file=p) from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        wanted = [split] if isinstance(split, str) else list(split or ["train"])
        choice = next((s for s in wanted if s in ds), names[0] if len(names) == 1 else None)
        if choice is None:
            raise DataError(f"no split {' or '.join(map(repr, wanted))}; the folder has {', '.join(names)}", file=p)
        ds = ds[choice]
    for i, rec in enumerate(ds):
        yield Where(p, row=i), rec


# ---- formats -----------------------------------------------------------------------------------------


def detect_format(record: Any, where: Where) -> str:
    """'openai', 'sharegpt' or 'alpaca', from a row's fields."""
    if isinstance(record, Mapping):
        if "messages" in record:
            return "openai"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record or "output" in record:
            return "alpaca"
        fields = ", ".join(map(repr, record)) or "none"
    else:
        fields = f"a {type(record).__name__}, not an object"
    raise where.error(
        f"cannot tell the format (fields: {fields}); expected 'messages' (openai), "
        "'conversations' (sharegpt) or 'instruction'/'output' (alpaca); or set format:"
    )


def to_conversation(record: Any, fmt: str, where: Where) -> Conversation:
    """A row in format `fmt` as checked chat messages; DataError (file, line, what) otherwise."""
    if not isinstance(record, Mapping):
        raise where.error(f"a row must be a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        messages = _alpaca(record, where)
    elif fmt == "sharegpt":
        messages = _sharegpt(record, where)
    else:
        messages = _openai(record, where)
    tools = _json_field(record, "tools", where) if record.get("tools") not in (None, "", []) else None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
        raise where.error("field 'tools' must be a list of JSON schemas")
    check_roles(messages, where, "conversations" if fmt == "sharegpt" else "messages")
    return Conversation(messages, tools, where)


def _field(record: Mapping, name: str, where: Where, fmt: str) -> Any:
    if name not in record or record[name] is None:
        raise where.error(f"missing field '{name}' ({fmt} format)")
    return record[name]


def _text(value: Any, where: Where, what: str) -> str:
    if not isinstance(value, str):
        raise where.error(f"{what} must be a string, got {type(value).__name__}")
    return value


def _json_field(record: Mapping, name: str, where: Where) -> Any:
    value = record[name]
    if isinstance(value, str):  # CSV cells hold JSON as text
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise where.error(f"field '{name}' is not JSON ({e.msg} at column {e.colno})") from None
    return value


def _alpaca(record: Mapping, where: Where) -> list[dict]:
    instruction = _text(_field(record, "instruction", where, "alpaca"), where, "field 'instruction'")
    output = _text(_field(record, "output", where, "alpaca"), where, "field 'output'")
    extra = _text(record.get("input") or "", where, "field 'input'")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    system = record.get("system")
    if system:
        messages.insert(0, {"role": "system", "content": _text(system, where, "field 'system'")})
    return messages


def _turns(record: Mapping, name: str, where: Where, fmt: str, shape: str) -> list:
    """The record's list of turns (a JSON string of one is accepted too), or an error naming the field."""
    turns = _json_field(record, name, where) if name in record else None
    if turns is None:
        raise where.error(f"missing field '{name}' ({fmt} format)")
    if not isinstance(turns, list) or not turns:
        raise where.error(f"field '{name}' must be a non-empty list of {{{shape}}}")
    return turns


def _sharegpt(record: Mapping, where: Where) -> list[dict]:
    turns = _turns(record, "conversations", where, "sharegpt", "from, value")
    messages = []
    system = record.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system, where, "field 'system'")})
    for i, t in enumerate(turns):
        if not isinstance(t, Mapping):
            raise where.error(f"conversations[{i}] must be an object with 'from' and 'value'")
        for key in ("from", "value"):
            if t.get(key) is None:
                raise where.error(f"missing field '{key}' in conversations[{i}]")
        role = _SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise where.error(
                f"conversations[{i}] has unknown speaker {t['from']!r} (known: {', '.join(sorted(_SHAREGPT_ROLES))})"
            )
        messages.append({"role": role, "content": _text(t["value"], where, f"conversations[{i}].value")})
    return messages


def _openai(record: Mapping, where: Where) -> list[dict]:
    turns = _turns(record, "messages", where, "openai", "role, content")
    messages = []
    for i, m in enumerate(turns):
        if not isinstance(m, Mapping):
            raise where.error(f"messages[{i}] must be an object with 'role' and 'content'")
        if m.get("role") is None:
            raise where.error(f"missing field 'role' in messages[{i}]")
        if "content" not in m and not m.get("tool_calls"):
            raise where.error(f"missing field 'content' in messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise where.error(f"messages[{i}] has a non-text content part; only text is supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is not None and not isinstance(content, str):
            raise where.error(f"messages[{i}].content must be a string, got {type(content).__name__}")
        message = {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "name", "tool_call_id")}
        message["content"] = content
        messages.append(message)
    return messages


# Which role may follow which: system first (optional), then user, then assistant and user (or
# tool results) in turn.
_NEXT_ROLES = {
    None: {"system", "user"},
    "system": {"user"},
    "user": {"assistant"},
    "assistant": {"user", "tool"},
    "tool": {"tool", "assistant"},
}


def check_roles(messages: Sequence[Mapping], where: Where, field_name: str = "messages") -> None:
    """Roles in the order of _NEXT_ROLES; at least one assistant turn, none of them empty."""
    previous = None
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise where.error(f"{field_name}[{i}] has unknown role {role!r} (expected system, user, assistant or tool)")
        if role not in _NEXT_ROLES[previous]:
            after = f"after {previous!r}" if previous else "as the first turn"
            expected = " or ".join(sorted(_NEXT_ROLES[previous]))
            raise where.error(f"wrong role order: {role!r} at {field_name}[{i}] {after} (expected {expected})")
        if role == "assistant" and not (m.get("content") or "").strip() and not m.get("tool_calls"):
            raise where.error(f"empty assistant turn at {field_name}[{i}]")
        if role in ("user", "system") and not isinstance(m.get("content"), str):
            raise where.error(f"{field_name}[{i}] ({role}) has no text content")
        previous = role
    if not any(m.get("role") == "assistant" for m in messages):
        raise where.error("no assistant turn, so nothing to learn")


def _reason(error: DataError) -> str:
    """The kind of a row error, for the skipped-rows count ("missing field 'output'" -> "missing field")."""
    return next((kind for kind in _ROW_ERRORS if kind in error.message), "invalid row")


def load_conversations(
    path: str | os.PathLike, fmt: str = "auto", skip_bad_rows: bool = False, split: str | Sequence[str] | None = None
) -> tuple[list[Conversation], DataStats]:
    """Read and check every row of a data file.

    Args:
        path: a .jsonl, .json or .csv file, or a `datasets` folder.
        fmt: 'alpaca', 'sharegpt', 'openai', or 'auto' (detected from the first readable row).
        skip_bad_rows: skip and count bad rows instead of raising on the first one.
        split: for a saved DatasetDict, the split (or splits in order of preference) to read.
    """
    stats = DataStats()
    out: list[Conversation] = []
    for where, record in read_records(path, split):
        try:
            if isinstance(record, DataError):
                raise record
            if fmt == "auto":
                fmt = detect_format(record, where)
            out.append(to_conversation(record, fmt, where))
        except DataError as e:
            if not skip_bad_rows:
                raise
            stats.skipped[_reason(e)] += 1
    if not out:
        skipped = f" ({sum(stats.skipped.values())} bad rows skipped)" if stats.skipped else ""
        raise DataError(f"no usable rows{skipped}", file=path)
    stats.rows, stats.format = len(out), fmt
    return out, stats


def split_validation(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` of items (at least one) held out."""
    n = len(items)
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise DataError(f"val_fraction {fraction} of {n} rows leaves nothing to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(order[:n_val])
    held = set(val)
    return [items[i] for i in range(n) if i not in held], [items[i] for i in val]


__all__ = [
    "FORMATS",
    "Conversation",
    "DataError",
    "DataStats",
    "Where",
    "check_roles",
    "detect_format",
    "load_conversations",
    "read_records",
    "split_validation",
    "to_conversation",
]
