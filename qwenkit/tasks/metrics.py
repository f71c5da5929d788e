"""The standard metrics of the five tasks, as pure functions over predictions and references.

Each follows its field's reference implementation: SQuAD's official EM/F1 (evaluate-v1.1.py's
normalization), sacreBLEU's corpus BLEU and chrF with their signatures, HumanEval's unbiased
pass@k estimator, accuracy / macro-F1 / confusion matrix as scikit-learn defines them, perplexity as
the exponential of the mean token negative log-likelihood, and distinct-n (Li et al., 2016).
Scores are in percent where the field reports them so (EM, F1, BLEU, chrF); the others are
fractions in [0, 1].
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

# ---- question answering: SQuAD ----------------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, drop punctuation, drop the articles a/an/the, collapse
    whitespace (in that order, as evaluate-v1.1.py does)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD's token-overlap F1 against the best-matching gold answer."""

    def f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
        common = Counter(pred_tokens) & Counter(gold_tokens)
        same = sum(common.values())
        if same == 0:
            return 0.0
        precision, recall = same / len(pred_tokens), same / len(gold_tokens)
        return 2 * precision * recall / (precision + recall)

    pred = normalize_answer(prediction).split()
    return max((f1(pred, normalize_answer(a).split()) for a in answers), default=0.0)


def squad(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    """Mean exact match and F1 over questions, in percent, as SQuAD reports them.

    Args:
        predictions: one answer string per question.
        answers: the gold answers of each question (any one counts: the max is taken).
    """
    _same_length(predictions, answers)
    n = len(predictions)
    em = sum(exact_match(p, a) for p, a in zip(predictions, answers))
    f1 = sum(token_f1(p, a) for p, a in zip(predictions, answers))
    return {"exact_match": 100.0 * em / n if n else 0.0, "f1": 100.0 * f1 / n if n else 0.0, "count": n}


# ---- translation: sacreBLEU --------------------------------------------------------------------------


def _reference_streams(references: Sequence[str | Sequence[str]]) -> list[list[str | None]]:
    """Per-segment references (a string, or a list of several) as sacreBLEU's reference streams; a
    segment with fewer references than the most is padded with None, which sacreBLEU skips."""
    rows = [[r] if isinstance(r, str) else list(r) for r in references]
    width = max((len(r) for r in rows), default=1)
    return [[row[i] if i < len(row) else None for row in rows] for i in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], tokenize: str | None = None) -> dict:
    """sacreBLEU's corpus BLEU, with its signature.

    Args:
        hypotheses: one system output per segment.
        references: per segment, the reference (a string) or several (a list).
        tokenize: sacreBLEU's tokenizer: "13a" (its default), "zh" for Chinese targets, "char", "intl", ...
    """
    from sacrebleu.metrics import BLEU

    _same_length(hypotheses, references)
    metric = BLEU(tokenize=tokenize) if tokenize else BLEU()
    score = metric.corpus_score(list(hypotheses), _reference_streams(references))
    return {
        "score": score.score,
        "precisions": list(score.precisions),
        "bp": score.bp,
        "sys_len": score.sys_len,
        "ref_len": score.ref_len,
        "signature": str(metric.get_signature()),
    }


def chrf(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """sacreBLEU's corpus chrF (character 6-grams, beta 2), with its signature.

    Args:
        hypotheses: one system output per segment.
        references: per segment, the reference (a string) or several (a list).
    """
    from sacrebleu.metrics import CHRF

    _same_length(hypotheses, references)
    metric = CHRF()
    score = metric.corpus_score(list(hypotheses), _reference_streams(references))
    return {"score": score.score, "signature": str(metric.get_signature())}


# ---- code: pass@k ------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """HumanEval's unbiased estimator of pass@k from n samples of which c are correct:
    1 - C(n-c, k) / C(n, k), computed as a product so that large n does not overflow.

    Args:
        n: samples drawn for the problem.
        c: how many of them passed.
        k: the k of pass@k (at most n).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(results: Mapping[str, Sequence[bool]], ks: Iterable[int] = (1, 10, 100)) -> dict[str, float]:
    """pass@k averaged over problems, for every k that each problem has enough samples for (HumanEval
    reports only those).

    Args:
        results: {problem id: pass/fail of each sample}.
        ks: the k values wanted.
    """
    if not results:
        return {"pass@1": 0.0}
    fewest = min(len(r) for r in results.values())
    return {
        f"pass@{k}": sum(pass_at_k(len(r), sum(map(bool, r)), k) for r in results.values()) / len(results)
        for k in ks
        if k <= fewest
    }


# ---- classification ----------------------------------------------------------------------------------


def accuracy(gold: Sequence[str], predicted: Sequence[str]) -> float:
    """The fraction of predictions equal to the gold label."""
    _same_length(gold, predicted)
    return sum(g == p for g, p in zip(gold, predicted)) / len(gold) if gold else 0.0


def _labels(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    return list(labels) if labels is not None else sorted(set(gold) | set(predicted))


def per_label_f1(
    gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, float]:
    """F1 of each label, one-vs-rest; a label never predicted nor gold scores 0 (scikit-learn's
    zero_division=0)."""
    _same_length(gold, predicted)
    out = {}
    for label in _labels(gold, predicted, labels):
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        out[label] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return out


def macro_f1(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """The unweighted mean of the labels' F1 (scikit-learn's average="macro"); by default over the
    labels seen in gold or predictions.

    Args:
        gold: the true labels.
        predicted: the predicted labels.
        labels: the labels to average over (default: every label that occurs).
    """
    scores = per_label_f1(gold, predicted, labels)
    return sum(scores.values()) / len(scores) if scores else 0.0


def confusion_matrix(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str] | None = None) -> dict:
    """Counts with gold labels as rows and predicted labels as columns (scikit-learn's layout).

    Returns {"labels": [...], "matrix": [[...], ...]}; pairs involving a label outside `labels` are
    not counted.
    """
    _same_length(gold, predicted)
    names = _labels(gold, predicted, labels)
    index = {name: i for i, name in enumerate(names)}
    matrix = [[0] * len(names) for _ in names]
    for g, p in zip(gold, predicted):
        if g in index and p in index:
            matrix[index[g]][index[p]] += 1
    return {"labels": names, "matrix": matrix}


# ---- open-ended generation -----------------------------------------------------------------------------


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """Corpus perplexity: exp of the total negative log-likelihood (nats) over the total token count,
    so that long references weigh by their length, as language-model perplexity is reported.

    Args:
        nll_sums: per text, the summed negative log-likelihood of its tokens.
        token_counts: per text, how many tokens were scored.
    """
    _same_length(nll_sums, token_counts)
    total = sum(token_counts)
    if total == 0:
        raise ValueError("perplexity of zero tokens")
    return math.exp(sum(nll_sums) / total)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): distinct n-grams over all n-grams in all the outputs together,
    on whitespace tokens; 0.0 when there is no n-gram at all."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        tokens = text.split()
        grams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} references")
