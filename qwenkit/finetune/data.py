"""Fine-tuning data: files in the formats people have, turned into token ids and assistant-only labels.

Rows come from JSONL, JSON (an array of objects) or CSV files, or a folder saved by the `datasets`
library (where it is installed), in one of three formats, detected from the first row or named:

- alpaca: `instruction`, `input` (optional), `output`, `system` (optional);
- sharegpt: `conversations` of `{"from", "value"}` (from: system, human, gpt, tool...), optional
  top-level `system` and `tools`;
- openai: `messages` of `{"role", "content"}` (tool calls allowed), optional `tools`.

Each row becomes a conversation that is checked (roles in order, no empty assistant turn) and
rendered with the chat template by `qwenkit.chat.encode_chat`; the labels are the ids on assistant
tokens, each turn's closing `<|im_end|>` included, and -100 elsewhere (padding too: pad is not eos).
A bad row is an error naming the file, the line and what is wrong; with `skip_bad_rows` it is
skipped and counted instead, never silently.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwenkit.errors import DataError

IGNORE_INDEX = -100
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


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict] | None
    where: str  # "file:line", for errors


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE_INDEX where nothing is learned
    position_ids: list[int] | None = None  # set by packing

    def __len__(self) -> int:
        return len(self.input_ids)


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


def read_records(path: str | os.PathLike, split: str | Sequence[str] | None = None) -> Iterator[tuple[str, Any]]:
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
        raise DataError(f"{p}: no such data file")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(p)
    elif suffix == ".json":
        yield from _read_json(p)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(p, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(
            f"{p}: unknown data file type {suffix!r}; use .jsonl, .json or .csv "
            "(or a folder saved by the datasets library)"
        )


def _read_jsonl(p: Path):
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{p}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{p}:{n}", DataError(f"{p}:{n}: not JSON ({e.msg} at column {e.colno})")


def _read_json(p: Path):
    text = p.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    pos = _skip_ws(text, 0)
    if text.startswith("{", pos):
        # One object holding the rows (e.g. {"data": [...]}) or a single row.
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: not JSON ({e.msg} at column {e.colno})") from None
        lists = [v for v in obj.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) == 1 and not _looks_like_row(obj):
            for i, rec in enumerate(lists[0]):
                yield f"{p}: item {i}", rec
        else:
            yield f"{p}:{line_of(pos)}", obj
        return
    if not text.startswith("[", pos):
        raise DataError(f"{p}:{line_of(pos)}: not JSON (expected an array of rows)")
    pos = _skip_ws(text, pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        try:
            rec, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # The rest of the file cannot be split into rows: an error even with skip_bad_rows.
            raise DataError(f"{p}:{e.lineno}: not JSON ({e.msg} at column {e.colno})") from None
        yield f"{p}:{line_of(pos)}", rec
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("]", pos):
            return
        else:
            raise DataError(f"{p}:{line_of(pos)}: not JSON (expected ',' or ']' between rows)")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _looks_like_row(obj: Mapping) -> bool:
    return any(k in obj for k in ("messages", "conversations", "instruction", "output"))


def _read_csv(p: Path, delimiter: str):
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        start = reader.line_num + 2  # the header is line 1
        for row in reader:
            if None in row:
                yield f"{p}:{start}", DataError(f"{p}:{start}: more cells than the header has columns")
            else:
                yield f"{p}:{start}", {k: v for k, v in row.items() if k is not None}
            start = reader.line_num + 1


def _read_datasets_folder(p: Path, split: str | None):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{p}: a folder of data needs the `datasets` library (pip install datasets); "
            "or give a .jsonl, .json or .csv file"
        ) from None
    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as e:
        raise DataError(f"{p}: not a folder saved by datasets.save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        wanted = [split] if isinstance(split, str) else list(split or ["train"])
        choice = next((s for s in wanted if s in ds), names[0] if len(names) == 1 else None)
        if choice is None:
            raise DataError(f"{p}: no split {' or '.join(map(repr, wanted))}; the folder has {', '.join(names)}")
        ds = ds[choice]
    for i, rec in enumerate(ds):
        yield f"{p}: row {i}", rec


# ---- formats -----------------------------------------------------------------------------------------


def detect_format(record: Any, where: str) -> str:
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
    raise DataError(
        f"{where}: cannot tell the format (fields: {fields}); expected 'messages' (openai), "
        "'conversations' (sharegpt) or 'instruction'/'output' (alpaca); or set format:"
    )


def to_conversation(record: Any, fmt: str, where: str) -> Conversation:
    """A row in format `fmt` as checked chat messages; DataError (file, line, what) otherwise."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        messages = _alpaca(record, where)
    elif fmt == "sharegpt":
        messages = _sharegpt(record, where)
    else:
        messages = _openai(record, where)
    tools = _json_field(record, "tools", where) if record.get("tools") not in (None, "", []) else None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
        raise DataError(f"{where}: field 'tools' must be a list of JSON schemas")
    check_roles(messages, where, "conversations" if fmt == "sharegpt" else "messages")
    return Conversation(messages, tools, where)


def _field(record: Mapping, name: str, where: str, fmt: str) -> Any:
    if name not in record or record[name] is None:
        raise DataError(f"{where}: missing field '{name}' ({fmt} format)")
    return record[name]


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def _json_field(record: Mapping, name: str, where: str) -> Any:
    value = record[name]
    if isinstance(value, str):  # CSV cells hold JSON as text
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field '{name}' is not JSON ({e.msg} at column {e.colno})") from None
    return value


def _alpaca(record: Mapping, where: str) -> list[dict]:
    instruction = _text(_field(record, "instruction", where, "alpaca"), where, "field 'instruction'")
    output = _text(_field(record, "output", where, "alpaca"), where, "field 'output'")
    extra = _text(record.get("input") or "", where, "field 'input'")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    system = record.get("system")
    if system:
        messages.insert(0, {"role": "system", "content": _text(system, where, "field 'system'")})
    return messages


def _turns(record: Mapping, field: str, where: str, fmt: str, shape: str) -> list:
    """The record's list of turns (a JSON string of one is accepted too), or an error naming the field."""
    turns = _json_field(record, field, where) if field in record else None
    if turns is None:
        raise DataError(f"{where}: missing field '{field}' ({fmt} format)")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of {{{shape}}}")
    return turns


def _sharegpt(record: Mapping, where: str) -> list[dict]:
    turns = _turns(record, "conversations", where, "sharegpt", "from, value")
    messages = []
    system = record.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system, where, "field 'system'")})
    for i, t in enumerate(turns):
        if not isinstance(t, Mapping):
            raise DataError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
        for key in ("from", "value"):
            if t.get(key) is None:
                raise DataError(f"{where}: missing field '{key}' in conversations[{i}]")
        role = _SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise DataError(
                f"{where}: conversations[{i}] has unknown speaker {t['from']!r} "
                f"(known: {', '.join(sorted(_SHAREGPT_ROLES))})"
            )
        messages.append({"role": role, "content": _text(t["value"], where, f"conversations[{i}].value")})
    return messages


def _openai(record: Mapping, where: str) -> list[dict]:
    turns = _turns(record, "messages", where, "openai", "role, content")
    messages = []
    for i, m in enumerate(turns):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if m.get("role") is None:
            raise DataError(f"{where}: missing field 'role' in messages[{i}]")
        if "content" not in m and not m.get("tool_calls"):
            raise DataError(f"{where}: missing field 'content' in messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise DataError(f"{where}: messages[{i}] has a non-text content part; only text is supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is not None and not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string, got {type(content).__name__}")
        message = {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "name", "tool_call_id")}
        message["content"] = content
        messages.append(message)
    return messages


def check_roles(messages: Sequence[Mapping], where: str, field_name: str = "messages") -> None:
    """System first (optional), then user, then assistant and user (or tool results) in turn; at
    least one assistant turn, none of them empty."""
    allowed = {
        None: {"system", "user"},
        "system": {"user"},
        "user": {"assistant"},
        "assistant": {"user", "tool"},
        "tool": {"tool", "assistant"},
    }
    previous = None
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise DataError(
                f"{where}: {field_name}[{i}] has unknown role {role!r} (expected system, user, assistant or tool)"
            )
        if role not in allowed[previous]:
            after = f"after {previous!r}" if previous else "as the first turn"
            expected = " or ".join(sorted(allowed[previous]))
            raise DataError(f"{where}: wrong role order: {role!r} at {field_name}[{i}] {after} (expected {expected})")
        if role == "assistant" and not (m.get("content") or "").strip() and not m.get("tool_calls"):
            raise DataError(f"{where}: empty assistant turn at {field_name}[{i}]")
        if role in ("user", "system") and not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {field_name}[{i}] ({role}) has no text content")
        previous = role
    if not any(m.get("role") == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to learn")


def _reason(error: DataError) -> str:
    """The kind of a row error, for the skipped-rows count ("missing field 'output'" -> "missing field")."""
    text = str(error).split(": ", 1)[-1]
    for kind in (
        "missing field",
        "wrong role order",
        "empty assistant turn",
        "not JSON",
        "no assistant turn",
        "unknown speaker",
        "unknown role",
    ):
        if kind in text:
            return kind
    return "invalid row"


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
        raise DataError(
            f"{path}: no usable rows" + (f" ({sum(stats.skipped.values())} bad rows skipped)" if stats.skipped else "")
        )
    stats.rows, stats.format = len(out), fmt
    return out, stats


# ---- tokenization, packing, batches ----------------------------------------------------------------


def tokenize(
    tok, conversations: Sequence[Conversation], max_seq_len: int, stats: DataStats | None = None
) -> list[Sample]:
    """Ids and assistant-only labels for each conversation, truncated to max_seq_len.

    Args:
        tok: the qwenkit Tokenizer (its chat template renders the conversations).
        conversations: from `load_conversations`.
        max_seq_len: longer rows are cut (counted in stats.truncated); a row with no assistant
            token left is dropped (counted in stats.dropped_no_target).
        stats: a DataStats to count into.
    """
    from qwenkit.chat import encode_chat

    stats = stats if stats is not None else DataStats()
    samples = []
    for c in conversations:
        try:
            ids, mask = encode_chat(tok, c.messages, tools=c.tools)
        except (ValueError, TypeError) as e:
            raise DataError(f"{c.where}: {e}") from None
        if len(ids) > max_seq_len:
            stats.truncated += 1
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        # The first label is never a target (nothing predicts it), so it cannot count as one.
        if not any(label != IGNORE_INDEX for label in labels[1:]):
            stats.dropped_no_target += 1
            continue
        samples.append(Sample(ids, labels))
    return samples


def pack(samples: Sequence[Sample], max_seq_len: int, seed: int = 0) -> list[Sample]:
    """Concatenate samples (in a seeded random order) into sequences of at most max_seq_len tokens.

    Positions restart at 0 at each sample, which tells the model to start a new attention block;
    no label crosses a boundary, since each sample's first token is a prompt token (label -100).

    Args:
        samples: tokenized samples, each at most max_seq_len long.
        max_seq_len: the packed sequences' length limit.
        seed: the shuffle's seed.
    """
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    packs: list[Sample] = []
    current = Sample([], [], [])
    for i in order:
        s = samples[i]
        if current.input_ids and len(current) + len(s) > max_seq_len:
            packs.append(current)
            current = Sample([], [], [])
        current.input_ids += s.input_ids
        current.labels += [IGNORE_INDEX] + s.labels[1:]
        current.position_ids += list(range(len(s)))
    if current.input_ids:
        packs.append(current)
    return packs


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sample of the batch (dynamic padding, on the right).

    Padding has attention_mask 0 and label -100, so the pad id (the eos-like `<|endoftext|>`) is never
    learned and `<|im_end|>` never masked.
    """
    T = max(len(s) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    packed = any(s.position_ids is not None for s in samples)
    position_ids = torch.zeros((B, T), dtype=torch.long) if packed else None  # (B, T)
    for b, s in enumerate(samples):
        n = len(s)
        input_ids[b, :n] = torch.tensor(s.input_ids)
        labels[b, :n] = torch.tensor(s.labels)
        attention_mask[b, :n] = 1
        if packed:
            position_ids[b, :n] = torch.tensor(s.position_ids if s.position_ids is not None else range(n))
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if packed:
        batch["position_ids"] = position_ids
    return batch


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


class StepBatches:
    """Which samples each process gets at each optimizer step: a pure function of the step.

    Each epoch is a seeded permutation of the samples; a step takes the next global batch of
    batch_size x grad_accum x world_size samples (an epoch's remainder is dropped), and process `rank`
    gets rows [rank * batch_size, (rank + 1) * batch_size) of each accumulation slice. So the
    data position is the step count alone, which makes resuming exact, and the same global batch
    splits the same way across any number of processes.

    Args:
        samples: the training samples (packed or not).
        batch_size: sequences per micro-batch per process.
        grad_accum: micro-batches per step.
        world_size, rank: the process group.
        seed: the data order's seed.
        pad_id: the padding id.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        seed: int,
        pad_id: int,
    ):
        self.samples, self.batch_size, self.grad_accum = samples, batch_size, grad_accum
        self.world_size, self.rank, self.seed, self.pad_id = world_size, rank, seed, pad_id
        self.global_batch = batch_size * grad_accum * world_size
        self.steps_per_epoch = len(samples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(samples)} training sequences do not fill one step of batch_size x grad_accum "
                f"x processes = {self.global_batch}: lower batch_size or grad_accum"
            )
        self._epoch, self._order = -1, None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of optimizer step `step` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.samples), generator=g).tolist()
        return self._order

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This process's grad_accum micro-batches for optimizer step `step`."""
        epoch, index = self.position(step)
        order = self.order(epoch)
        start = index * self.global_batch
        out = []
        for m in range(self.grad_accum):
            lo = start + (m * self.world_size + self.rank) * self.batch_size
            out.append(collate([self.samples[i] for i in order[lo : lo + self.batch_size]], self.pad_id))
        return out


def eval_batches(samples: Sequence[Sample], batch_size: int, world_size: int, rank: int, pad_id: int):
    """This process's share of the validation samples, in batches; every sample counts once overall.

    Every process gets the same number of batches (FSDP needs each forward on all of them): a
    process with fewer samples fills in with a copy whose labels are all -100, which adds nothing.
    """
    mine = list(samples[rank::world_size])
    per_rank = -(-len(samples) // world_size)
    filler = Sample(samples[0].input_ids, [IGNORE_INDEX] * len(samples[0]))
    mine += [filler] * (per_rank - len(mine))
    for i in range(0, len(mine), batch_size):
        yield collate(mine[i : i + batch_size], pad_id)


__all__ = [
    "Conversation",
    "DataError",
    "DataStats",
    "FORMATS",
    "IGNORE_INDEX",
    "Sample",
    "StepBatches",
    "check_roles",
    "collate",
    "detect_format",
    "eval_batches",
    "load_conversations",
    "pack",
    "read_records",
    "split_validation",
    "to_conversation",
    "tokenize",
]
