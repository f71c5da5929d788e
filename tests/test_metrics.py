"""The task metrics against their reference implementations: sacrebleu itself, SQuAD's official
evaluate-v1.1.py (its functions copied below, verbatim but for formatting), the combinatorial
definition of pass@k, torch's cross-entropy for perplexity, and hand-worked counts for the rest."""

import math
import re
import string
from collections import Counter

import pytest
import sacrebleu
import torch
import torch.nn.functional as F

from qwenkit.tasks import metrics

# ---- SQuAD v1.1 official evaluation script (https://rajpurkar.github.io/SQuAD-explorer/) ---------------


def official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_f1_score(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def official_exact_match_score(prediction, ground_truth):
    return official_normalize_answer(prediction) == official_normalize_answer(ground_truth)


def official_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


SQUAD_CASES = [
    ("Paris", ["Paris"]),
    ("paris!", ["Paris"]),  # case, punctuation
    ("  The   Eiffel Tower ", ["Eiffel Tower"]),  # articles, whitespace
    ("an apple a day", ["apple day"]),
    ("the U.S.A.", ["USA"]),  # punctuation inside a token
    ("in 1889, in Paris", ["1889"]),  # partial overlap
    ("Gustave Eiffel's company", ["Gustave Eiffel", "Gustave Eiffel's company"]),  # several golds: the max
    ("Denver Broncos", ["Broncos", "Denver Broncos", "the Denver Broncos"]),
    ("Broncos Denver Broncos", ["Denver Broncos"]),  # repeated tokens count once per occurrence
    ("carbon dioxide", ["CO2", "carbon-dioxide"]),  # hyphen removed, not split: no match
    ("", ["Paris"]),
    ("The", ["the answer"]),  # normalizes to nothing
]


@pytest.mark.parametrize("prediction, answers", SQUAD_CASES)
def test_squad_em_f1_match_the_official_script(prediction, answers):
    assert metrics.normalize_answer(prediction) == official_normalize_answer(prediction)
    assert metrics.exact_match(prediction, answers) == float(
        official_metric_max_over_ground_truths(official_exact_match_score, prediction, answers)
    )
    assert metrics.token_f1(prediction, answers) == pytest.approx(
        official_metric_max_over_ground_truths(official_f1_score, prediction, answers)
    )


def test_squad_corpus_score_is_the_official_mean_in_percent():
    preds = [p for p, _ in SQUAD_CASES]
    golds = [a for _, a in SQUAD_CASES]
    em = (
        100.0
        * sum(official_metric_max_over_ground_truths(official_exact_match_score, p, a) for p, a in SQUAD_CASES)
        / len(SQUAD_CASES)
    )
    f1 = (
        100.0
        * sum(official_metric_max_over_ground_truths(official_f1_score, p, a) for p, a in SQUAD_CASES)
        / len(SQUAD_CASES)
    )
    result = metrics.squad(preds, golds)
    assert result["exact_match"] == pytest.approx(em) and result["f1"] == pytest.approx(f1)
    assert 0 < result["exact_match"] < result["f1"] < 100  # the cases are mixed on purpose


def test_squad_perfect_and_empty():
    golds = [["Paris"], ["1889", "in 1889"], ["Guido van Rossum"]]
    perfect = metrics.squad(["Paris", "1889", "Guido van Rossum"], golds)
    assert perfect == {"exact_match": 100.0, "f1": 100.0, "count": 3}
    assert metrics.squad(["", "", ""], golds) == {"exact_match": 0.0, "f1": 0.0, "count": 3}


# ---- sacreBLEU ------------------------------------------------------------------------------------------

HYPS = [
    "The cat sat on the mat all day long.",
    "He read the whole book in one evening.",
    "It is raining today, so we stay at home.",
    "Where is the train station?",
]
REFS = [
    "The cat sat on the mat all day.",
    "He read the entire book in a single evening.",
    "It is raining today, so we will stay home.",
    "Where is the nearest train station?",
]
REFS2 = [
    "A cat was sitting on the mat all day long.",
    "He finished the book in one evening.",
    "Today it rains, so we stay at home.",
    "Where's the railway station?",
]


def test_bleu_and_chrf_are_sacrebleus_own_numbers():
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    oracle = bleu.corpus_score(HYPS, [REFS])
    ours = metrics.bleu(HYPS, REFS)
    assert ours["score"] == pytest.approx(oracle.score) and 0 < ours["score"] < 100
    assert ours["bp"] == pytest.approx(oracle.bp) and ours["precisions"] == pytest.approx(oracle.precisions)
    assert ours["signature"] == str(bleu.get_signature())
    assert "nrefs:1" in ours["signature"] and "tok:13a" in ours["signature"] and "version:" in ours["signature"]
    ours = metrics.chrf(HYPS, REFS)
    assert ours["score"] == pytest.approx(chrf.corpus_score(HYPS, [REFS]).score)
    assert ours["signature"] == str(chrf.get_signature())


def test_bleu_with_several_references_and_a_tokenizer():
    per_segment = [[a, b] for a, b in zip(REFS, REFS2)]
    assert metrics.bleu(HYPS, per_segment)["score"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS, REFS2]).score)
    assert metrics.chrf(HYPS, per_segment)["score"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS, REFS2]).score)
    zh_h, zh_r = ["我喜欢晚上看书。", "今天天气很好。"], ["我喜欢在晚上读书。", "今天天气很好。"]
    ours = metrics.bleu(zh_h, zh_r, tokenize="zh")
    assert ours["score"] == pytest.approx(sacrebleu.corpus_bleu(zh_h, [zh_r], tokenize="zh").score)
    assert "tok:zh" in ours["signature"]


def test_bleu_and_chrf_perfect_and_empty():
    assert metrics.bleu(REFS, REFS)["score"] == pytest.approx(100.0)
    assert metrics.chrf(REFS, REFS)["score"] == pytest.approx(100.0)
    assert metrics.bleu([""] * 4, REFS)["score"] == 0.0
    assert metrics.chrf([""] * 4, REFS)["score"] == 0.0


# ---- pass@k -----------------------------------------------------------------------------------------------


def test_pass_at_k_is_the_combinatorial_definition():
    # pass@k = P(at least one of k samples, drawn without replacement from the n, is correct)
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert metrics.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    # large n, where the binomials themselves overflow a float
    assert metrics.pass_at_k(2000, 3, 100) == pytest.approx(1 - math.comb(1997, 100) / math.comb(2000, 100))
    with pytest.raises(ValueError):
        metrics.pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        metrics.pass_at_k(5, 1, 6)


def test_mean_pass_at_k_reports_only_ks_every_problem_has_samples_for():
    results = {"a": [True] * 3 + [False] * 7, "b": [False] * 10, "c": [True] * 10}
    scores = metrics.mean_pass_at_k(results, ks=(1, 5, 10, 100))
    assert set(scores) == {"pass@1", "pass@5", "pass@10"}
    assert scores["pass@1"] == pytest.approx((0.3 + 0.0 + 1.0) / 3)
    assert scores["pass@10"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    assert scores["pass@5"] == pytest.approx((1 - math.comb(7, 5) / math.comb(10, 5) + 0 + 1) / 3)
    assert metrics.mean_pass_at_k({"a": [True], "b": [True]}) == {"pass@1": 1.0}
    assert metrics.mean_pass_at_k({"a": [False], "b": [False]}) == {"pass@1": 0.0}


# ---- classification ---------------------------------------------------------------------------------------


def test_accuracy_macro_f1_confusion_matrix_by_hand():
    gold = ["pos", "pos", "pos", "neg", "neg", "neu"]
    pred = ["pos", "neg", "pos", "neg", "pos", "neg"]
    assert metrics.accuracy(gold, pred) == pytest.approx(3 / 6)
    # pos: tp 2, fp 1, fn 1 -> 4/6; neg: tp 1, fp 2, fn 1 -> 2/5; neu: tp 0 -> 0
    f1 = metrics.per_label_f1(gold, pred, ["pos", "neg", "neu"])
    assert f1 == pytest.approx({"pos": 4 / 6, "neg": 2 / 5, "neu": 0.0})
    assert metrics.macro_f1(gold, pred, ["pos", "neg", "neu"]) == pytest.approx((4 / 6 + 2 / 5) / 3)
    cm = metrics.confusion_matrix(gold, pred, ["pos", "neg", "neu"])
    assert cm == {"labels": ["pos", "neg", "neu"], "matrix": [[2, 1, 0], [1, 1, 0], [0, 1, 0]]}
    # without a label list: every label seen, sorted
    assert metrics.confusion_matrix(["b", "a"], ["a", "a"])["labels"] == ["a", "b"]


def test_classification_perfect_and_empty():
    gold = ["pos", "neg", "neu", "pos"]
    assert metrics.accuracy(gold, gold) == 1.0 and metrics.macro_f1(gold, gold) == 1.0
    assert metrics.accuracy(gold, [""] * 4) == 0.0
    assert metrics.macro_f1(gold, [""] * 4, ["pos", "neg", "neu"]) == 0.0


# ---- open-ended generation ----------------------------------------------------------------------------------


def test_perplexity_is_exp_of_the_token_mean_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(11, 50, generator=gen), torch.randint(0, 50, (11,), generator=gen)
    nll = F.cross_entropy(logits, targets, reduction="none")
    # two "texts" of 4 and 7 tokens: weighting by length is what a single mean over all tokens does
    ours = metrics.perplexity([nll[:4].sum().item(), nll[4:].sum().item()], [4, 7])
    assert ours == pytest.approx(math.exp(F.cross_entropy(logits, targets).item()), rel=1e-6)
    assert metrics.perplexity([0.0], [5]) == 1.0  # a perfect model
    with pytest.raises(ValueError):
        metrics.perplexity([], [])


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    assert metrics.distinct_n(texts, 1) == pytest.approx(3 / 7)  # a b a b a b c: 3 distinct of 7
    assert metrics.distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc: 3 distinct of 5
    assert metrics.distinct_n(["one two three"], 1) == 1.0
    assert metrics.distinct_n(["", ""], 1) == 0.0 and metrics.distinct_n(["word"], 2) == 0.0
