"""Sentiment analysis by scoring labels, not by parsing free text.

For a text and each candidate label, the model scores the whole assistant turn that would hold
the label (its tokens and the end-of-turn token, under the chat template) as a log-likelihood.
The probabilities are the softmax over those log-likelihoods: the model's own distribution over
answers, renormalized to the label set (ending the turn makes "positive" and "positively ..." two
different answers, and labels of different token lengths comparable). With `calibrate`, each
label's log-likelihood for a content-free input ("N/A") is subtracted first, the contextual
calibration of Zhao et al. (2021), which removes the model's prior preference for some labels.

Evaluation: accuracy, macro-F1 and the confusion matrix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from qwenkit.errors import UserError
from qwenkit.model import QwenForCausalLM
from qwenkit.tasks import metrics
from qwenkit.tasks.base import CategoricalTask, Context, Messages
from qwenkit.tasks.hygiene import strip_special_tokens
from qwenkit.tasks.scoring import answer_ids, continuation_logprobs
from qwenkit.tokenizer import Tokenizer

DEFAULT_LABELS = ("positive", "negative", "neutral")
CONTENT_FREE = "N/A"


@dataclass
class Sentiment:
    label: str
    probabilities: dict[str, float]  # sums to 1 over the labels
    logprobs: dict[str, float]  # each label's log-likelihood (before calibration)


def build_messages(text: str, labels: Sequence[str]) -> Messages:
    """The chat that asks for one label."""
    system = (
        "You are a sentiment classifier. Read the user's text and reply with exactly one word, its "
        f"sentiment, chosen from: {', '.join(labels)}."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]  # shifted by the max: no overflow, same result
    total = sum(exps)
    return [e / total for e in exps]


def label_logprobs(
    model: QwenForCausalLM,
    tok: Tokenizer,
    texts: Sequence[str],
    labels: Sequence[str],
    batch_size: int = 8,
    progress: bool = False,
) -> list[list[float]]:
    """log p(label's assistant turn | text) for every text (rows) and label (columns).

    Args:
        texts: the texts.
        labels: the candidate labels.
        batch_size: texts scored together (each adds one row per label to the batch).
        progress: show a progress bar.
    """
    out = []
    with tqdm(total=len(texts), desc="classifying", unit="text", disable=not progress or not texts) as bar:
        for start in range(0, len(texts), batch_size):
            prefixes, continuations = [], []
            for text in texts[start : start + batch_size]:
                messages = build_messages(strip_special_tokens(tok, text), labels)
                for label in labels:
                    p, c = answer_ids(tok, messages, label)
                    prefixes.append(p)
                    continuations.append(c)
            flat = continuation_logprobs(
                model, prefixes, continuations, batch_size=len(prefixes), pad_id=tok.pad_token_id or 0
            )
            out += [flat[i : i + len(labels)] for i in range(0, len(flat), len(labels))]
            bar.update(min(batch_size, len(texts) - start))
    return out


def classify(
    model: QwenForCausalLM,
    tok: Tokenizer,
    texts: Sequence[str],
    labels: Sequence[str] = DEFAULT_LABELS,
    batch_size: int = 8,
    calibrate: bool = False,
    progress: bool = False,
) -> list[Sentiment]:
    """The most likely label of each text, with the probabilities of all labels.

    Args:
        texts: the texts to classify.
        labels: the candidate labels (at least two, distinct).
        batch_size: texts scored together.
        calibrate: subtract the log-likelihoods of a content-free input first (Zhao et al., 2021).
        progress: show a progress bar.
    """
    labels = [label.strip() for label in labels]
    if len(labels) < 2 or len(set(labels)) != len(labels) or not all(labels):
        raise UserError(f"need at least two distinct, non-empty labels, got {labels}")
    scores = label_logprobs(model, tok, texts, labels, batch_size, progress)
    prior = label_logprobs(model, tok, [CONTENT_FREE], labels)[0] if calibrate else [0.0] * len(labels)
    results = []
    for row in scores:
        probs = softmax([s - p for s, p in zip(row, prior)])
        best = max(range(len(labels)), key=probs.__getitem__)
        results.append(Sentiment(labels[best], dict(zip(labels, probs)), dict(zip(labels, row))))
    return results


# ---- evaluation ------------------------------------------------------------------------------------------


def dataset_labels(rows: Sequence[dict]) -> list[str]:
    """The labels of a data set: the default ones first, in their order, then any others sorted. A
    set with fewer than two (a slice of a file, say) is completed with the defaults: one cannot
    classify into a single label."""
    seen = {str(r["label"]).strip().lower() for r in rows}
    if len(seen) < 2:
        seen |= set(DEFAULT_LABELS)
    return [label for label in DEFAULT_LABELS if label in seen] + sorted(seen - set(DEFAULT_LABELS))


@dataclass(frozen=True)
class SentimentTask(CategoricalTask):
    """Rows hold a `text` and its gold `label`.

    Args:
        labels: the candidate labels (default: those of the rows at hand; `for_data` sets them to
            a whole file's, so that a --limit slice is classified and scored among the same ones).
        calibrate: contextual calibration, as `classify`.
    """

    labels: tuple[str, ...] | None = None
    calibrate: bool = False

    name = "sentiment"
    required = ("text", "label")

    def for_data(self, rows: Sequence[dict]) -> SentimentTask:
        if self.labels is None and rows and all("label" in r for r in rows):
            return dataclasses.replace(self, labels=tuple(dataset_labels(rows)))
        return self

    def build_messages(self, tok: Tokenizer, row: dict) -> Messages:
        return build_messages(strip_special_tokens(tok, row["text"]), self.labels or DEFAULT_LABELS)

    def predict(self, model: QwenForCausalLM, tok: Tokenizer, rows: Sequence[dict], batch_size: int = 8) -> list[dict]:
        """Each row with its predicted label and the labels' probabilities."""
        labels = list(self.labels) if self.labels is not None else dataset_labels(rows)
        results = classify(model, tok, [r["text"] for r in rows], labels, batch_size, self.calibrate, progress=True)
        return [{**row, "prediction": s.label, "probabilities": s.probabilities} for row, s in zip(rows, results)]

    def score(self, records: Sequence[dict], ctx: Context) -> tuple[dict, list[dict]]:
        """Accuracy, macro-F1 over the labels, per-label F1 and the confusion matrix (gold rows,
        predicted columns)."""
        gold = [str(r["label"]).strip().lower() for r in records]
        pred = [str(r["prediction"] or "").strip().lower() for r in records]
        labels = list(self.labels) if self.labels is not None else dataset_labels(records)
        out = [{**r, "correct": g == p} for r, g, p in zip(records, gold, pred)]
        return {
            "accuracy": metrics.accuracy(gold, pred),
            "macro_f1": metrics.macro_f1(gold, pred, labels),
            "f1": metrics.per_label_f1(gold, pred, labels),
            "confusion_matrix": metrics.confusion_matrix(gold, pred, labels),
            "count": len(records),
        }, out


TASK = SentimentTask()
