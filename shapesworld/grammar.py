"""The caption grammar: :class:`Claim` (what a caption asserts), writing a claim as a caption
(:func:`render_claim`, random templates and paraphrases) and reading it back (:func:`parse_caption`,
raw or ALBEF-cleaned text).

Every caption the generator writes comes from a claim, and ``parse_caption(render_claim(c, rng)) ==
c``; the parser reads the words of the caption as the models see them, cleaned by
:func:`datasets.text.pre_caption` (``style="albef"``, without a word limit).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from datasets.text import pre_caption
from shapesworld.scene import BACKGROUNDS, COLORS, SHAPES, SIZES, SceneObject, pick

SHAPE_PLURALS: Dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles",
    "diamond": "diamonds", "star": "stars", "cross": "crosses",
}
BACKGROUND_WORDS: Tuple[str, ...] = BACKGROUNDS + ("textured",)
RELATIONS: Tuple[str, ...] = ("next to", "left of", "right of", "above", "below")
DIRECTIONAL_RELATIONS = frozenset({"left of", "right of", "above", "below"})
NUMBER_WORDS: Tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)
_REL_TEXT = {"next to": "next to", "left of": "to the left of", "right of": "to the right of",
             "above": "above", "below": "below"}


@dataclass(frozen=True)
class ObjectSpec:
    """One described object; None means "not said"."""

    shape: Optional[str] = None
    color: Optional[str] = None
    size: Optional[str] = None
    row: Optional[str] = None
    col: Optional[str] = None

    def matches(self, o: SceneObject) -> bool:
        return ((self.shape is None or self.shape == o.shape)
                and (self.color is None or self.color == o.color)
                and (self.size is None or self.size == o.size)
                and (self.row is None or self.row == o.row)
                and (self.col is None or self.col == o.col))

    @property
    def has_position(self) -> bool:
        return self.row is not None or self.col is not None


@dataclass(frozen=True)
class Relation:
    """A spatial relation between claim objects ``a`` and ``b`` (indices into Claim.objects)."""

    kind: str
    a: int
    b: int


@dataclass(frozen=True)
class Claim:
    """What a caption asserts about a scene (its semantics: :mod:`shapesworld.truth`)."""

    objects: Tuple[ObjectSpec, ...] = ()
    relations: Tuple[Relation, ...] = ()
    count: Optional[int] = None
    background: Optional[str] = None


def clean(text: str) -> str:
    """ALBEF's caption cleaning (:func:`datasets.text.pre_caption`) without the word limit."""
    return pre_caption(text, max_words=None, style="albef")


# ---------------------------------------------------------------------------------- parsing
_PREFIXES = (
    ("a", "picture", "of"), ("a", "photo", "of"), ("an", "image", "of"),
    ("an", "image", "showing"), ("an", "image", "with"), ("there", "is"), ("there", "are"),
)
_TRAILERS = (("in", "the", "picture"), ("in", "the", "image"))
_REL_TOKENS = (
    (("next", "to"), "next to"), (("to", "the", "left", "of"), "left of"),
    (("to", "the", "right", "of"), "right of"), (("above",), "above"), (("below",), "below"),
)
_POSITION_WORDS = frozenset({"top", "bottom", "center", "middle", "left", "right"})
_OBJECT_NOUNS = frozenset({"shape", "object", "thing"})
PLURAL_NOUNS = {"shapes": None, "objects": None, "things": None,
                 **{p: s for s, p in SHAPE_PLURALS.items()}}
_ARTICLES = frozenset({"a", "an", "the"})


class Parser:
    """A cursor over the cleaned words of a caption, question or statement."""

    def __init__(self, text: str, what: str = "shapes caption"):
        self.text = text
        self.what = what
        self.toks = clean(text).split()
        self.i = 0

    def peek(self, k: int = 0) -> Optional[str]:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def accept(self, *words: str) -> bool:
        n = len(words)
        if tuple(self.toks[self.i:self.i + n]) == words:
            self.i += n
            return True
        return False

    def at_end(self) -> bool:
        return self.i >= len(self.toks)

    def fail(self, why: str = "") -> None:
        tok = self.peek()
        where = f"unexpected {tok!r} at word {self.i}" if tok is not None else "unexpected end"
        raise ValueError(f"cannot parse {self.what} {self.text!r}: {why or where}")

    def expect_end(self) -> None:
        if not self.at_end():
            self.fail()

    # -- phrases
    def position(self) -> Tuple[Optional[str], Optional[str]]:
        if (self.peek() in ("at", "in", "on") and self.peek(1) == "the"
                and self.peek(2) in _POSITION_WORDS):
            w1 = self.toks[self.i + 2]
            self.i += 3
            w2 = None
            if self.peek() in _POSITION_WORDS:
                w2 = self.peek()
                self.i += 1
            if w2 is None:
                if w1 in ("top", "bottom"):
                    return w1, None
                if w1 in ("left", "right"):
                    return None, w1
                return "center", "middle"
            if w1 in ("top", "bottom", "center", "middle") and w2 in ("left", "right", "center",
                                                                     "middle"):
                row = "center" if w1 in ("center", "middle") else w1
                col = "middle" if w2 in ("center", "middle") else w2
                return row, col
            self.i -= 1
            self.fail(f"bad position '{w1} {w2}'")
        return None, None

    def object_body(self) -> ObjectSpec:
        size = color = None
        while True:
            w = self.peek()
            if w in SIZES:
                if size is not None:
                    self.fail("two sizes")
                size = w
            elif w in COLORS:
                if color is not None:
                    self.fail("two colours")
                color = w
            else:
                break
            self.i += 1
        w = self.peek()
        if w in SHAPES:
            shape = w
        elif w in _OBJECT_NOUNS:
            shape = None
        else:
            self.fail()
        self.i += 1
        row, col = self.position()
        return ObjectSpec(shape, color, size, row, col)

    def object_phrase(self) -> ObjectSpec:
        if self.accept("something"):
            color = self.peek()
            if color not in COLORS:
                self.fail()
            self.i += 1
            row, col = self.position()
            return ObjectSpec(color=color, row=row, col=col)
        if self.peek() not in _ARTICLES:
            self.fail()
        self.i += 1
        return self.object_body()

    def relation(self) -> Optional[str]:
        for words, kind in _REL_TOKENS:
            if self.accept(*words):
                return kind
        return None

    def number(self) -> Optional[int]:
        w = self.peek()
        if w in NUMBER_WORDS:
            return NUMBER_WORDS.index(w)
        if w is not None and w.isdigit():
            return int(w)
        return None

    def object_list(self, objects: List[ObjectSpec], relations: List[Relation],
                    need_first: bool) -> None:
        if need_first:
            objects.append(self.object_phrase())
        while True:
            if objects:
                rel = self.relation()
                if rel is not None:
                    objects.append(self.object_phrase())
                    relations.append(Relation(rel, len(objects) - 2, len(objects) - 1))
                    continue
                if self.accept("and") or self.accept("with"):
                    objects.append(self.object_phrase())
                    continue
            if self.peek() in ("a", "an", "something") and self.peek(1) != "single":
                objects.append(self.object_phrase())
                continue
            break

    def claim(self) -> Claim:
        for pre in _PREFIXES:
            if self.accept(*pre):
                break
        count = None
        objects: List[ObjectSpec] = []
        relations: List[Relation] = []
        if self.accept("a", "single"):
            count = 1
            spec = self.object_body()
            if spec != ObjectSpec():
                objects.append(spec)
            self.object_list(objects, relations, need_first=False)
        else:
            n = self.number()
            if n is not None and self.peek(1) in ("shape", "shapes", "object", "objects"):
                self.i += 2
                count = n
                self.object_list(objects, relations, need_first=False)
            else:
                self.object_list(objects, relations, need_first=True)
        background = None
        if self.accept("on", "a"):
            background = self.peek()
            if background not in BACKGROUND_WORDS:
                self.fail()
            self.i += 1
            if not self.accept("background"):
                self.fail()
        for tr in _TRAILERS:
            if self.accept(*tr):
                break
        self.expect_end()
        return Claim(tuple(objects), tuple(relations), count, background)


@functools.lru_cache(maxsize=200_000)
def parse_caption(text: str) -> Claim:
    """Parse any caption the generator writes (raw or ALBEF-cleaned) into its :class:`Claim`.

    Raises ValueError naming the text when it is not a shapes-world caption."""
    return Parser(text).claim()


# ------------------------------------------------------------------------------ rendering text
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _position_text(row: Optional[str], col: Optional[str], rng: np.random.Generator) -> str:
    if row is None and col is None:
        return ""
    if row is not None and col is not None:
        if row == "center" and col == "middle":
            return "in the center"
        colw = "center" if col == "middle" else col
        sep = "-" if rng.random() < 0.25 else " "
        return f"at the {row}{sep}{colw}"
    if row is not None:
        if row not in ("top", "bottom"):
            raise ValueError("a row-only position must be top or bottom")
        return f"at the {row}"
    if col not in ("left", "right"):
        raise ValueError("a column-only position must be left or right")
    return f"on the {col}"


def object_text(spec: ObjectSpec, rng: np.random.Generator, article: bool = True) -> str:
    if (article and spec.shape is None and spec.size is None and spec.color is not None
            and rng.random() < 0.3):
        words = ["something", spec.color]
    else:
        words = [w for w in (spec.size, spec.color) if w]
        words.append(spec.shape or pick(rng, ("shape", "object")))
        if article:
            words.insert(0, _article(words[0]))
    pos = _position_text(spec.row, spec.col, rng)
    if pos:
        words.append(pos)
    return " ".join(words)


def _objects_text(claim: Claim, rng: np.random.Generator) -> str:
    rels = {(r.a, r.b): r.kind for r in claim.relations}
    for r in claim.relations:
        if r.b != r.a + 1:
            raise ValueError("only relations between consecutive objects can be written")
    texts = [object_text(s, rng) for s in claim.objects]
    out = texts[0]
    k = len(texts)
    for i in range(1, k):
        rel = rels.get((i - 1, i))
        if rel is not None:
            sep = f" {_REL_TEXT[rel]} "
        elif i == k - 1:
            sep = " and " if (k > 2 or rng.random() < 0.8) else " with "
        else:
            sep = ", "
        out += sep + texts[i]
    return out


def _count_text(n: int, rng: np.random.Generator) -> str:
    if n == 1:
        return pick(rng, ("a single shape", "one shape", "a single object", "one object"))
    return f"{NUMBER_WORDS[n]} {pick(rng, ('shapes', 'objects'))}"


def _finish(text: str, rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.4:
        text += "."
    return text


def render_claim(claim: Claim, rng: np.random.Generator) -> str:
    """Write a claim as a caption (random template and paraphrase; parse_caption inverts it)."""
    if not claim.objects and claim.count is None:
        raise ValueError("a caption needs objects or a count")
    if claim.count is not None:
        n = claim.count
        if n == 1 and len(claim.objects) == 1 and rng.random() < 0.5:
            core = "a single " + object_text(claim.objects[0], rng, article=False)
        else:
            core = _count_text(n, rng)
            if claim.objects:
                core += ": " + _objects_text(claim, rng)
        prefix = pick(rng, ("", "an image with ", "a picture of ",
                             "there is " if n == 1 else "there are "))
    else:
        prefix = pick(rng, ("", "a picture of ", "an image of ", "an image showing ",
                             "a photo of ", "there is ", "an image with "))
        core = _objects_text(claim, rng)
    text = prefix + core
    if claim.background is not None:
        text += f" on a {claim.background} background"
    if prefix in ("there is ", "there are ") and rng.random() < 0.3:
        text += pick(rng, (" in the picture", " in the image"))
    return _finish(text, rng)
