"""The official VQA accuracy: answer normalisation, the 10-annotator subset average, evaluate_vqa."""
from __future__ import annotations

import itertools
import random

import pytest

from tasks.vqa_metrics import (evaluate_vqa, normalize_answer, normalize_gt_answers, process_digit_article,
                               process_punctuation, vqa_accuracy)


# ------------------------------------------------------------------ normalisation (hand-computed)
@pytest.mark.parametrize("raw, expected", [
    # punctuation: deleted when next to a space, replaced by a space otherwise
    ("yes, sir", "yes sir"),
    ("t-shirt", "t shirt"),
    ("red/white", "red white"),
    ("(red)", "red"),
    ("hello world!", "hello world"),
    ("a dog;cat", "dog cat"),
    ("what?", "what"),
    # a comma between digits anywhere deletes every mark (no spaces inserted)
    ("1,000", "1000"),
    ("1,000 t-shirts", "1000 tshirts"),
    # periods: removed unless a digit follows
    ("3.5", "3.5"),
    ("mr. smith", "mr smith"),
    ("its 2.", "its 2"),
    ("Two dogs.", "2 dogs"),
    # articles and number words, lower-casing, whitespace
    ("The Cat", "cat"),
    ("an apple ", "apple"),
    ("a", ""),
    ("None", "0"),
    ("zero", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),
    ("one\ttwo\nthree", "1 2 3"),
    # contractions get their apostrophe back; apostrophes and colons are not punctuation here
    ("dont", "don't"),
    ("isnt it", "isn't it"),
    ("Whats that", "what's that"),
    ("don't", "don't"),
    ("10:30", "10:30"),
])
def test_normalize_answer_hand_computed(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_tests_the_original_text_but_edits_the_running_one():
    # "- " occurs in the original, so "-" is deleted everywhere, even in "t-shirt"
    assert process_punctuation("t-shirt - blue") == "tshirt  blue"
    # without the spaced dash it becomes a space
    assert process_punctuation("t-shirt blue") == "t shirt blue"


def test_period_strip_keeps_the_official_count_limit():
    text = "." * 40
    assert process_punctuation(text) == "." * 8  # re.UNICODE (32) passed as count in the original


def test_digit_article_alone_does_not_touch_punctuation():
    # "two," is not the word "two": punctuation must go first, as normalize_answer does
    assert process_digit_article("The Two, dogs") == "two, dogs"
    assert process_digit_article("The Two dogs") == "2 dogs"


def test_ground_truth_answers_get_punctuation_only_when_they_differ():
    assert normalize_gt_answers(["t-shirt"] * 10) == ["t-shirt"] * 10
    assert normalize_gt_answers(["t-shirt"] * 9 + ["shirt"]) == ["t shirt"] * 9 + ["shirt"]
    # no lower-casing or number mapping of ground truth (the official files are normalised)
    assert normalize_gt_answers(["Two", "two"]) == ["Two", "two"]


# ------------------------------------------------------------------ accuracy
def subset_reference(pred_norm: str, gts: list[str]) -> float:
    """Plain re-computation: average over the 10 subsets of 9 annotators of min(1, matches / 3)."""
    n = len(gts)
    values = []
    for subset in itertools.combinations(range(n), n - 1):
        matches = sum(1 for j in subset if gts[j] == pred_norm)
        values.append(min(1.0, matches / 3))
    return sum(values) / len(values)


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_k_of_10_annotators(k, expected):
    answers = ["cat"] * k + ["dog", "bird", "fish", "cow", "pig", "hen", "ant", "bee", "owl", "elk"][: 10 - k]
    acc = vqa_accuracy("cat", answers)
    assert acc == pytest.approx(expected, abs=1e-12)
    assert acc == pytest.approx(subset_reference("cat", answers), abs=1e-12)


def test_two_of_ten_is_not_two_thirds():
    answers = ["2", "2", "3", "3", "3", "4", "4", "4", "4", "4"]
    assert vqa_accuracy("two", answers) == pytest.approx(0.6)  # number word normalised to "2"
    assert vqa_accuracy("two", answers) != pytest.approx(2 / 3)
    assert vqa_accuracy("3", answers) == pytest.approx(0.9)
    assert vqa_accuracy("4", answers) == pytest.approx(1.0)


def test_prediction_is_normalised_before_matching():
    answers = ["yes"] * 3 + ["no"] * 7
    assert vqa_accuracy("Yes.", answers) == pytest.approx(0.9)
    assert vqa_accuracy("  the  NO ", answers) == pytest.approx(1.0)


def test_official_quirk_identical_ground_truth_is_not_punctuation_processed():
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0  # prediction becomes "t shirt"
    assert vqa_accuracy("t shirt", ["t-shirt"] * 9 + ["shirt"]) == pytest.approx(1.0)


def test_random_cases_against_subset_reference():
    rng = random.Random(0)
    vocab = ["yes", "no", "2", "3", "red", "blue"]
    for _ in range(200):
        n = rng.choice([3, 5, 10])
        answers = [rng.choice(vocab) for _ in range(n)]
        pred = rng.choice(vocab)
        assert vqa_accuracy(pred, answers) == pytest.approx(subset_reference(pred, answers), abs=1e-12)


def test_bad_answers_argument():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError):
        vqa_accuracy("yes", "yes")


# ------------------------------------------------------------------ evaluate_vqa
def small_set():
    records = [
        {"question_id": 1, "answer": ["yes"] * 10, "answer_type": "yes/no"},
        {"question_id": 2, "answer": ["no"] * 2 + ["yes"] * 8, "answer_type": "yes/no"},
        {"question_id": 3, "answer": ["2"] * 3 + ["3"] * 7, "answer_type": "number"},
        {"question_id": 4, "answer": ["red"] * 10, "answer_type": "other"},
        {"question_id": 5, "answer": ["blue"] * 1 + ["green"] * 9, "answer_type": "other"},
    ]
    preds = {1: "Yes", 2: "no", 3: "two", 4: "blue", 5: "blue"}
    return records, preds


def test_evaluate_vqa_matches_plain_recomputation():
    records, preds = small_set()
    out = evaluate_vqa(preds, records, return_per_question=True)
    per_q = {r["question_id"]: subset_reference(normalize_answer(preds[r["question_id"]]), r["answer"])
             for r in records}
    # hand values: 1.0, 0.6, 0.9, 0.0, 0.3
    assert [per_q[q] for q in range(1, 6)] == pytest.approx([1.0, 0.6, 0.9, 0.0, 0.3])
    assert out["per_question"] == pytest.approx(per_q)
    assert out["overall"] == pytest.approx(100 * sum(per_q.values()) / 5)
    assert out["per_answer_type"] == pytest.approx({"yes/no": 80.0, "number": 90.0, "other": 15.0})
    assert out["n_questions"] == 5 and out["n_unscored"] == 0


def test_evaluate_vqa_accepts_result_file_form_and_ignores_extra_predictions():
    records, preds = small_set()
    as_list = [{"question_id": q, "answer": a} for q, a in preds.items()] + [{"question_id": 99, "answer": "x"}]
    a, b = evaluate_vqa(preds, records), evaluate_vqa(as_list, records)
    assert a["overall"] == pytest.approx(b["overall"]) and b["n_unscored"] == 1


def test_evaluate_vqa_without_answer_types():
    records, preds = small_set()
    plain = [{"question_id": r["question_id"], "answer": r["answer"]} for r in records]
    out = evaluate_vqa(preds, plain)
    assert out["per_answer_type"] == {} and out["overall"] == pytest.approx(56.0)


def test_evaluate_vqa_errors():
    records, preds = small_set()
    del preds[3]
    with pytest.raises(ValueError, match=r"1 of 5 questions have no prediction.*\[3\]"):
        evaluate_vqa(preds, records)
    with pytest.raises(ValueError, match="no 'answer'"):
        evaluate_vqa({1: "yes"}, [{"question_id": 1}])
    with pytest.raises(ValueError, match="more than once"):
        evaluate_vqa([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}],
                     [{"question_id": 1, "answer": ["a"] * 10}])
