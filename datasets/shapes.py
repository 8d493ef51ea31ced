"""The synthetic "shapes" world: the embedded default dataset (README.md, "What the demo does").

A seeded generator draws scenes (a few coloured shapes on a 3x3 grid, on a plain or textured
background), renders them with PIL, and writes annotation JSONs in exactly the formats that
ALBEF/BLIP users already have (pre-training, retrieval, VQA, NLVR2, captioning).

Every caption is generated from a structured :class:`Claim` and can be parsed back
(:func:`parse_caption`), also after ALBEF-style cleaning. :func:`claim_is_true` evaluates a claim on
a scene, so for any caption and any image the world knows whether the caption is true of the image.
Partial captions ("there is a red circle", "an image with two shapes") are true of many images:
the dataset has real, measurable false negatives, which is what SRCL is about.
``partial_caption_prob`` sets how often a caption describes only part of the scene.

Command line::

    python -m datasets.shapes --out data/shapes [--seed 0 --num-train-images 1500 ...]

Every :class:`ShapesConfig` field is a ``--field-name`` option. The run skips all work when
``out/manifest.json`` is complete and was written for the same configuration (``--force``
regenerates). ``manifest.json`` is written last, so an interrupted run is detected and redone.

Files written under ``out`` (which is the ``image_root``; every ``image`` path is relative to it)::

    images/{train,val,test}/NNNNNN.png    NNNNNN = the global integer image id
    scenes.json                           {image_path: scene}, with the captions and their kinds
    pretrain.json                         [{"image", "caption": [captions]}]           (train)
    retrieval_train.json                  [{"image", "caption": str, "image_id": int}] (train)
    retrieval_{val,test}.json             [{"image", "caption": [captions]}]
    vqa_{train,val}.json                  [{"question_id", "question", "answer": [10], "image",
                                            "dataset": "vqa", "answer_type"}]
    vqa_test.json                         the same without "answer"
    vqa_test_gt.json                      vqa_test.json with the answers, for local scoring
    answer_list.json                      every answer that can occur (most frequent first)
    nlvr2_{train,dev,test}.json           [{"images": [left, right], "sentence", "label"}]
    caption_train.json                    [{"image", "caption": str, "image_id": int}]
    caption_{val,test}.json               [{"image", "caption": [refs], "image_id": int}]
    caption_{val,test}_gt.json            COCO ground truth that pycocotools reads
    manifest.json                         config, counts, version, false-negative statistics
    .shapes_written.json                  every file written: size and SHA-256

The generator never writes over a file it did not write itself (or that was changed since): such a
file is named in the error and nothing is written. A run config's ``data.shapes`` generates the
world into ``data.shapes.root`` (default ``data/shapes``), and only when one of the run's data
paths lies in that folder.

Semantics of the claims (the truth oracle):
  * objects are existential and distinct: each described object must be matched by a different
    object of the scene ("a red circle and a blue square" is also true of a scene that has a
    green star besides);
  * a count ("two shapes") is the exact number of objects in the scene;
  * positions are grid cells: rows top/center/bottom, columns left/middle/right; "at the top"
    constrains the row only, "on the left" the column only, "in the center" is the middle cell;
  * relations compare grid cells: "to the left of" / "to the right of" compare columns, "above" /
    "below" compare rows, "next to" means cells that share an edge;
  * background: plain, striped or speckled; "textured" means striped or speckled.

With ``use_positions=False`` no caption, question or statement mentions a position or a
directional relation (left of / right of / above / below), so horizontal-flip augmentation keeps
every caption true; "next to" is flip-invariant and stays. (NLVR2's "left image" / "right image"
name the images of the pair, not positions, and stay too.)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = "shapes-1.0"
DEFAULT_ROOT = "data/shapes"
# the record of every file the generator wrote into a folder (name -> size and SHA-256); the
# generator never writes over a file that this record does not name or that changed since
WRITTEN_RECORD = ".shapes_written.json"

# --------------------------------------------------------------------------------- vocabulary
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
SHAPE_PLURALS: Dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles",
    "diamond": "diamonds", "star": "stars", "cross": "crosses",
}
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (240, 220, 30),
    "green": (30, 160, 50),
    "cyan": (30, 200, 220),
    "blue": (30, 60, 220),
    "purple": (140, 50, 180),
}
COLOR_NAMES: Tuple[str, ...] = tuple(COLORS)
SIZES: Tuple[str, ...] = ("small", "large")
ROWS: Tuple[str, ...] = ("top", "center", "bottom")
COLS: Tuple[str, ...] = ("left", "middle", "right")
BACKGROUNDS: Tuple[str, ...] = ("plain", "striped", "speckled")
BACKGROUND_WORDS: Tuple[str, ...] = BACKGROUNDS + ("textured",)
BACKGROUND_COLORS: Tuple[Tuple[int, int, int], ...] = (
    (200, 200, 200), (222, 214, 192), (184, 194, 206), (112, 112, 112), (196, 208, 188),
)
RELATIONS: Tuple[str, ...] = ("next to", "left of", "right of", "above", "below")
DIRECTIONAL_RELATIONS = frozenset({"left of", "right of", "above", "below"})
CAPTION_KINDS: Tuple[str, ...] = ("full", "object", "attribute", "relation", "count")
PARTIAL_KINDS: Tuple[str, ...] = ("object", "attribute", "relation", "count")
NUMBER_WORDS: Tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)
ANSWER_TYPES = ("yes/no", "number", "other")
# ALBEF's max_words for pre-training: captions stay within it unless a scene has too many objects
MAX_CAPTION_WORDS = 30
SPLITS: Tuple[str, ...] = ("train", "val", "test")
NLVR2_SPLIT_NAMES = {"train": "train", "val": "dev", "test": "test"}

_SIZE_FRACTION = {"small": 0.24, "large": 0.40}  # radius as a fraction of a grid cell
_REL_TEXT = {"next to": "next to", "left of": "to the left of", "right of": "to the right of",
             "above": "above", "below": "below"}


# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class ShapesConfig:
    """Everything that determines the generated files (same config -> byte-identical files)."""

    seed: int = 0
    image_size: int = 96
    num_train_images: int = 1500
    num_val_images: int = 200
    num_test_images: int = 200
    min_objects: int = 1
    max_objects: int = 3
    captions_per_image: int = 5
    partial_caption_prob: float = 0.5
    textured_background_prob: float = 0.3
    image_format: str = "png"
    use_positions: bool = True
    vqa_questions_per_image: int = 3
    nlvr2_pairs: Tuple[int, int, int] = (1000, 200, 200)  # train / dev / test
    annotators: int = 10
    vqa_answer_noise: float = 0.1
    # where a run generates the world (the run configs' ``data.shapes.root``); not part of the
    # content: two folders with the same other fields hold byte-identical files
    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        pairs = tuple(int(x) for x in self.nlvr2_pairs)
        object.__setattr__(self, "nlvr2_pairs", pairs)
        fmt = str(self.image_format).lower()
        object.__setattr__(self, "image_format", "jpg" if fmt == "jpeg" else fmt)
        problems = []
        if self.image_size < 24:
            problems.append(f"image_size must be >= 24 (got {self.image_size})")
        for name in ("num_train_images", "num_val_images", "num_test_images"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            problems.append(
                "need 1 <= min_objects <= max_objects <= 9 (3x3 grid, one object a cell)")
        if self.captions_per_image < 1:
            problems.append("captions_per_image must be >= 1")
        for name in ("partial_caption_prob", "textured_background_prob", "vqa_answer_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1]")
        if self.image_format not in ("png", "jpg"):
            problems.append(f"image_format must be 'png' or 'jpg' (got {self.image_format!r})")
        if self.vqa_questions_per_image < 0:
            problems.append("vqa_questions_per_image must be >= 0")
        if len(pairs) != 3 or min(pairs) < 0:
            problems.append("nlvr2_pairs must be three counts >= 0 (train, dev, test)")
        if self.annotators < 1:
            problems.append("annotators must be >= 1")
        if not isinstance(self.root, str) or not self.root.strip():
            problems.append("root must be a folder name")
        if problems:
            raise ValueError("invalid ShapesConfig: " + "; ".join(problems))

    def to_json(self) -> Dict[str, Any]:
        """The content-determining fields as plain JSON values (tuples become lists), as stored in
        the manifest (``root``, where the files go, is not one of them)."""
        d = dataclasses.asdict(self)
        d.pop("root")
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ShapesConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ShapesConfig fields: {sorted(unknown)}")
        return cls(**dict(d))

    def split_sizes(self) -> Dict[str, int]:
        return {"train": self.num_train_images, "val": self.num_val_images,
                "test": self.num_test_images}


# ------------------------------------------------------------------------------------ scenes
@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: str
    col: str
    x: int  # centre in pixels (of the written image)
    y: int
    radius: int

    @property
    def cell(self) -> Tuple[int, int]:
        return ROWS.index(self.row), COLS.index(self.col)


@dataclass(frozen=True)
class Scene:
    image_id: int
    split: str
    objects: Tuple[SceneObject, ...]
    background: str  # plain | striped | speckled
    background_color: Tuple[int, int, int]
    texture: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "image_id": self.image_id,
            "split": self.split,
            "background": self.background,
            "background_color": list(self.background_color),
            "texture": dict(self.texture),
            "objects": [dataclasses.asdict(o) for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Scene":
        names = [f.name for f in dataclasses.fields(SceneObject)]
        objects = tuple(SceneObject(**{k: o[k] for k in names}) for o in d["objects"])
        return cls(image_id=int(d["image_id"]), split=d["split"], objects=objects,
                   background=d["background"], background_color=tuple(d["background_color"]),
                   texture=dict(d.get("texture", {})))


def _as_scene(scene: Union[Scene, Mapping[str, Any]]) -> Scene:
    return scene if isinstance(scene, Scene) else Scene.from_dict(scene)


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def sample_scene(rng: np.random.Generator, cfg: ShapesConfig, image_id: int = 0,
                 split: str = "train") -> Scene:
    """Draw one scene: objects in distinct grid cells, distinct (shape, colour) pairs."""
    size_px = cfg.image_size
    cell = size_px / 3.0
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = sorted(int(c) for c in rng.permutation(9)[:n])
    used = set()
    objects = []
    for c in cells:
        while True:
            shape, color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
            if (shape, color) not in used:
                break
        used.add((shape, color))
        size = _pick(rng, SIZES)
        r_i, c_i = divmod(c, 3)
        radius = max(2, int(round(_SIZE_FRACTION[size] * cell)))
        slack = max(0, min(int(cell / 2 - radius - 1), int(0.15 * cell)))
        x = int(round((c_i + 0.5) * cell)) + int(rng.integers(-slack, slack + 1))
        y = int(round((r_i + 0.5) * cell)) + int(rng.integers(-slack, slack + 1))
        objects.append(SceneObject(shape, color, size, ROWS[r_i], COLS[c_i], x, y, radius))
    textured = rng.random() < cfg.textured_background_prob
    background = _pick(rng, ("striped", "speckled")) if textured else "plain"
    bg = _pick(rng, BACKGROUND_COLORS)
    texture: Dict[str, Any] = {}
    if background == "striped":
        lo, hi = max(4, size_px // 16), max(5, size_px // 8)
        texture = {"orientation": _pick(rng, ("horizontal", "vertical", "diagonal")),
                   "period": int(rng.integers(lo, hi + 1)),
                   "stripe_color": [max(0, v - 28) for v in bg]}
    elif background == "speckled":
        texture = {"amplitude": 22, "noise_seed": int(rng.integers(2**31 - 1))}
    return Scene(image_id, split, tuple(objects), background, tuple(bg), texture)


# --------------------------------------------------------------------------------- rendering
def _draw_shape(draw: ImageDraw.ImageDraw, o: SceneObject) -> None:
    x, y, r = o.x, o.y, o.radius
    fill = COLORS[o.color]
    if o.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif o.shape == "square":
        h = 0.85 * r
        draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(x, y - r), (x + 0.866 * r, y + 0.5 * r), (x - 0.866 * r, y + 0.5 * r)],
                     fill=fill)
    elif o.shape == "diamond":
        draw.polygon([(x, y - r), (x + 0.75 * r, y), (x, y + r), (x - 0.75 * r, y)], fill=fill)
    elif o.shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((x + rad * math.cos(ang), y + rad * math.sin(ang)))
        draw.polygon(pts, fill=fill)
    elif o.shape == "cross":
        a = 0.3 * r
        draw.rectangle([x - r, y - a, x + r, y + a], fill=fill)
        draw.rectangle([x - a, y - r, x + a, y + r], fill=fill)
    else:  # pragma: no cover - guarded by the vocabulary
        raise ValueError(f"unknown shape {o.shape!r}")


def render_scene(scene: Union[Scene, Mapping[str, Any]], image_size: int) -> Image.Image:
    """Render a scene (a pure function of the scene and the size)."""
    scene = _as_scene(scene)
    s = image_size
    bg = tuple(scene.background_color)
    if scene.background == "speckled":
        rng = np.random.default_rng(int(scene.texture["noise_seed"]))
        amp = int(scene.texture["amplitude"])
        noise = rng.integers(-amp, amp + 1, size=(s, s, 1))
        arr = np.clip(np.asarray(bg, dtype=np.int32)[None, None, :] + noise, 0, 255)
        img = Image.fromarray(arr.astype(np.uint8), "RGB")
    else:
        img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    if scene.background == "striped":
        period = int(scene.texture["period"])
        width = max(1, period // 2)
        stripe = tuple(scene.texture["stripe_color"])
        orient = scene.texture["orientation"]
        if orient == "horizontal":
            for y0 in range(0, s, period):
                draw.rectangle([0, y0, s - 1, y0 + width - 1], fill=stripe)
        elif orient == "vertical":
            for x0 in range(0, s, period):
                draw.rectangle([x0, 0, x0 + width - 1, s - 1], fill=stripe)
        else:
            for x0 in range(-s, s, period):
                draw.polygon([(x0, 0), (x0 + width, 0), (x0 + width + s, s), (x0 + s, s)],
                             fill=stripe)
    for o in scene.objects:
        _draw_shape(draw, o)
    return img


def image_path(split: str, image_id: int, image_format: str = "png") -> str:
    """The relative path of an image (the ``image`` field of the annotation files)."""
    return f"images/{split}/{image_id:06d}.{image_format}"


# ------------------------------------------------------------------------------------ claims
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
    """What a caption asserts about a scene (see the module docstring for the semantics)."""

    objects: Tuple[ObjectSpec, ...] = ()
    relations: Tuple[Relation, ...] = ()
    count: Optional[int] = None
    background: Optional[str] = None


def relation_holds(kind: str, a: SceneObject, b: SceneObject) -> bool:
    (ra, ca), (rb, cb) = a.cell, b.cell
    if kind == "left of":
        return ca < cb
    if kind == "right of":
        return ca > cb
    if kind == "above":
        return ra < rb
    if kind == "below":
        return ra > rb
    if kind == "next to":
        return abs(ra - rb) + abs(ca - cb) == 1
    raise ValueError(f"unknown relation {kind!r}")


def claim_is_true(claim: Claim, scene: Union[Scene, Mapping[str, Any]]) -> bool:
    """Reference (pure Python) evaluation of a claim on a scene."""
    scene = _as_scene(scene)
    objs = scene.objects
    if claim.count is not None and len(objs) != claim.count:
        return False
    if claim.background is not None:
        if claim.background == "textured":
            if scene.background == "plain":
                return False
        elif scene.background != claim.background:
            return False
    k = len(claim.objects)
    if k == 0:
        return True
    for assign in itertools.permutations(range(len(objs)), k):
        if all(spec.matches(objs[j]) for spec, j in zip(claim.objects, assign)) and all(
                relation_holds(r.kind, objs[assign[r.a]], objs[assign[r.b]])
                for r in claim.relations):
            return True
    return False


# ------------------------------------------------------------------------------ text cleaning
_ALBEF_DELETE = re.compile(r"([,.'!?\"()*#:;~])")


def albef_clean(text: str) -> str:
    """ALBEF's ``pre_caption`` without the word limit: lower-case, delete , . ' ! ? " ( ) * # : ; ~,
    turn - and / into spaces, collapse runs of whitespace, strip."""
    t = _ALBEF_DELETE.sub("", text.lower()).replace("-", " ").replace("/", " ")
    t = t.replace("<person>", "person")
    t = re.sub(r"\s{2,}", " ", t)
    return t.rstrip("\n").strip(" ")


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
_PLURAL_NOUNS = {"shapes": None, "objects": None, "things": None,
                 **{p: s for s, p in SHAPE_PLURALS.items()}}
_ARTICLES = frozenset({"a", "an", "the"})


class _Parser:
    def __init__(self, text: str, what: str = "shapes caption"):
        self.text = text
        self.what = what
        self.toks = albef_clean(text).split()
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
    return _Parser(text).claim()


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


def _object_text(spec: ObjectSpec, rng: np.random.Generator, article: bool = True) -> str:
    if (article and spec.shape is None and spec.size is None and spec.color is not None
            and rng.random() < 0.3):
        words = ["something", spec.color]
    else:
        words = [w for w in (spec.size, spec.color) if w]
        words.append(spec.shape or _pick(rng, ("shape", "object")))
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
    texts = [_object_text(s, rng) for s in claim.objects]
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
        return _pick(rng, ("a single shape", "one shape", "a single object", "one object"))
    return f"{NUMBER_WORDS[n]} {_pick(rng, ('shapes', 'objects'))}"


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
            core = "a single " + _object_text(claim.objects[0], rng, article=False)
        else:
            core = _count_text(n, rng)
            if claim.objects:
                core += ": " + _objects_text(claim, rng)
        prefix = _pick(rng, ("", "an image with ", "a picture of ",
                             "there is " if n == 1 else "there are "))
    else:
        prefix = _pick(rng, ("", "a picture of ", "an image of ", "an image showing ",
                             "a photo of ", "there is ", "an image with "))
        core = _objects_text(claim, rng)
    text = prefix + core
    if claim.background is not None:
        text += f" on a {claim.background} background"
    if prefix in ("there is ", "there are ") and rng.random() < 0.3:
        text += _pick(rng, (" in the picture", " in the image"))
    return _finish(text, rng)


# ------------------------------------------------------------------------- caption generation
@dataclass(frozen=True)
class CaptionSample:
    text: str
    kind: str  # one of CAPTION_KINDS
    claim: Claim


def _strip_positions(claim: Claim) -> Claim:
    objs = tuple(dataclasses.replace(o, row=None, col=None) for o in claim.objects)
    rels = tuple(r for r in claim.relations if r.kind not in DIRECTIONAL_RELATIONS)
    return dataclasses.replace(claim, objects=objs, relations=rels)


def _n_words(text: str) -> int:
    return len(albef_clean(text).split())


def _holding_relations(a: SceneObject, b: SceneObject, cfg: ShapesConfig) -> List[str]:
    kinds = RELATIONS if cfg.use_positions else ("next to",)
    return [k for k in kinds if relation_holds(k, a, b)]


def _random_position(o: SceneObject,
                     rng: np.random.Generator) -> Tuple[Optional[str], Optional[str]]:
    options = [(o.row, o.col)]
    if o.row in ("top", "bottom"):
        options.append((o.row, None))
    if o.col in ("left", "right"):
        options.append((None, o.col))
    return _pick(rng, options)


_ATTRIBUTE_VARIANTS = (("shape", "color"), ("size", "shape"), ("color",), ("shape",),
                       ("size", "color"))


def _reduced_spec(o: SceneObject, attrs: Sequence[str]) -> ObjectSpec:
    return ObjectSpec(**{a: getattr(o, a) for a in attrs})


def _full_claim(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig) -> Claim:
    objs = [scene.objects[int(j)] for j in rng.permutation(len(scene.objects))]
    with_pos = cfg.use_positions and rng.random() < 0.35
    specs = tuple(ObjectSpec(o.shape, o.color, o.size, o.row if with_pos else None,
                             o.col if with_pos else None) for o in objs)
    relations: Tuple[Relation, ...] = ()
    if len(objs) == 2 and not with_pos and rng.random() < 0.35:
        kinds = _holding_relations(objs[0], objs[1], cfg)
        if kinds:
            relations = (Relation(_pick(rng, kinds), 0, 1),)
    count = len(objs) if rng.random() < 0.3 else None
    background = None
    if rng.random() < 0.3:
        background = scene.background
        if background != "plain" and rng.random() < 0.3:
            background = "textured"
    return Claim(specs, relations, count, background)


def _partial_claim(scene: Scene, rng: np.random.Generator,
                   cfg: ShapesConfig) -> Tuple[Claim, str]:
    kind = PARTIAL_KINDS[int(rng.choice(4, p=[0.35, 0.35, 0.15, 0.15]))]
    objs = scene.objects
    if kind == "relation":
        pairs = [(a, b) for a in objs for b in objs if a is not b and _holding_relations(a, b, cfg)]
        if not pairs:
            kind = "object"
        else:
            a, b = _pick(rng, pairs)
            rel = _pick(rng, _holding_relations(a, b, cfg))
            specs = (ObjectSpec(a.shape, a.color), ObjectSpec(b.shape, b.color))
            return Claim(specs, (Relation(rel, 0, 1),)), kind
    if kind == "count":
        bg = scene.background if rng.random() < 0.5 else None
        return Claim(count=len(objs), background=bg), kind
    o = _pick(rng, objs)
    if kind == "object":
        spec = ObjectSpec(o.shape, o.color, o.size)
        pos_prob = 0.3
    else:
        spec = _reduced_spec(o, _pick(rng, _ATTRIBUTE_VARIANTS))
        pos_prob = 0.2
    if cfg.use_positions and rng.random() < pos_prob:
        row, col = _random_position(o, rng)
        spec = dataclasses.replace(spec, row=row, col=col)
    bg = scene.background if rng.random() < 0.15 else None
    return Claim((spec,), (), None, bg), kind


def make_captions(scene: Union[Scene, Mapping[str, Any]], cfg: ShapesConfig,
                  rng: np.random.Generator) -> List[CaptionSample]:
    """``cfg.captions_per_image`` captions for a scene, distinct where possible.

    Each caption is whole-scene ("full") with probability 1 - partial_caption_prob, otherwise
    partial: one object ("object"), one object without some attributes ("attribute"), two objects
    in a spatial relation ("relation"), or the number of shapes ("count")."""
    scene = _as_scene(scene)
    out: List[CaptionSample] = []
    seen = set()
    for _ in range(cfg.captions_per_image):
        sample = None
        for _attempt in range(10):
            if rng.random() < cfg.partial_caption_prob:
                claim, kind = _partial_claim(scene, rng, cfg)
            else:
                claim, kind = _full_claim(scene, rng, cfg), "full"
            text = render_claim(claim, rng)
            # keep within ALBEF's 30 words where possible: drop positions, background, count
            for reduce in (_strip_positions,
                           lambda c: dataclasses.replace(c, background=None),
                           lambda c: dataclasses.replace(c, count=None) if c.objects else c):
                if _n_words(text) <= MAX_CAPTION_WORDS:
                    break
                claim = reduce(claim)
                text = render_claim(claim, rng)
            sample = CaptionSample(text, kind, claim)
            if text not in seen:
                break
        seen.add(sample.text)
        out.append(sample)
    return out


# ----------------------------------------------------------------------------------------- VQA
def _unique(spec: ObjectSpec, scene: Scene) -> bool:
    return sum(spec.matches(o) for o in scene.objects) == 1


def _make_question(qtype: str, scene: Scene, rng: np.random.Generator,
                   cfg: ShapesConfig) -> Optional[Tuple[str, str, str]]:
    objs = scene.objects
    o = _pick(rng, objs)
    pos = [ObjectSpec(row=o.row, col=o.col)] if cfg.use_positions else []
    if qtype in ("color", "shape", "size"):
        if qtype == "color":
            cands = [ObjectSpec(shape=o.shape), ObjectSpec(shape=o.shape, size=o.size)] + pos
        elif qtype == "shape":
            cands = [ObjectSpec(color=o.color), ObjectSpec(color=o.color, size=o.size)] + pos
        else:
            cands = [ObjectSpec(shape=o.shape, color=o.color)] + pos
        cands = [c for c in cands if _unique(c, scene)]
        if not cands:
            return None
        desc = _object_text(_pick(rng, cands), rng, article=False)
        q = f"what {qtype} is the {desc}?"
        return q, getattr(o, qtype), "other"
    if qtype == "count":
        variant = _pick(rng, ("all", "color", "shape"))
        tail = _pick(rng, ("are there?", "are in the image?", "are there in the picture?"))
        if variant == "all":
            q = f"how many {_pick(rng, ('shapes', 'objects'))} {tail}"
            n = len(objs)
        elif variant == "color":
            c = o.color if rng.random() < 0.7 else _pick(rng, COLOR_NAMES)
            q = f"how many {c} {_pick(rng, ('shapes', 'objects'))} {tail}"
            n = sum(x.color == c for x in objs)
        else:
            s = o.shape if rng.random() < 0.7 else _pick(rng, SHAPES)
            q = f"how many {SHAPE_PLURALS[s]} {tail}"
            n = sum(x.shape == s for x in objs)
        return q, str(n), "number"
    if qtype == "exist":
        attrs = _pick(rng, _ATTRIBUTE_VARIANTS + (("size", "color", "shape"),))
        if rng.random() < 0.5:
            spec, ans = _reduced_spec(o, attrs), "yes"
        else:
            for _ in range(30):
                fake = SceneObject(_pick(rng, SHAPES), _pick(rng, COLOR_NAMES), _pick(rng, SIZES),
                                   "center", "middle", 0, 0, 0)
                spec = _reduced_spec(fake, attrs)
                if not any(spec.matches(x) for x in objs):
                    break
            else:
                return None
            ans = "no"
        return f"is there {_object_text(spec, rng)}?", ans, "yes/no"
    raise ValueError(f"unknown question type {qtype!r}")


def make_questions(scene: Union[Scene, Mapping[str, Any]], cfg: ShapesConfig,
                   rng: np.random.Generator, k: Optional[int] = None) -> List[Tuple[str, str, str]]:
    """Up to ``k`` distinct (question, true answer, answer_type) triples for a scene."""
    scene = _as_scene(scene)
    k = cfg.vqa_questions_per_image if k is None else k
    out: List[Tuple[str, str, str]] = []
    seen = set()
    for _ in range(20 * k):
        if len(out) >= k:
            break
        q = _make_question(_pick(rng, ("color", "shape", "size", "count", "exist")), scene, rng,
                           cfg)
        if q is None or q[0] in seen:
            continue
        seen.add(q[0])
        out.append((q[0][0].upper() + q[0][1:], q[1], q[2]))
    return out


def _answer_alternatives(answer: str, qtype: str, cfg: ShapesConfig) -> List[str]:
    if qtype == "yes/no":
        pool: Sequence[str] = ("yes", "no")
    elif qtype == "number":
        pool = [str(i) for i in range(cfg.max_objects + 1)]
    elif answer in COLORS:
        pool = COLOR_NAMES
    elif answer in SIZES:
        pool = SIZES
    else:
        pool = SHAPES
    return [a for a in pool if a != answer]


def _annotate(answer: str, qtype: str, rng: np.random.Generator, cfg: ShapesConfig) -> List[str]:
    n = cfg.annotators
    noisy = min(int(rng.binomial(n, cfg.vqa_answer_noise)), (n - 1) // 2)
    alts = _answer_alternatives(answer, qtype, cfg)
    idx = set(int(i) for i in rng.choice(n, size=noisy, replace=False)) if noisy else set()
    return [_pick(rng, alts) if (i in idx and alts) else answer for i in range(n)]


def answer_question(question: str, scene: Union[Scene, Mapping[str, Any]]) -> str:
    """The true answer to a generated VQA question (parsed from its text, evaluated on the scene).

    Raises ValueError for questions it cannot parse or whose object is not unique."""
    scene = _as_scene(scene)
    p = _Parser(question, "shapes question")
    for attr in ("color", "shape", "size"):
        if p.accept("what", attr, "is", "the"):
            spec = p.object_body()
            p.expect_end()
            hits = [o for o in scene.objects if spec.matches(o)]
            if len(hits) != 1:
                raise ValueError(f"question {question!r} does not pick exactly one object "
                                 f"({len(hits)} match)")
            return getattr(hits[0], attr)
    if p.accept("how", "many"):
        size = color = None
        while p.peek() in SIZES or p.peek() in COLORS:
            if p.peek() in SIZES:
                size = p.peek()
            else:
                color = p.peek()
            p.i += 1
        noun = p.peek()
        if noun not in _PLURAL_NOUNS:
            p.fail()
        p.i += 1
        spec = ObjectSpec(shape=_PLURAL_NOUNS[noun], color=color, size=size)
        if not (p.accept("are", "there", "in", "the", "picture") or p.accept("are", "there")
                or p.accept("are", "in", "the", "image")):
            p.fail()
        p.expect_end()
        return str(sum(spec.matches(o) for o in scene.objects))
    if p.accept("is", "there"):
        spec = p.object_phrase()
        p.expect_end()
        return "yes" if claim_is_true(Claim((spec,)), scene) else "no"
    p.fail()
    raise AssertionError  # unreachable


# --------------------------------------------------------------------------------------- NLVR2
@dataclass(frozen=True)
class PairStatement:
    """An NLVR2 statement over (left, right) scenes. kind: left | right | both | neither |
    exactly_one (use ``claim``), more_left | more_right | same_count, total (use ``number``)."""

    kind: str
    claim: Optional[Claim] = None
    number: Optional[int] = None


def statement_is_true(stmt: PairStatement, left: Union[Scene, Mapping[str, Any]],
                      right: Union[Scene, Mapping[str, Any]]) -> bool:
    left, right = _as_scene(left), _as_scene(right)
    nl, nr = len(left.objects), len(right.objects)
    if stmt.kind in ("left", "right", "both", "neither", "exactly_one"):
        tl, tr = claim_is_true(stmt.claim, left), claim_is_true(stmt.claim, right)
        return {"left": tl, "right": tr, "both": tl and tr, "neither": not tl and not tr,
                "exactly_one": tl != tr}[stmt.kind]
    if stmt.kind == "more_left":
        return nl > nr
    if stmt.kind == "more_right":
        return nr > nl
    if stmt.kind == "same_count":
        return nl == nr
    if stmt.kind == "total":
        return nl + nr == stmt.number
    raise ValueError(f"unknown statement kind {stmt.kind!r}")


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
    s = albef_clean(sentence)
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


def _statement_text(stmt: PairStatement, rng: np.random.Generator) -> str:
    k = stmt.kind
    if k in _FIXED_STATEMENTS.values():
        text = _pick(rng, [t for t, kk in _FIXED_STATEMENTS.items() if kk == k])
    elif k == "total":
        text = _pick(rng, ("there are {} shapes in total",
                           "the two images contain {} shapes in total"))
        text = text.format(NUMBER_WORDS[stmt.number])
    else:
        claim = stmt.claim
        if claim.objects:
            x = _object_text(claim.objects[0], rng)
        else:
            x = "a single shape" if claim.count == 1 else f"{NUMBER_WORDS[claim.count]} shapes"
        prefix = _pick(rng, [p for p, kk in _CLAIM_STATEMENTS if kk == k])
        text = prefix + x
    return text[0].upper() + text[1:] + "."


def _random_statement(left: Scene, right: Scene, rng: np.random.Generator,
                      cfg: ShapesConfig) -> PairStatement:
    kind = _pick(rng, ("left", "right", "both", "neither", "exactly_one", "more", "same_count",
                       "total"))
    if kind == "more":
        return PairStatement(_pick(rng, ("more_left", "more_right")))
    if kind == "same_count":
        return PairStatement("same_count")
    nl, nr = len(left.objects), len(right.objects)
    if kind == "total":
        return PairStatement("total", number=max(2, nl + nr + int(rng.integers(-1, 2))))
    if rng.random() < 0.2:
        n = _pick(rng, (nl, nr, int(rng.integers(cfg.min_objects, cfg.max_objects + 1))))
        return PairStatement(kind, claim=Claim(count=n))
    src = left if rng.random() < 0.5 else right
    o = _pick(rng, src.objects)
    if rng.random() < 0.25:
        o = SceneObject(_pick(rng, SHAPES), _pick(rng, COLOR_NAMES), _pick(rng, SIZES),
                        o.row, o.col, 0, 0, 0)
    attrs = _pick(rng, _ATTRIBUTE_VARIANTS + (("size", "color", "shape"),))
    spec = _reduced_spec(o, attrs)
    if cfg.use_positions and rng.random() < 0.15:
        row, col = _random_position(o, rng)
        spec = dataclasses.replace(spec, row=row, col=col)
    return PairStatement(kind, claim=Claim((spec,)))


def _make_nlvr2(scenes: Sequence[Tuple[str, Scene]], n_pairs: int, rng: np.random.Generator,
                cfg: ShapesConfig) -> List[Dict[str, Any]]:
    if n_pairs == 0 or len(scenes) < 2:
        return []
    targets = np.array([True] * (n_pairs // 2) + [False] * (n_pairs - n_pairs // 2))
    targets = targets[rng.permutation(n_pairs)]
    out = []
    for target in targets:
        for attempt in range(400):
            if attempt % 20 == 0:
                i, j = (int(v) for v in rng.choice(len(scenes), size=2, replace=False))
                (lp, ls), (rp, rs) = scenes[i], scenes[j]
            stmt = _random_statement(ls, rs, rng, cfg)
            if statement_is_true(stmt, ls, rs) == bool(target):
                break
        else:  # pragma: no cover - "more"/"same" statements always give both labels
            raise RuntimeError("could not draw an NLVR2 statement with the wanted label")
        out.append({"images": [lp, rp], "sentence": _statement_text(stmt, rng),
                    "label": "True" if target else "False"})
    return out


# ------------------------------------------------------------------------------- the world
class ShapesWorld:
    """The truth oracle over a set of scenes (usually a generated world's scenes.json).

    ``is_true(caption, image)`` evaluates with the reference Python code; ``truth_matrix`` is the
    vectorised version (claims evaluated once over all images and cached as boolean rows)."""

    def __init__(self, scenes: Mapping[str, Union[Scene, Mapping[str, Any]]],
                 root: Optional[str] = None, captions: Optional[Mapping[str, List[str]]] = None,
                 caption_kinds: Optional[Mapping[str, List[str]]] = None):
        self.root = root
        self.paths: List[str] = list(scenes)
        self.scenes: Dict[str, Scene] = {p: _as_scene(s) for p, s in scenes.items()}
        self.index: Dict[str, int] = {p: i for i, p in enumerate(self.paths)}
        self.id_index: Dict[int, int] = {self.scenes[p].image_id: i
                                         for i, p in enumerate(self.paths)}
        self.captions: Dict[str, List[str]] = dict(captions or {})
        self.caption_kinds: Dict[str, List[str]] = dict(caption_kinds or {})
        self._build_arrays()
        self._rows: Dict[Claim, np.ndarray] = {}
        self._text_rows: Dict[str, np.ndarray] = {}

    @classmethod
    def load(cls, root: Union[str, os.PathLike]) -> "ShapesWorld":
        root = os.fspath(root)
        path = os.path.join(root, "scenes.json")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: generate the shapes world with "
                f"`python -m datasets.shapes --out {root}`")
        with open(path, "r", encoding="utf-8") as fh:
            raw = json.load(fh)
        return cls(raw, root=root,
                   captions={p: s.get("captions", []) for p, s in raw.items()},
                   caption_kinds={p: s.get("caption_kinds", []) for p, s in raw.items()})

    def __len__(self) -> int:
        return len(self.paths)

    def images(self, split: Optional[str] = None) -> List[str]:
        return [p for p in self.paths if split is None or self.scenes[p].split == split]

    def _build_arrays(self) -> None:
        n = len(self.paths)
        m = max([len(self.scenes[p].objects) for p in self.paths] + [1])
        self._m = m
        self._n_obj = np.zeros(n, np.int16)
        self._bg = np.zeros(n, np.int8)
        attrs = {"shape": SHAPES, "color": COLOR_NAMES, "size": SIZES, "row": ROWS, "col": COLS}
        self._codes = {a: {v: i for i, v in enumerate(vals)} for a, vals in attrs.items()}
        self._attr = {a: np.full((n, m), -1, np.int8) for a in attrs}
        for i, p in enumerate(self.paths):
            sc = self.scenes[p]
            self._n_obj[i] = len(sc.objects)
            self._bg[i] = BACKGROUNDS.index(sc.background)
            for j, o in enumerate(sc.objects):
                for a in attrs:
                    self._attr[a][i, j] = self._codes[a][getattr(o, a)]
        valid = self._attr["shape"] >= 0
        self._valid = valid
        r, c = self._attr["row"].astype(np.int16), self._attr["col"].astype(np.int16)
        pv = valid[:, :, None] & valid[:, None, :]
        dr = r[:, :, None] - r[:, None, :]
        dc = c[:, :, None] - c[:, None, :]
        self._rel = {
            "left of": pv & (dc < 0), "right of": pv & (dc > 0),
            "above": pv & (dr < 0), "below": pv & (dr > 0),
            "next to": pv & (np.abs(dr) + np.abs(dc) == 1),
        }

    def _match(self, spec: ObjectSpec) -> np.ndarray:
        m = self._valid.copy()
        for a in ("shape", "color", "size", "row", "col"):
            v = getattr(spec, a)
            if v is not None:
                code = self._codes[a].get(v)
                if code is None:
                    return np.zeros_like(m)
                m &= self._attr[a] == code
        return m

    def claim_row(self, claim: Claim) -> np.ndarray:
        """Boolean vector over all images (in ``self.paths`` order): is the claim true?"""
        row = self._rows.get(claim)
        if row is not None:
            return row
        ok = np.ones(len(self.paths), bool)
        if claim.count is not None:
            ok &= self._n_obj == claim.count
        if claim.background == "textured":
            ok &= self._bg != BACKGROUNDS.index("plain")
        elif claim.background is not None:
            ok &= self._bg == BACKGROUNDS.index(claim.background)
        k = len(claim.objects)
        if k > self._m:
            ok[:] = False
        elif k == 1 and not claim.relations:
            ok &= self._match(claim.objects[0]).any(axis=1)
        elif k:
            masks = [self._match(s) for s in claim.objects]
            hit = np.zeros(len(self.paths), bool)
            for perm in itertools.permutations(range(self._m), k):
                cur = masks[0][:, perm[0]].copy()
                for s in range(1, k):
                    cur &= masks[s][:, perm[s]]
                for r in claim.relations:
                    cur &= self._rel[r.kind][:, perm[r.a], perm[r.b]]
                hit |= cur
            ok &= hit
        ok.setflags(write=False)
        if len(self._rows) > 200_000:
            self._rows.clear()
            self._text_rows.clear()
        self._rows[claim] = ok
        return ok

    def caption_row(self, caption: str) -> np.ndarray:
        row = self._text_rows.get(caption)
        if row is None:
            row = self.claim_row(parse_caption(caption))
            self._text_rows[caption] = row
        return row

    def _image_index(self, image: Union[str, int, os.PathLike]) -> int:
        if isinstance(image, (int, np.integer)):
            return self.id_index[int(image)]
        key = os.fspath(image)
        i = self.index.get(key)
        if i is None:
            norm = key
            if self.root is not None and os.path.isabs(key):
                norm = os.path.relpath(key, self.root)
            norm = norm.replace(os.sep, "/")
            i = self.index.get(norm)
            if i is None:
                raise KeyError(f"image {key!r} is not in this shapes world")
        return i

    def scene(self, image: Union[str, int]) -> Scene:
        return self.scenes[self.paths[self._image_index(image)]]

    def is_true(self, caption: str, image: Union[str, int]) -> bool:
        """Is ``caption`` true of ``image`` (relative path as in the annotations, or image id)?"""
        return claim_is_true(parse_caption(caption), self.scene(image))

    def truth_matrix(self, captions: Sequence[str],
                     images: Sequence[Union[str, int]]) -> np.ndarray:
        """bool array [len(captions), len(images)]; entry (i, j) is
        ``is_true(captions[i], images[j])``. Images are relative paths or integer image ids."""
        cols = np.fromiter((self._image_index(im) for im in images), dtype=np.int64,
                           count=len(images))
        if not len(captions):
            return np.zeros((0, len(cols)), bool)
        rows = np.stack([self.caption_row(c) for c in captions])
        return rows[:, cols]

    def answer(self, question: str, image: Union[str, int]) -> str:
        return answer_question(question, self.scene(image))

    def nlvr2_is_true(self, sentence: str, left: Union[str, int], right: Union[str, int]) -> bool:
        return statement_is_true(parse_statement(sentence), self.scene(left), self.scene(right))


# ------------------------------------------------------------------------------- generation
ANNOTATION_FILES = (
    "scenes.json", "pretrain.json", "retrieval_train.json", "retrieval_val.json",
    "retrieval_test.json", "vqa_train.json", "vqa_val.json", "vqa_test.json", "vqa_test_gt.json",
    "answer_list.json", "nlvr2_train.json", "nlvr2_dev.json", "nlvr2_test.json",
    "caption_train.json", "caption_val.json", "caption_test.json", "caption_val_gt.json",
    "caption_test_gt.json",
)


def _write_bytes(path: str, data: bytes) -> Dict[str, Any]:
    """Write ``data`` to ``path`` (a temporary file, then rename); its entry of the written record."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_json(path: str, obj: Any, indent: Optional[int] = None) -> Dict[str, Any]:
    text = json.dumps(obj, indent=indent, ensure_ascii=True) + "\n"
    return _write_bytes(path, text.encode("utf-8"))


def _file_entry(path: str) -> Dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def read_written(out_dir: Union[str, os.PathLike]) -> Dict[str, Dict[str, Any]]:
    """The record of the files the generator wrote into ``out_dir`` (relative path -> entry: size and
    sha256, or ``pending`` while a generation that was about to write it has not finished).

    A folder generated before this record existed: the files its manifest names, untested."""
    out_dir = os.fspath(out_dir)
    try:
        with open(os.path.join(out_dir, WRITTEN_RECORD), "r", encoding="utf-8") as fh:
            rec = json.load(fh)
        if isinstance(rec, dict) and isinstance(rec.get("files"), dict):
            return dict(rec["files"])
    except (OSError, ValueError):
        pass
    man = read_manifest(out_dir)
    if not isinstance(man, dict) or man.get("generator") != "datasets.shapes":
        return {}
    legacy = {name: {"legacy": True} for name in man.get("files", {})}
    legacy["manifest.json"] = {"legacy": True}
    try:
        cfg = ShapesConfig.from_dict(man.get("config", {}))
    except (TypeError, ValueError):
        return legacy
    for split, iid in _all_image_paths(cfg):
        legacy[image_path(split, iid, cfg.image_format)] = {"legacy": True}
    return legacy


def _save_written(out_dir: str, files: Dict[str, Dict[str, Any]]) -> None:
    _write_json(os.path.join(out_dir, WRITTEN_RECORD),
                {"generator": "datasets.shapes", "version": GENERATOR_VERSION,
                 "files": dict(sorted(files.items()))}, indent=0)


def _ours(out_dir: str, rel: str, written: Dict[str, Dict[str, Any]]) -> bool:
    """Whether the existing file ``rel`` is one the generator wrote and nobody changed since."""
    entry = written.get(rel)
    if entry is None:
        return False
    if entry.get("pending") or entry.get("legacy"):
        return True
    path = os.path.join(out_dir, rel)
    return os.path.getsize(path) == entry.get("size") and _file_entry(path)["sha256"] == entry.get("sha256")


def _check_not_foreign(out_dir: str, targets: Sequence[str], written: Dict[str, Dict[str, Any]]) -> None:
    """``FileExistsError`` naming the first of ``targets`` that exists but is not the generator's own."""
    for rel in targets:
        path = os.path.join(out_dir, rel)
        if os.path.lexists(path) and not (os.path.isfile(path) and _ours(out_dir, rel, written)):
            raise FileExistsError(
                f"refusing to write the shapes world over {path}: the shapes generator did not write this file "
                f"(or it was changed since; see {os.path.join(out_dir, WRITTEN_RECORD)}); move it away or "
                "generate the world into another folder")


def read_manifest(out_dir: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    path = os.path.join(os.fspath(out_dir), "manifest.json")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _all_image_paths(cfg: ShapesConfig) -> List[Tuple[str, int]]:
    out, next_id = [], 0
    for split, n in cfg.split_sizes().items():
        for _ in range(n):
            out.append((split, next_id))
            next_id += 1
    return out


def is_complete(out_dir: Union[str, os.PathLike], cfg: ShapesConfig) -> Optional[Dict[str, Any]]:
    """The manifest if ``out_dir`` holds a complete world generated for ``cfg``, else None."""
    out_dir = os.fspath(out_dir)
    man = read_manifest(out_dir)
    if not man or man.get("version") != GENERATOR_VERSION or man.get("config") != cfg.to_json():
        return None
    if not all(os.path.exists(os.path.join(out_dir, f)) for f in man.get("files", {})):
        return None
    for split, iid in _all_image_paths(cfg):
        if not os.path.exists(os.path.join(out_dir, image_path(split, iid, cfg.image_format))):
            return None
    return man


@contextlib.contextmanager
def _locked(out_dir: str):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(os.path.join(out_dir, ".shapes.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _render_job(job: Tuple[str, Dict[str, Any], int, str]) -> None:
    path, scene, size, fmt = job
    img = render_scene(scene, size)
    tmp = path + ".tmp"
    if fmt == "png":
        img.save(tmp, format="PNG")
    else:
        img.save(tmp, format="JPEG", quality=95)
    os.replace(tmp, path)


def _rng(cfg: ShapesConfig, stream: int, sub: int = 0) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, stream, sub])


def _false_negative_stats(world: ShapesWorld, samples: List[Tuple[str, str, str]],
                          rng: np.random.Generator, max_samples: int = 1000) -> Dict[str, Any]:
    """For a sample of train captions: the fraction of the *other* train images each is true of."""
    train = world.images("train")
    n_other = len(train) - 1
    result: Dict[str, Any] = {
        "definition": "for each sampled train caption, the fraction of the other train images "
                      "that the caption is also true of (false negatives for contrastive "
                      "learning); p_in_batch_64 = mean of 1-(1-f)^63",
        "train_images": len(train),
    }
    if n_other < 1 or not samples:
        result.update(sample_size=0, mean_fraction=0.0, per_kind={})
        return result
    idx = np.arange(len(samples))
    if len(samples) > max_samples:
        idx = np.sort(rng.choice(len(samples), size=max_samples, replace=False))
    cols = np.array([world.index[p] for p in train])
    per_kind: Dict[str, List[float]] = {}
    fracs = []
    for i in idx:
        text, kind, img = samples[int(i)]
        row = world.caption_row(text)
        own = bool(row[world.index[img]])
        if not own:
            raise AssertionError(f"caption {text!r} is not true of its own image {img}")
        f = (int(row[cols].sum()) - 1) / n_other
        per_kind.setdefault(kind, []).append(f)
        fracs.append(f)
    batch = min(63, n_other)

    def summary(v: List[float]) -> Dict[str, Any]:
        a = np.asarray(v)
        return {"captions": int(a.size), "mean_fraction": round(float(a.mean()), 6),
                "with_any": round(float((a > 0).mean()), 6),
                "p_in_batch_64": round(float((1 - (1 - a) ** batch).mean()), 6)}

    result["sample_size"] = int(len(idx))
    result.update({k: v for k, v in summary(fracs).items() if k != "captions"})
    result["per_kind"] = {k: summary(per_kind[k]) for k in CAPTION_KINDS if k in per_kind}
    return result


def _generate(out_dir: str, cfg: ShapesConfig, workers: int,
              progress: Optional[bool]) -> Dict[str, Any]:
    fmt = cfg.image_format
    man_path = os.path.join(out_dir, "manifest.json")
    # 1. scenes (one stream per split: val/test do not change with the number of train images)
    scenes: Dict[str, Scene] = {}
    by_split: Dict[str, List[Tuple[str, Scene]]] = {s: [] for s in SPLITS}
    next_id = 0
    for k, split in enumerate(SPLITS):
        rng = _rng(cfg, 1, k)
        for _ in range(cfg.split_sizes()[split]):
            sc = sample_scene(rng, cfg, next_id, split)
            p = image_path(split, next_id, fmt)
            scenes[p] = sc
            by_split[split].append((p, sc))
            next_id += 1
    # 2. captions
    rng = _rng(cfg, 2)
    captions: Dict[str, List[CaptionSample]] = {p: make_captions(sc, cfg, rng)
                                                for p, sc in scenes.items()}
    # the files this generation writes: refused before anything is touched when one of them exists
    # and is not the generator's own; then all are recorded as about to be written, so that an
    # interrupted generation can be redone
    written = read_written(out_dir)
    targets = ["manifest.json", *ANNOTATION_FILES, *scenes]
    _check_not_foreign(out_dir, targets, written)
    stale = [rel for rel in written if rel not in scenes and re.fullmatch(r"images/(train|val|test)/\d{6}\.(png|jpg)", rel)
             and os.path.isfile(os.path.join(out_dir, rel)) and _ours(out_dir, rel, written)]
    written.update({rel: {"pending": True} for rel in targets})
    _save_written(out_dir, written)
    if os.path.exists(man_path):
        os.remove(man_path)  # an interrupted regeneration must not look complete
    # 3. images
    for rel in stale:  # the generator's images of an earlier, different config
        os.remove(os.path.join(out_dir, rel))
        del written[rel]
    for split in SPLITS:
        d = os.path.join(out_dir, "images", split)
        os.makedirs(d, exist_ok=True)
        for name in os.listdir(d):  # temporary files of an interrupted generation
            if re.fullmatch(r"\d{6}\.(png|jpg)\.tmp", name):
                os.remove(os.path.join(d, name))
    jobs = [(os.path.join(out_dir, p), sc.to_dict(), cfg.image_size, fmt)
            for p, sc in scenes.items()]
    show = progress if progress is not None else (len(jobs) >= 5000)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in requirements.txt
        show = False

        class tqdm:  # type: ignore[no-redef]
            def __init__(self, *a, **k): pass
            def update(self, n=1): pass
            def close(self): pass
    bar = tqdm(total=len(jobs), desc="shapes: rendering", unit="img", disable=not show,
               file=sys.stderr)
    if workers > 1 and len(jobs) >= 200:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_job, jobs, chunksize=64):
                bar.update(1)
    else:
        for job in jobs:
            _render_job(job)
            bar.update(1)
    bar.close()
    for rel in scenes:
        written[rel] = _file_entry(os.path.join(out_dir, rel))

    files: Dict[str, Any] = {}

    def write(name: str, obj: Any, indent: Optional[int] = None) -> None:
        written[name] = _write_json(os.path.join(out_dir, name), obj, indent)
        files[name] = len(obj)

    # 4. scenes.json
    scene_json = {}
    for p, sc in scenes.items():
        d = sc.to_dict()
        d["captions"] = [c.text for c in captions[p]]
        d["caption_kinds"] = [c.kind for c in captions[p]]
        scene_json[p] = d
    write("scenes.json", scene_json)
    # 5. pre-training, retrieval, captioning
    train = by_split["train"]
    write("pretrain.json",
          [{"image": p, "caption": [c.text for c in captions[p]]} for p, _ in train])
    per_caption_train = [{"image": p, "caption": c.text, "image_id": sc.image_id}
                         for p, sc in train for c in captions[p]]
    write("retrieval_train.json", per_caption_train)
    write("caption_train.json", [dict(r) for r in per_caption_train])
    for split in ("val", "test"):
        recs = by_split[split]
        write(f"retrieval_{split}.json",
              [{"image": p, "caption": [c.text for c in captions[p]]} for p, _ in recs])
        write(f"caption_{split}.json",
              [{"image": p, "caption": [c.text for c in captions[p]], "image_id": sc.image_id}
               for p, sc in recs])
        anns, ann_id = [], 0
        for p, sc in recs:
            for c in captions[p]:
                anns.append({"image_id": sc.image_id, "caption": c.text, "id": ann_id})
                ann_id += 1
        gt = {"images": [{"id": sc.image_id} for _, sc in recs], "annotations": anns,
              "info": {"description": "shapes world captions, " + split},
              "licenses": [], "type": "captions"}
        written[f"caption_{split}_gt.json"] = _write_json(os.path.join(out_dir, f"caption_{split}_gt.json"), gt)
        files[f"caption_{split}_gt.json"] = len(anns)
    # 6. VQA
    qid = 0
    vqa: Dict[str, List[Dict[str, Any]]] = {}
    for k, split in enumerate(SPLITS):
        rng = _rng(cfg, 3, k)
        recs = []
        for p, sc in by_split[split]:
            for q, ans, atype in make_questions(sc, cfg, rng):
                recs.append({"question_id": qid, "question": q,
                             "answer": _annotate(ans, atype, rng, cfg), "image": p,
                             "dataset": "vqa", "answer_type": atype})
                qid += 1
        vqa[split] = recs
    write("vqa_train.json", vqa["train"])
    write("vqa_val.json", vqa["val"])
    write("vqa_test.json", [{k: v for k, v in r.items() if k != "answer"} for r in vqa["test"]])
    write("vqa_test_gt.json", vqa["test"])
    freq: Dict[str, int] = {}
    for split in SPLITS:
        for r in vqa[split]:
            for a in r["answer"]:
                freq[a] = freq.get(a, 0) + (1 if split == "train" else 0)
    vocab = (["yes", "no"] + [str(i) for i in range(cfg.max_objects + 1)] + list(COLOR_NAMES)
             + list(SHAPES) + list(SIZES))
    for a in vocab:
        freq.setdefault(a, 0)
    write("answer_list.json", sorted(freq, key=lambda a: (-freq[a], a)))
    # 7. NLVR2
    for k, split in enumerate(SPLITS):
        rng = _rng(cfg, 4, k)
        write(f"nlvr2_{NLVR2_SPLIT_NAMES[split]}.json",
              _make_nlvr2(by_split[split], cfg.nlvr2_pairs[k], rng, cfg))
    # 8. statistics and manifest (last)
    world = ShapesWorld(scenes)
    samples = [(c.text, c.kind, p) for p, _ in train for c in captions[p]]
    n_caps = sum(len(v) for v in captions.values())
    kinds: Dict[str, int] = {}
    for v in captions.values():
        for c in v:
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
    fn = _false_negative_stats(world, samples, _rng(cfg, 5))
    fn["caption_kinds"] = {k: kinds[k] for k in CAPTION_KINDS if k in kinds}
    fn["partial_fraction"] = round(1 - kinds.get("full", 0) / max(1, n_caps), 6)
    manifest = {
        "generator": "datasets.shapes",
        "version": GENERATOR_VERSION,
        "config": cfg.to_json(),
        "image_root": ".",
        "images": {s: len(by_split[s]) for s in SPLITS},
        "files": files,
        "vocabulary": {"shapes": list(SHAPES), "colors": list(COLOR_NAMES), "sizes": list(SIZES),
                       "rows": list(ROWS), "cols": list(COLS), "backgrounds": list(BACKGROUNDS)},
        "false_negatives": fn,
        "complete": True,
    }
    written["manifest.json"] = _write_json(man_path, manifest, indent=2)
    _save_written(out_dir, written)
    return manifest


def ensure_shapes(out_dir: Union[str, os.PathLike], cfg: Optional[ShapesConfig] = None, *,
                  force: bool = False, workers: int = 1,
                  progress: Optional[bool] = None) -> Tuple[Dict[str, Any], bool]:
    """Generate the world into ``out_dir`` unless a complete one for ``cfg`` is there.

    Returns (manifest, created). Safe against concurrent callers (a file lock serialises them).
    Never writes over a file the generator did not write (or that changed since it wrote it):
    ``FileExistsError`` names the file (see :data:`WRITTEN_RECORD`)."""
    cfg = cfg or ShapesConfig()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with _locked(out_dir):
        if not force:
            man = is_complete(out_dir, cfg)
            if man is not None:
                return man, False
        return _generate(out_dir, cfg, max(1, int(workers)), progress), True


def generate_shapes(out_dir: Union[str, os.PathLike], cfg: Optional[ShapesConfig] = None, *,
                    force: bool = False, workers: int = 1,
                    progress: Optional[bool] = None) -> Dict[str, Any]:
    """Write the shapes world to ``out_dir`` and return its manifest (skips an up-to-date one)."""
    return ensure_shapes(out_dir, cfg, force=force, workers=workers, progress=progress)[0]


# ------------------------------------------------------------------------------------- CLI
def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m datasets.shapes",
        description="Generate the synthetic shapes world (images + ALBEF/BLIP-format JSONs).")
    p.add_argument("--out", default=DEFAULT_ROOT, help="output folder = image_root")
    defaults = ShapesConfig()
    for f in dataclasses.fields(ShapesConfig):
        if f.name == "root":  # --out
            continue
        opt = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(opt, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default: {default})")
        elif isinstance(default, tuple):
            p.add_argument(opt, dest=f.name, type=int, nargs=len(default), default=None,
                           metavar=("TRAIN", "DEV", "TEST"),
                           help=f"(default: {' '.join(map(str, default))})")
        else:
            p.add_argument(opt, dest=f.name, type=type(default), default=None,
                           help=f"(default: {default})")
    p.add_argument("--force", action="store_true", help="regenerate even if up to date")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes rendering images (output does not depend on it)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only for 5000 images or more)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ShapesConfig)
                 if f.name != "root" and getattr(args, f.name) is not None}
    try:
        cfg = ShapesConfig(**overrides, root=args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        manifest, created = ensure_shapes(args.out, cfg, force=args.force, workers=args.workers,
                                          progress=args.progress)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    if not created:
        print(f"{args.out}: up to date (same config, generator {GENERATOR_VERSION}); "
              f"nothing written ({dt:.2f} s). Use --force to regenerate.")
        return 0
    imgs = manifest["images"]
    print(f"wrote the shapes world to {args.out} in {dt:.1f} s "
          f"(seed {cfg.seed}, {cfg.image_size}px {cfg.image_format})")
    print(f"  images: " + ", ".join(f"{s} {n}" for s, n in imgs.items())
          + f" under {os.path.join(args.out, 'images')}")
    for name, n in manifest["files"].items():
        print(f"  {name:<22} {n} records")
    print("  manifest.json")
    fn = manifest["false_negatives"]
    print(f"  false negatives (fraction of other train images a caption is true of; "
          f"{fn['sample_size']} captions): mean {fn['mean_fraction']:.4f}")
    for kind, s in fn["per_kind"].items():
        print(f"    {kind:<10} n={s['captions']:<5} mean {s['mean_fraction']:.4f}  "
              f"any {s['with_any']:.3f}  P(>=1 in a batch of 64) {s['p_in_batch_64']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
