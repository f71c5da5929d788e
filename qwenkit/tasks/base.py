"""The protocol every application follows, so that `qwenkit eval` (tasks/evaluate.py) names no task.

A task declares its data (the fields a row needs, the field that names a row), how it is evaluated,
and its decoding defaults, and implements the chat for a row, the predictions for rows, and the
score of predictions against their rows. There are two kinds, as in nanochat's `tasks/common.py`:

- generative (qa, translate, code, write): the model replies to each row's chat and `parse` takes
  the prediction out of the reply. Several samples per row (code's pass@k) are several rows.
- categorical (sentiment): the model scores a fixed set of answers by their log-likelihoods, so
  there is no decoding and no reply to parse.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from tqdm import tqdm

from qwenkit.generate import SamplingParams
from qwenkit.model import QwenForCausalLM
from qwenkit.text import Completion, complete
from qwenkit.tokenizer import Tokenizer

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Context:
    """What scoring may use besides the records. Each task takes what its metric needs: write's
    reference perplexity the model, code's tests the timeout; the others none of it."""

    model: QwenForCausalLM | None = None  # None when scoring predictions made elsewhere
    tok: Tokenizer | None = None
    batch_size: int = 8  # rows scored together by the model
    timeout: float = 10.0  # wall-clock seconds for each program a task runs


class Task(ABC):
    """One application as `qwenkit eval` sees it."""

    name: ClassVar[str]
    eval_type: ClassVar[Literal["generative", "categorical"]]
    required: ClassVar[tuple[str, ...]]  # the fields every data row has
    key: ClassVar[str] = "id"  # the field that names a row: predictions made elsewhere are joined by it

    def for_data(self, rows: Sequence[dict]) -> Task:
        """The task set up for a whole data file, before a --limit slice is taken (default: as it is)."""
        return self

    @abstractmethod
    def build_messages(self, tok: Tokenizer, row: dict) -> Messages:
        """The chat for one data row (untrusted text in it stripped of special tokens)."""

    @abstractmethod
    def score(self, records: Sequence[dict], ctx: Context) -> tuple[dict, list[dict]]:
        """(the metrics, the records with their per-row scores) of rows that carry a `prediction`."""


class GenerativeTask(Task):
    """A task scored on the model's replies."""

    eval_type = "generative"
    max_new_tokens: ClassVar[int] = 256  # the longest reply, unless the caller says otherwise
    sampled: ClassVar[bool] = False  # decode with the checkpoint's sampling settings, not greedily

    @abstractmethod
    def parse(self, reply: str, row: dict) -> dict:
        """The fields a reply to `row` adds to it: `prediction` at least."""

    def predict(
        self, model: QwenForCausalLM, tok: Tokenizer, rows: Sequence[dict], params: SamplingParams, batch_size: int = 8
    ) -> list[dict]:
        """Each row with the fields `parse` takes from the model's reply to its chat."""
        done = chat(model, tok, [self.build_messages(tok, row) for row in rows], params, batch_size, desc=self.name)
        return [{**row, **self.parse(c.text, row)} for row, c in zip(rows, done)]

    def sampling(
        self,
        model: QwenForCausalLM,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        samples: int = 1,
    ) -> SamplingParams:
        """The checkpoint's generation settings with this task's defaults: greedy, unless the task
        samples or several samples per row are asked for (greedy ones would all be the same). A
        temperature, when given, decides instead, by `SamplingParams.from_model`'s rule."""
        sampled = self.sampled or samples > 1
        return SamplingParams.from_model(
            model,
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=temperature,
            seed=seed,
            do_sample=None if sampled or temperature is not None else False,  # None: the checkpoint's, or the rule's
        )


class CategoricalTask(Task):
    """A task that picks among fixed answers by their log-likelihoods; nothing is decoded."""

    eval_type = "categorical"

    @abstractmethod
    def predict(self, model: QwenForCausalLM, tok: Tokenizer, rows: Sequence[dict], batch_size: int = 8) -> list[dict]:
        """Each row with its `prediction`, the most likely answer."""


def chat(
    model: QwenForCausalLM,
    tok: Tokenizer,
    conversations: Sequence[Messages],
    params: SamplingParams,
    batch_size: int = 8,
    stop: Sequence[str] = (),
    desc: str | None = None,
) -> list[Completion]:
    """Complete many conversations, `batch_size` at a time, with a progress bar when `desc` is given."""
    out: list[Completion] = []
    with tqdm(total=len(conversations), desc=desc, unit="prompt", disable=desc is None or not conversations) as bar:
        for start in range(0, len(conversations), batch_size):
            batch = conversations[start : start + batch_size]
            out += complete(model, tok, batch, params, stop=stop)
            bar.update(len(batch))
    return out
