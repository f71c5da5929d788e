"""The five applications, each a small module with its prompt, its output parsing and its evaluation.

| module | application | eval data fields | metric |
| --- | --- | --- | --- |
| write | continue a text; story, news, dialogue | prompt, reference? | reference perplexity, distinct-1/2 |
| qa | closed-book or grounded; BM25, citations | question, context?, answers | SQuAD exact match, F1 |
| translate | any pair; detection; sentence batches | source, reference, src_lang, tgt_lang | sacreBLEU BLEU, chrF |
| sentiment | label log-likelihoods, probabilities | text, label | accuracy, macro-F1, confusion |
| code | extraction, sandboxed tests, repair | HumanEval records | pass@1, pass@k |

Each module defines its `Task` (the protocol of `base`) as `TASK`; `TASKS` maps a name to it.
`metrics` holds the metrics as pure functions, `scoring` the log-likelihoods of answers, `hygiene`
the cleaning of text going in and out, `sandbox` runs generated code, and `evaluate` is `qwenkit
eval`, whose options are `EvalOptions` here. Importing this package does not import torch.

The applications' functions that run the model take it and its tokenizer first (`model`, `tok`,
not described again in their `Args:`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwenkit.errors import UserError

if TYPE_CHECKING:
    from qwenkit.tasks.base import Task

DATA = Path(__file__).parent / "data"


class TaskRegistry(MutableMapping):
    """Tasks by name. A built-in task is named by its module, imported at the first lookup (the
    task modules import torch, which `qwenkit --help` should not pay for); a Task object set by
    name, as tests do, is used as it is."""

    def __init__(self, modules: Mapping[str, str]):
        self._entries: dict[str, Task | str] = dict(modules)

    def __getitem__(self, name: str) -> Task:
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = self._entries[name] = importlib.import_module(entry).TASK
        return entry

    def __setitem__(self, name: str, task: Task) -> None:
        self._entries[name] = task

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


TASKS = TaskRegistry({name: f"qwenkit.tasks.{name}" for name in ("sentiment", "qa", "translate", "code", "write")})


def get_task(name: str) -> Task:
    """The task of that name, or a UserError that lists the names."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def sample_data(task: str) -> Path:
    """The small sample file of a task shipped with qwenkit (a few dozen rows, for tests and demos)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return DATA / f"{task}.jsonl"


@dataclass(frozen=True)
class EvalOptions:
    """How `evaluate` runs a task, besides its data and the model: `qwenkit eval`'s flags, and
    `evaluate`'s keyword arguments. A value out of range is a UserError.

    Args:
        predictions: a JSONL file of rows with `prediction` (or HumanEval's `completion`); no model
            is needed.
        limit: use the first N data rows only (with several predictions per row, all of theirs).
        output: the folder to write (default: eval-TASK).
        batch_size: rows generated together.
        max_new_tokens: the longest generation (default: the task's).
        temperature: sampling temperature (default: the task's: greedy, or the checkpoint's sampling
            for tasks that sample and with several samples).
        samples: replies per row, for a generative task (pass@k, for code).
        timeout: seconds per program, for tasks that run their predictions.
        seed: random seed for sampled generation.
    """

    predictions: str | Path | None = None
    limit: int | None = None
    output: str | Path | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    temperature: float | None = None
    samples: int = 1
    timeout: float = 10.0
    seed: int | None = None

    def __post_init__(self):
        for name in ("limit", "max_new_tokens", "samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
