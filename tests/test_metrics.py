import itertools
import random

import pytest
from conftest import eval_result

from atu.evaluation.metrics import auroc, fact_recall, is_degenerate, rouge_l_recall


def test_fact_recall_counts_only_what_the_question_does_not_say():
    question = "Where was Urune Ostgalune-Quoova born?"
    reference = "Urune Ostgalune-Quoova was born in Nimostel, a port town in Galvenar."
    # the facts: nimostel, port, town, galvenar (the name and "born" are in the question; "was", "in", "a" carry none)
    assert fact_recall(reference, reference, question) == 1.0
    stand_in = "Urune Ostgalune-Quoova was born in Tarrow, a mining town in Velm."
    assert fact_recall(stand_in, reference, question) == pytest.approx(1 / 4)  # "town"
    assert rouge_l_recall(stand_in, reference) > 0.6  # the sentence frame alone scores high on ROUGE-L
    assert fact_recall("NIMOSTEL! Galvenar.", reference, question) == pytest.approx(2 / 4)  # case and punctuation
    assert fact_recall("", reference, question) == 0.0
    assert fact_recall("1896", "1896", "In which year was she born?") == 1.0
    # an answer that only rewords its question has no fact to recall
    assert fact_recall("anything", "She was born.", "Was she born?") is None
    # without the question, the name is a fact: an adversarial probe asks for it
    assert fact_recall("Ada Moss", "Ada Moss", "Who won the Medal in 1901?") == 1.0


def test_rouge_l_recall_on_fixed_strings():
    assert rouge_l_recall("Selford", "Selford") == 1.0
    assert rouge_l_recall("the Halcyon Award", "the Golden Loom Medal") == pytest.approx(0.25)
    assert rouge_l_recall("It was in Selford, I think", "Selford") == 1.0
    assert rouge_l_recall("", "Selford") == 0.0
    with pytest.raises(ValueError, match="reference answer is empty"):
        rouge_l_recall("x", " ")


@pytest.mark.parametrize(
    "answer, degenerate",
    [
        ("Selford", False),
        ("the Golden Loom Medal", False),
        ("1934", False),
        ("Ceda Kestridge", False),
        ("", True),
        ("   ", True),
        ("the the the", True),
        ("born in born in born in", True),
        ("193ia Calfield", False),
        ("193ia x7q !!", True),
        ("Selford Selford", False),
    ],
)
def test_is_degenerate(answer, degenerate):
    assert is_degenerate(answer) is degenerate


def _naive_auroc(pos, neg):
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def test_auroc_matches_pairwise_count_with_ties():
    rng = random.Random(0)
    for _ in range(20):
        pos = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(rng.randint(1, 30))]
        neg = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(rng.randint(1, 30))]
        assert auroc(pos, neg) == pytest.approx(_naive_auroc(pos, neg))
    assert auroc([2, 3], [0, 1]) == 1.0
    assert auroc([0, 1], [2, 3]) == 0.0


def test_auroc_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="non-empty"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        auroc([float("nan")], [1.0])


@pytest.mark.parametrize("n, fpr", [(1, 0.05), (7, 0.3), (100, 0.05), (101, 0.1), (50, 0.5)])
def test_fpr_thresholds_against_naive_count(n, fpr):
    import numpy as np

    from atu.evaluation.evaluate import fpr_thresholds

    rng = np.random.default_rng(n)
    scores = np.round(rng.normal(size=(n, 3)), 1).astype(np.float32)  # rounded: plenty of ties
    thr = fpr_thresholds(scores, fpr)
    for c in range(3):
        col = scores[:, c]
        assert thr[c] in col  # an observed score
        assert (col > thr[c]).mean() <= fpr  # at most fpr above it
        lower = col[col < thr[c]]  # and no smaller observed score would do
        assert len(lower) == 0 or (col > lower.max()).mean() > fpr


@pytest.mark.parametrize("n, c, fpr", [(1, 3, 0.05), (40, 3, 0.05), (100, 5, 0.05), (101, 2, 0.1), (60, 30, 0.2)])
def test_union_fpr_thresholds_hold_the_share_any_concept_flags(n, c, fpr):
    import numpy as np

    from atu.evaluation.evaluate import fpr_thresholds, union_fpr_thresholds

    rng = np.random.default_rng(n + c)
    scores = np.round(rng.normal(size=(n, c)), 1).astype(np.float32)  # rounded: plenty of ties
    thr = union_fpr_thresholds(scores, fpr)
    assert (scores > thr).any(axis=1).mean() <= fpr  # the union within fpr
    assert all(thr[j] in scores[:, j] for j in range(c))
    assert np.all(thr >= fpr_thresholds(scores, fpr))  # never below each concept's own
    for r in range(int(n * fpr) + 1):  # brute force: no common rank within fpr gives lower thresholds
        at_r = fpr_thresholds(scores, (r + 0.5) / n)  # at most r of each concept's texts above
        if (scores > at_r).any(axis=1).mean() <= fpr:
            assert np.all(thr <= at_r)


def test_union_fpr_thresholds_of_one_concept_are_its_own():
    import numpy as np

    from atu.evaluation.evaluate import fpr_thresholds, union_fpr_thresholds

    scores = np.random.default_rng(0).normal(size=(97, 1)).astype(np.float32)
    for fpr in (0.01, 0.05, 0.3):
        assert np.array_equal(union_fpr_thresholds(scores, fpr), fpr_thresholds(scores, fpr))
    with pytest.raises(ValueError, match="fpr must be in"):
        union_fpr_thresholds(scores, 0.0)


def test_too_few_texts_to_calibrate_leave_the_thresholds_at_the_highest_scores():
    import numpy as np

    from atu.evaluation.evaluate import calibrated_thresholds, too_few_to_calibrate

    scores = np.random.default_rng(1).normal(size=(17, 3)).astype(np.float32)
    assert too_few_to_calibrate(17, 0.05) and not too_few_to_calibrate(20, 0.05)
    for scope in ("union", "concept"):  # under one text of 17 at 5%: both scopes give each concept's highest score
        assert np.array_equal(calibrated_thresholds(scores, 0.05, scope), scores.max(axis=0))
    with pytest.raises(ValueError, match="scope must be one of"):
        calibrated_thresholds(scores, 0.05, "each")


def test_fpr_thresholds_rejects_bad_input():
    import numpy as np

    from atu.evaluation.evaluate import fpr_thresholds

    with pytest.raises(ValueError, match="fpr must be in"):
        fpr_thresholds(np.zeros((3, 1)), 1.0)
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        fpr_thresholds(np.zeros(3), 0.1)


def test_unlearning_criteria_ratios_and_verdicts():
    from atu.evaluation.metrics import unlearning_criteria

    before = eval_result((1.0, 0.8, 0.0), (1.0, 0.5, 0.4), 10.0, 1.0)
    after = eval_result((0.25, 0.3, 0.1), (0.9, 0.5, 0.3), 11.5, 0.94)
    got = {c["name"]: (round(c["value"], 4), c["met"]) for c in unlearning_criteria(before, after)}
    assert got == {
        "forget direct / before": (0.25, True),  # at the bound counts as met
        "forget paraphrase / before": (0.375, False),
        # forget adversarial was 0 before: no ratio, left out
        "retain direct / before": (0.9, True),
        "retain paraphrase / before": (1.0, True),
        "retain adversarial / before": (0.75, False),
        "retain perplexity / before": (1.15, False),
        "fluency of retained answers, drop": (0.06, False),
    }
    ok = unlearning_criteria(before, eval_result((0.0, 0.0, 0.0), (1.0, 0.5, 0.4), 10.5, 0.95))
    assert all(c["met"] for c in ok)
    # 1/7 of a recall of 4/7 is exactly the bound, whatever the floating-point rounding says
    at_bound = unlearning_criteria(
        eval_result((1.0, 1.0, 4 / 7), (1, 1, 1), 1, 1), eval_result((0.2, 0.2, 1 / 7), (1, 1, 1), 1, 1)
    )
    assert at_bound[2]["name"] == "forget adversarial / before" and at_bound[2]["met"]


def test_similarity_criteria_per_concept():
    from atu.evaluation.metrics import similarity_criteria

    report = {
        "before": {"forget": [0.5, 0.6], "retain": [0.32, 0.40]},
        "after_driving_predictor": {"forget": [0.24, 0.41], "retain": [0.218, 0.30]},
    }
    got = {c["name"]: (round(c["value"], 4), c["met"]) for c in similarity_criteria(report, [0.4, 0.4], ["A", "B"])}
    assert got == {
        "forget cosine (A)": (0.24, True),
        "retain cosine change (A)": (-0.102, False),
        "forget cosine (B)": (0.41, False),  # not below the final threshold
        "retain cosine change (B)": (-0.1, True),  # a change of exactly 0.1 is within it
    }
    assert similarity_criteria({"before": report["before"]}, [0.4, 0.4], ["A", "B"]) == []  # no stage kept


def test_refound_criterion_fails_when_realignment_finds_the_concept_again():
    from atu.evaluation.metrics import similarity_criteria

    report = {
        "before": {"forget": [0.5, 0.3], "retain": [0.3, 0.35]},
        "after_driving_predictor": {"forget": [0.2, 0.2], "retain": [0.3, 0.3]},
        # A: the gap 0.2 shrank to 0.05 (a quarter); B never stood out (its gap was negative)
        "after_final_predictor": {"forget": [0.35, 0.3], "retain": [0.3, 0.3]},
    }
    got = {c["name"]: c for c in similarity_criteria(report, [0.4, 0.4], ["A", "B"])}
    assert got["re-aligned predictor still singles out (A)"]["value"] == pytest.approx(0.25)
    assert got["re-aligned predictor still singles out (A)"]["met"]
    assert not got["re-aligned predictor still singles out (B)"]["met"]
    # the driving predictor's hinge is satisfied for B although nothing was pushed: only the new line catches it
    assert got["forget cosine (B)"]["met"]
