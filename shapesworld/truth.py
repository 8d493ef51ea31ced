"""The truth oracle: for any caption, VQA question or NLVR2 statement and any image of a world,
whether it is true (the answer), by parsing the text into its claim and evaluating the claim on the
scene. :class:`ShapesWorld` loads a generated world (``scenes.json``) and evaluates captions
against all its images at once (:meth:`ShapesWorld.truth_matrix`).

Semantics of the claims:
  * objects are existential and distinct: each described object must be matched by a different
    object of the scene ("a red circle and a blue square" is also true of a scene that has a
    green star besides);
  * a count ("two shapes") is the exact number of objects in the scene;
  * positions are grid cells: rows top/center/bottom, columns left/middle/right; "at the top"
    constrains the row only, "on the left" the column only, "in the center" is the middle cell;
  * relations compare grid cells: "to the left of" / "to the right of" compare columns, "above" /
    "below" compare rows, "next to" means cells that share an edge;
  * background: plain, striped or speckled; "textured" means striped or speckled.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from shapesworld.grammar import PLURAL_NOUNS, Claim, ObjectSpec, Parser, parse_caption
from shapesworld.scene import BACKGROUNDS, COLOR_NAMES, COLORS, COLS, ROWS, SHAPES, SIZES, Scene, SceneObject, as_scene
from shapesworld.statements import PairStatement, parse_statement


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
    scene = as_scene(scene)
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



def answer_question(question: str, scene: Union[Scene, Mapping[str, Any]]) -> str:
    """The true answer to a generated VQA question (parsed from its text, evaluated on the scene).

    Raises ValueError for questions it cannot parse or whose object is not unique."""
    scene = as_scene(scene)
    p = Parser(question, "shapes question")
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
        if noun not in PLURAL_NOUNS:
            p.fail()
        p.i += 1
        spec = ObjectSpec(shape=PLURAL_NOUNS[noun], color=color, size=size)
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


def statement_is_true(stmt: PairStatement, left: Union[Scene, Mapping[str, Any]],
                      right: Union[Scene, Mapping[str, Any]]) -> bool:
    """Is the NLVR2 statement true of the (left, right) pair of scenes?"""
    left, right = as_scene(left), as_scene(right)
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


class ShapesWorld:
    """The truth oracle over a set of scenes (usually a generated world's scenes.json).

    ``is_true(caption, image)`` evaluates with the reference Python code; ``truth_matrix`` is the
    vectorised version (claims evaluated once over all images and cached as boolean rows)."""

    def __init__(self, scenes: Mapping[str, Union[Scene, Mapping[str, Any]]],
                 root: Optional[str] = None, captions: Optional[Mapping[str, List[str]]] = None,
                 caption_kinds: Optional[Mapping[str, List[str]]] = None):
        self.root = root
        self.paths: List[str] = list(scenes)
        self.scenes: Dict[str, Scene] = {p: as_scene(s) for p, s in scenes.items()}
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
                f"`python -m shapesworld --out {root}`")
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
