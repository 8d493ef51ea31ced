"""NLVR2 statements about a pair of images ("The left image contains a red circle.", "There are
more shapes in the right image than in the left image."): :class:`PairStatement`, writing one
(:func:`statement_text`) and reading it back (:func:`parse_statement`). Their truth:
:func:`shapesworld.truth.statement_is_true`."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from shapesworld.grammar import NUMBER_WORDS, Claim, clean, object_text, parse_caption
from shapesworld.scene import pick


@dataclass(frozen=True)
class PairStatement:
    """An NLVR2 statement over (left, right) scenes. kind: left | right | both | neither |
    exactly_one (use ``claim``), more_left | more_right | same_count, total (use ``number``)."""

    kind: str
    claim: Optional[Claim] = None
    number: Optional[int] = None


_FIXED_STATEMENTS = {
    "there are more shapes in the left image than in the right image": "more_left",
    "the left image has more shapes than the right image": "more_left",
    "there are more shapes in the right image than in the left image": "more_right",
    "the right image has more shapes than the left image": "more_right",
    "both images have the same number of shapes": "same_count",
    "the two images have the same number of shapes": "same_count",
}
_CLAIM_STATEMENTS = (
    ("the left image contains ", "left"), ("the left image has ", "left"),
    ("the right image contains ", "right"), ("the right image has ", "right"),
    ("both images contain ", "both"), ("each image contains ", "both"),
    ("neither image contains ", "neither"),
    ("exactly one image contains ", "exactly_one"), ("only one image contains ", "exactly_one"),
)
_TOTAL_RE = re.compile(r"(?:there are|the two images contain) (\w+) shapes in total")


@functools.lru_cache(maxsize=100_000)
def parse_statement(sentence: str) -> PairStatement:
    """Parse a generated NLVR2 sentence; raises ValueError naming the text otherwise."""
    s = clean(sentence)
    if s in _FIXED_STATEMENTS:
        return PairStatement(_FIXED_STATEMENTS[s])
    m = _TOTAL_RE.fullmatch(s)
    if m:
        w = m.group(1)
        if w in NUMBER_WORDS:
            return PairStatement("total", number=NUMBER_WORDS.index(w))
        if w.isdigit():
            return PairStatement("total", number=int(w))
    for prefix, kind in _CLAIM_STATEMENTS:
        if s.startswith(prefix):
            try:
                claim = parse_caption(s[len(prefix):])
            except ValueError:
                break
            return PairStatement(kind, claim=claim)
    raise ValueError(f"cannot parse shapes NLVR2 statement {sentence!r}")


def statement_text(stmt: PairStatement, rng: np.random.Generator) -> str:
    """Write a statement as an NLVR2 sentence (random template; parse_statement inverts it)."""
    k = stmt.kind
    if k in _FIXED_STATEMENTS.values():
        text = pick(rng, [t for t, kk in _FIXED_STATEMENTS.items() if kk == k])
    elif k == "total":
        text = pick(rng, ("there are {} shapes in total",
                           "the two images contain {} shapes in total"))
        text = text.format(NUMBER_WORDS[stmt.number])
    else:
        claim = stmt.claim
        if claim.objects:
            x = object_text(claim.objects[0], rng)
        else:
            x = "a single shape" if claim.count == 1 else f"{NUMBER_WORDS[claim.count]} shapes"
        prefix = pick(rng, [p for p, kk in _CLAIM_STATEMENTS if kk == k])
        text = prefix + x
    return text[0].upper() + text[1:] + "."
