"""The official VQA accuracy (pure functions, no model or data loading).

Follows the official evaluation script ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of
GT-Vision-Lab/VQA (the Python 3 version of the repository's master branch, the one BLIP and LAVIS
copy) step for step:

* the predicted answer: newlines and tabs become spaces, ``strip()``, then
  :func:`process_punctuation`, then :func:`process_digit_article` (together :func:`normalize_answer`);
* the ground-truth answers of a question: :func:`process_punctuation` only, and only when the ten
  answers are not all identical (the official script never lower-cases them nor maps number words:
  the released VQA annotation files already hold normalised answers);
* per question: for each of the 10 annotators, ``min(1, #other annotators who gave the predicted
  answer / 3)``; the question's accuracy is the average of these 10 values (2 of 10 agreeing scores
  0.6, 3 score 0.9, 4 or more 1.0);
* overall and per-answer-type accuracy: the mean over questions, in percent (the official tool
  rounds to 2 decimals for display; these functions return the unrounded value).

Quirks kept on purpose, because they change scores: ``process_punctuation`` tests the *original*
text for "punctuation next to a space" and for a comma between digits, and deletes the mark when
either holds (``"yes, sir"`` -> ``"yes sir"``) but replaces it with a space otherwise
(``"t-shirt"`` -> ``"t shirt"``); a period is removed unless a digit follows it (``"3.5"`` stays) and,
because the script passes ``re.UNICODE`` in the ``count`` position of ``re.sub``, at most 32
periods are removed.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Mapping, Sequence, Union

from tasks.result_records import records_by_id

__all__ = ["CONTRACTIONS", "MANUAL_MAP", "ARTICLES", "PUNCTUATION", "process_punctuation",
           "process_digit_article", "normalize_answer", "normalize_gt_answers", "vqa_accuracy",
           "evaluate_vqa"]

# Copied from the official vqaEval.py (``self.contractions``): a word without its apostrophe maps
# to the spelling with one.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
# ``self.manualMap``: number words to digits ("none" counts as 0).
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: tuple[str, ...] = ("a", "an", "the")
# ``self.punct`` in the official order (the order matters: each mark is tested on the original text
# but applied to the text as changed by the marks before it).
PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                                ">", "<", "@", "`", ",", "?", "!")
# ``self.periodStrip``: "(?!<=\d)" is a look-*ahead* in the original (a typo for a look-behind) and
# never blocks a match, so a period is removed unless a digit follows it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)  # the official call re.sub(..., outText, re.UNICODE): count = 32


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: each mark of :data:`PUNCTUATION` is deleted when the
    original text has it next to a space or has a comma between two digits anywhere, else replaced
    by a space; then periods not followed by a digit are deleted (at most 32, as in the original)."""
    out = text
    comma_between_digits = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma_between_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, split on whitespace, number words to digits,
    drop the articles a / an / the, restore contractions (``dont`` -> ``don't``), join with spaces."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(ans: str) -> str:
    """A predicted answer as the official evaluation sees it: newlines and tabs to spaces, strip,
    :func:`process_punctuation`, :func:`process_digit_article`.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    """
    text = ans.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def normalize_gt_answers(answers: Sequence[str]) -> list[str]:
    """The annotators' answers as the official evaluation compares them: :func:`process_punctuation`
    applied to each when they are not all identical, else unchanged (no lower-casing, no number
    mapping: the official annotation files are already normalised)."""
    answers = list(answers)
    if len(set(answers)) > 1:
        return [process_punctuation(a) for a in answers]
    return answers


def _accuracy_normalized(pred: str, gts: Sequence[str]) -> float:
    """Leave-one-annotator-out average of min(1, matches among the others / 3)."""
    matches = sum(g == pred for g in gts)
    total = 0.0
    for g in gts:
        others = matches - (g == pred)
        total += min(1.0, others / 3.0)
    return total / len(gts)


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """The official accuracy of one predicted answer against the annotators' ``answers`` (VQA v2 has
    10), in [0, 1]: the mean over annotators ``i`` of ``min(1, #{j != i: answer_j == pred} / 3)``,
    after :func:`normalize_answer` (prediction) and :func:`normalize_gt_answers` (annotators).

    >>> vqa_accuracy("two", ["2", "2", "3", "3", "3", "4", "4", "4", "4", "4"])
    0.6
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list of strings; got {answers!r}")
    return _accuracy_normalized(normalize_answer(pred), normalize_gt_answers(answers))


def evaluate_vqa(predictions: Union[Mapping[int, str], Sequence[dict]], records: Sequence[dict],
                 return_per_question: bool = False) -> dict:
    """Score ``predictions`` against ground-truth ``records`` like the official tool.

    Args:
        predictions: ``{question_id: answer}`` or the result-file form
            ``[{"question_id": int, "answer": str}, ...]``. Predictions for questions that are not in
            ``records`` are ignored (counted in ``n_unscored``).
        records: ``[{"question_id": int, "answer": [str, ...], "answer_type"?: str}, ...]`` (the
            VQA JSON format of docs/datasets.md; ``answer_type`` is optional).
        return_per_question: also return ``per_question``: ``{question_id: accuracy in [0, 1]}``.

    Returns:
        ``{"overall": %, "per_answer_type": {type: %}, "n_questions": int, "n_unscored": int}``
        (``per_answer_type`` is empty when no record gives ``answer_type``; records without it are
        counted in the overall accuracy only).

    Raises:
        ValueError: a question of ``records`` has no prediction (the message names how many and the
            first ids), a record lacks ``question_id`` / ``answer``, or a question id repeats.
    """
    preds = records_by_id(predictions, "question_id", "answer")
    per_question: dict[int, float] = {}
    by_type: dict[str, list[float]] = defaultdict(list)
    missing: list[int] = []
    for i, rec in enumerate(records):
        for key in ("question_id", "answer"):
            if key not in rec:
                raise ValueError(f"ground-truth record {i} has no {key!r} (keys: {sorted(rec)}); "
                                 "scoring needs the annotators' answers")
        qid = int(rec["question_id"])
        if qid in per_question:
            raise ValueError(f"ground-truth record {i}: question_id {qid} appears more than once")
        if qid not in preds:
            missing.append(qid)
            continue
        acc = vqa_accuracy(preds[qid], rec["answer"])
        per_question[qid] = acc
        if rec.get("answer_type") is not None:
            by_type[str(rec["answer_type"])].append(acc)
    if missing:
        raise ValueError(f"{len(missing)} of {len(records)} questions have no prediction "
                         f"(first question ids: {missing[:5]})")
    if not per_question:
        raise ValueError("no ground-truth records to score")
    result: dict = {
        "overall": 100.0 * sum(per_question.values()) / len(per_question),
        "per_answer_type": {t: 100.0 * sum(v) / len(v) for t, v in sorted(by_type.items())},
        "n_questions": len(per_question),
        "n_unscored": len(set(preds) - set(per_question)),
    }
    if return_per_question:
        result["per_question"] = per_question
    return result
