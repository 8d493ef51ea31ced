"""VQA data in the ALBEF format.

Records: ``[{"question_id": int, "question": str, "answer": [str, ...], "image": str,
"dataset": "vqa" | "vg"}, ...]`` (test records have no ``answer``; a VG record's ``answer`` may be a
single string; ``dataset`` defaults to ``"vqa"``). ``image`` paths are relative to the image root
(VG records to the VG image root when one is configured). The answer list for ranking is a JSON
list of strings (ALBEF's ``answer_list.json``, 3,128 answers).

Training targets follow ALBEF: every *unique* answer of a question is a target, weighted by its
share of the annotators' answers (``count / number of answers``; a VG answer gets
``vg_answer_weight``, 0.5 in ALBEF). Questions are cleaned with ALBEF's ``pre_question``.

:func:`extend_tokenizer` adds the characters of the VQA texts that a (checkpoint's) vocabulary lacks
(as word-initial and ``##`` pieces), so that no answer becomes ``[UNK]`` (e.g. the digits of number
answers when the vocabulary was trained on captions that spell numbers as words).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .formats import (DEFAULT_MAX_IMAGE_PIXELS, DataError, ImageLoadError, load_image, load_image_or_substitute,
                      EpochIndex, epoch_and_index, placeholder_image, read_annotations, read_json, sample_seed)
from .text import pre_question, tokenizer_from_state, tokenizer_state
from .transforms import apply_seeded

__all__ = ["VQA_HINT", "read_vqa", "read_answer_list", "answer_targets", "VQATrainDataset", "VQAEvalDataset",
           "VQATrainCollator", "VQAEvalCollator", "extend_tokenizer", "tokenize_answers"]

PathLike = str | os.PathLike

VQA_HINT = ("VQA v2 annotations in the ALBEF format (vqa_train.json, vqa_val.json, vqa_test.json, vg_qa.json, "
            "answer_list.json) come with ALBEF's released data files; images are COCO 2014 (and Visual Genome). "
            "See docs/datasets.md.")


def read_vqa(paths: PathLike | Sequence[PathLike], require_answers: bool, hint: str = VQA_HINT) -> list[dict]:
    """Read and validate VQA records (files concatenated). ``dataset`` defaults to ``"vqa"``; with
    ``require_answers`` every record needs a non-empty ``answer`` (list of strings, or one string).

    Raises ``FileNotFoundError`` / :class:`~datasets.formats.DataError` (a ``ValueError``) naming the
    file, record index and key."""
    records = read_annotations(paths, {"question_id": int, "question": str, "image": str}, "VQA", hint)
    counters: dict[str, int] = {}
    for rec in records:
        src = rec["_source"]
        i = counters[src] = counters.get(src, -1) + 1
        rec.setdefault("dataset", "vqa")
        if rec["dataset"] not in ("vqa", "vg"):
            raise DataError(f"{src!r} record {i}: key 'dataset' must be 'vqa' or 'vg', found {rec['dataset']!r}")
        if "answer" in rec:
            ans = rec["answer"]
            ans = [ans] if isinstance(ans, str) else ans
            if not isinstance(ans, list) or not all(isinstance(a, str) for a in ans):
                raise DataError(f"{src!r} record {i}: key 'answer' must be a list of strings (or one string)")
            rec["answer"] = ans
        if require_answers and not rec.get("answer"):
            raise DataError(f"{src!r} record {i} (question_id {rec['question_id']}): no answers; training needs "
                             "the annotators' answers (key 'answer')")
    return records


def read_answer_list(path: PathLike, hint: str = VQA_HINT) -> list[str]:
    """The candidate answers for ranking: a JSON list of distinct strings."""
    path = os.fspath(path)
    answers = read_json(path, "VQA answer list", hint)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"VQA answer list {path!r} must be a non-empty JSON list of strings")
    dup = [a for a, n in Counter(answers).items() if n > 1]
    if dup:
        raise DataError(f"VQA answer list {path!r} repeats answers: {dup[:5]}")
    return answers


def answer_targets(answers: Sequence[str], dataset: str = "vqa", vg_answer_weight: float = 0.5) -> tuple[list[str], list[float]]:
    """ALBEF's targets: each unique answer with its share of the annotators' answers (VG: times
    ``vg_answer_weight``), in order of first appearance."""
    counts = Counter(answers)
    scale = vg_answer_weight if dataset == "vg" else 1.0
    unique = list(dict.fromkeys(answers))
    return unique, [scale * counts[a] / len(answers) for a in unique]


class _VQADatasetBase(Dataset):
    def __init__(self, records: list[dict], image_root: PathLike, transform: Callable, max_words: int,
                 vg_image_root: Optional[PathLike] = None,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.records, self.transform, self.max_words = records, transform, max_words
        self.image_root, self.vg_image_root = os.fspath(image_root), os.fspath(vg_image_root or image_root)
        self.questions = [pre_question(r["question"], max_words) for r in records]
        self.load_kwargs: dict = {"max_pixels": max_image_pixels}

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, index: int) -> str:
        rec = self.records[index]
        root = self.vg_image_root if rec["dataset"] == "vg" else self.image_root
        return os.path.normpath(os.path.join(root, rec["image"]))


class VQATrainDataset(_VQADatasetBase):
    """Training questions with ALBEF's answer targets. Augmentation is seeded per sample; an image
    that cannot be loaded is replaced by a substitute record
    (:func:`~datasets.formats.load_image_or_substitute`) and the sample's ``bad_images`` / ``n_bad``
    list / count the failed tries; a sample whose tries alone exceed ``max_bad_fraction`` of all images
    is a placeholder with ``failed`` True (the bad-image check stops the run on it).
    ``max_image_pixels`` and ``decode_min_side`` bound the decode (see :func:`~datasets.formats.load_image`)."""

    def __init__(self, records: list[dict], image_root: PathLike, transform: Callable, max_words: int = 35,
                 seed: int = 0, vg_answer_weight: float = 0.5, vg_image_root: Optional[PathLike] = None,
                 max_bad_fraction: float = 1.0, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 decode_min_side: Optional[int] = None) -> None:
        super().__init__(records, image_root, transform, max_words, vg_image_root, max_image_pixels)
        self.seed, self.epoch = seed, 0
        self.load_kwargs["min_side"] = decode_min_side
        self.targets = [answer_targets(r["answer"], r["dataset"], vg_answer_weight) for r in records]
        self.num_images = len({self.image_path(i) for i in range(len(records))})  # distinct image files
        self.max_failures = int(max_bad_fraction * self.num_images)
        self.placeholder_size = decode_min_side or 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def texts(self) -> list[str]:
        """Every question and answer (e.g. to train or extend a tokenizer)."""
        return self.questions + [a for ans, _ in self.targets for a in ans]

    def __getitem__(self, index: "int | EpochIndex") -> dict:
        epoch, index = epoch_and_index(index, self.epoch)
        image, used, failures = load_image_or_substitute(index, len(self.records), self.image_path,
                                                         sample_seed(self.seed, epoch, index),
                                                         self.max_failures, **self.load_kwargs)
        failed = image is None
        if failed:
            image = placeholder_image(self.placeholder_size)
        seed = sample_seed(self.seed, epoch, used)
        answers, weights = self.targets[used]
        return {"image": apply_seeded(self.transform, image, seed), "question": self.questions[used],
                "answers": answers, "weights": weights, "index": used, "bad_images": failures,
                "n_bad": len(failures), "failed": failed}


class VQAEvalDataset(_VQADatasetBase):
    """Evaluation questions (no augmentation); an unreadable image is an error naming the record."""

    def __getitem__(self, index: int) -> dict:
        rec = self.records[int(index)]
        try:
            image = load_image(self.image_path(int(index)), **self.load_kwargs)
        except ImageLoadError as e:
            raise DataError(f"{rec['_source']!r} question_id {rec['question_id']}: {e}") from None
        return {"image": self.transform(image), "question": self.questions[int(index)],
                "question_id": int(rec["question_id"]), "index": int(index)}


def tokenize_answers(tokenizer, answers: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] answer [SEP]`` ids and mask, padded to the longest, truncated to ``max_length``."""
    enc = tokenizer(list(answers), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class VQATrainCollator:
    """Questions (padded, truncated to ``max_question_tokens``) and the flattened answer targets:
    ``answer_ids``/``answer_mask`` (sum of n_i rows), ``weights`` and ``n_answers`` (B,)."""

    def __init__(self, tokenizer, max_question_tokens: int = 35, max_answer_tokens: int = 10) -> None:
        self.tokenizer, self.max_q, self.max_a = tokenizer, max_question_tokens, max_answer_tokens

    def __call__(self, samples: Sequence[dict]) -> dict:
        q = self.tokenizer([s["question"] for s in samples], padding="longest", truncation=True,
                           max_length=self.max_q, return_tensors="pt")
        answers = [a for s in samples for a in s["answers"]]
        a_ids, a_mask = tokenize_answers(self.tokenizer, answers, self.max_a)
        return {"image": torch.stack([s["image"] for s in samples]), "question_ids": q["input_ids"],
                "question_mask": q["attention_mask"], "answer_ids": a_ids, "answer_mask": a_mask,
                "weights": torch.tensor([w for s in samples for w in s["weights"]], dtype=torch.float),
                "n_answers": torch.tensor([len(s["answers"]) for s in samples], dtype=torch.long),
                "n_bad": sum(int(s["n_bad"]) for s in samples),
                "bad_images": [f for s in samples for f in s.get("bad_images", ())],
                "failed": any(s.get("failed", False) for s in samples),
                "index": torch.tensor([s["index"] for s in samples], dtype=torch.long)}


class VQAEvalCollator:
    """Images, questions and their ids for evaluation."""

    def __init__(self, tokenizer, max_question_tokens: int = 35) -> None:
        self.tokenizer, self.max_q = tokenizer, max_question_tokens

    def __call__(self, samples: Sequence[dict]) -> dict:
        q = self.tokenizer([s["question"] for s in samples], padding="longest", truncation=True,
                           max_length=self.max_q, return_tensors="pt")
        return {"image": torch.stack([s["image"] for s in samples]), "question_ids": q["input_ids"],
                "question_mask": q["attention_mask"],
                "qid": torch.tensor([s["question_id"] for s in samples], dtype=torch.long)}


def extend_tokenizer(tokenizer, texts: Iterable[str]):
    """``(tokenizer, added)``: ``tokenizer`` with the characters of ``texts`` it cannot represent added
    to the end of its vocabulary (``c`` for word-initial, ``##c`` for word-internal positions; ids
    of existing tokens unchanged), so that WordPiece never falls back to ``[UNK]`` on these texts.
    Returns the same tokenizer and ``[]`` when nothing is missing."""
    backend = tokenizer.backend_tokenizer
    norm, pre = backend.normalizer, backend.pre_tokenizer
    vocab = tokenizer.get_vocab()
    words: set[str] = set()
    for t in texts:
        text = norm.normalize_str(t) if norm is not None else t
        words.update(w for w, _ in (pre.pre_tokenize_str(text) if pre is not None else [(x, None) for x in text.split()]))
    missing: set[str] = set()
    for w in words:
        if w and tokenizer.unk_token not in tokenizer.tokenize(w):
            continue
        for i, c in enumerate(w):
            piece = c if i == 0 else "##" + c
            if piece not in vocab:
                missing.add(piece)
    if not missing:
        return tokenizer, []
    added = sorted(missing)
    state = tokenizer_state(tokenizer)
    state["vocab"] = list(state["vocab"]) + added
    return tokenizer_from_state(state), added
