"""Visual entailment (SNLI-VE) on the shapes world: an image with one grid cell covered, and
statements about one cell that the image entails, leaves open, or contradicts.

Why a cover. "Neutral" must mean that the image cannot decide the statement. Every object of a
shapes scene is in plain view, so the generator hides one grid cell under an opaque dark square
(:func:`render_covered`; every object lies inside its own cell, so the cover hides its cell's
object, if any, entirely and nothing else). What is under it is part of the scene's truth, not of
the image: a statement about the covered cell is neutral whether or not it is true of the scene.

The statements (:class:`CellStatement`) name one cell ("at the top left", "in the center"):

* ``object`` claims: "There is a red circle at the top left." with the object described by one of
  the attribute sets of :data:`VARIANTS` (shape and colour, size and shape, colour, shape, all three,
  or none: "a shape");
* ``empty`` claims: "There is nothing at the bottom right."

Their label (:func:`statement_label`, the oracle): about the covered cell, **neutral**; about a
visible cell, **entailment** when the cell's content makes it true, else **contradiction**.

Why the text alone cannot tell the label. Every image gets three statements, one of each label, so
the image alone is at chance too. For each statement the variant (which attributes, or "empty") is
drawn first, independently of the label; then, given the variant and the label, the cell and the
attribute values are drawn uniformly among those with that label on this image (entailment: a visible
object, its cell and its attributes; contradiction: a visible cell and values drawn from the prior
until the statement is false; neutral: the covered cell and values from the prior). The scene
distribution is symmetric under permuting cells, shapes, colours and sizes, and the cover cell is
uniform, so within a variant every statement text is equally likely under each label: the same
statement occurs as entailment, neutral and contradiction, and a text-only classifier, even one that
memorises every text, is at chance (``tests/test_snli_ve.py`` measures it). The cover never hides a
scene's only object, so every image has a visible object to state.

Worlds with ``use_positions=False`` have no SNLI-VE files: these statements must name a cell.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from shapesworld.grammar import ObjectSpec, Parser, clean, object_text, parse_caption
from shapesworld.grammar import _position_text as position_text
from shapesworld.scene import COLOR_NAMES, COLS, ROWS, SHAPES, SIZES, Scene, as_scene, pick, render_scene

__all__ = ["LABELS", "VARIANTS", "COVER_COLOR", "CellStatement", "choose_cover", "statement_label",
           "statement_text", "parse_entailment", "make_statement", "make_entailment", "cell_box", "render_covered"]

LABELS: Tuple[str, ...] = ("entailment", "neutral", "contradiction")
# what an object claim says about the object (attribute names), or "empty": nothing in the cell
VARIANTS: Tuple[Union[Tuple[str, ...], str], ...] = (
    ("shape", "color"), ("size", "shape"), ("color",), ("shape",), ("size", "color", "shape"), (), "empty")
COVER_COLOR: Tuple[int, int, int] = (24, 24, 24)  # darker than every background, stripe and speckle
_OBJECT_TEMPLATES = ("there is {}", "there is {} in the picture")
_EMPTY_TEMPLATES = ("there is nothing {}", "there is no shape {}")
_PRIOR = {"shape": SHAPES, "color": COLOR_NAMES, "size": SIZES}

Cell = Tuple[int, int]  # (row index, column index)


@dataclass(frozen=True)
class CellStatement:
    """A statement about one grid cell: ``kind`` "object" (``spec`` names the object, its row and
    column) or "empty" (``spec`` has only the row and column)."""

    kind: str
    spec: ObjectSpec

    @property
    def cell(self) -> Cell:
        return ROWS.index(self.spec.row), COLS.index(self.spec.col)


def _in_cell(scene: Scene, cell: Cell) -> list:
    return [o for o in scene.objects if o.cell == cell]


def choose_cover(scene: Union[Scene, Dict[str, Any]], rng: np.random.Generator) -> Cell:
    """The covered cell: uniform over the nine, but never the cell of a scene's only object."""
    scene = as_scene(scene)
    cells = [(r, c) for r in range(3) for c in range(3)]
    if len(scene.objects) == 1:
        cells.remove(scene.objects[0].cell)
    return cells[int(rng.integers(len(cells)))]


def statement_label(stmt: CellStatement, scene: Union[Scene, Dict[str, Any]], cover: Cell) -> str:
    """The oracle: neutral about the covered cell, else entailment iff the cell's content makes the
    statement true."""
    if tuple(stmt.cell) == tuple(cover):
        return "neutral"
    objs = _in_cell(as_scene(scene), stmt.cell)
    true = not objs if stmt.kind == "empty" else any(stmt.spec.matches(o) for o in objs)
    return "entailment" if true else "contradiction"


def statement_text(stmt: CellStatement, rng: np.random.Generator) -> str:
    """The sentence of a statement (a random template; :func:`parse_entailment` reads it back)."""
    if stmt.kind == "empty":
        text = pick(rng, _EMPTY_TEMPLATES).format(position_text(stmt.spec.row, stmt.spec.col, rng))
    else:
        text = pick(rng, _OBJECT_TEMPLATES).format(object_text(stmt.spec, rng))
    return text[0].upper() + text[1:] + "."


@functools.lru_cache(maxsize=100_000)
def parse_entailment(sentence: str) -> CellStatement:
    """Read a generated SNLI-VE statement back (raw or ALBEF-cleaned); ValueError names the text."""
    s = clean(sentence)
    for template in _EMPTY_TEMPLATES:
        prefix = template.format("").strip() + " "
        if s.startswith(prefix):
            p = Parser(s[len(prefix):], "shapes SNLI-VE statement")
            row, col = p.position()
            p.expect_end()
            if row is None or col is None:
                break
            return CellStatement("empty", ObjectSpec(row=row, col=col))
    try:
        claim = parse_caption(s)
    except ValueError:
        claim = None
    if (claim is not None and s.startswith("there is ") and len(claim.objects) == 1 and not claim.relations
            and claim.count is None and claim.background is None
            and claim.objects[0].row is not None and claim.objects[0].col is not None):
        return CellStatement("object", claim.objects[0])
    raise ValueError(f"cannot parse shapes SNLI-VE statement {sentence!r}")


def _spec(values: Dict[str, str], cell: Cell) -> ObjectSpec:
    return ObjectSpec(**values, row=ROWS[cell[0]], col=COLS[cell[1]])


def make_statement(scene: Union[Scene, Dict[str, Any]], cover: Cell, label: str, variant, rng: np.random.Generator,
                   max_tries: int = 1000) -> CellStatement:
    """A statement of ``variant`` whose label on the covered image is ``label``, drawn uniformly among
    those (see the module docstring)."""
    scene = as_scene(scene)
    cells = [(r, c) for r in range(3) for c in range(3)]
    visible = [c for c in cells if c != tuple(cover)]
    kind = "empty" if variant == "empty" else "object"
    if label == "neutral":
        cell = tuple(cover)
        values = {} if kind == "empty" else {a: pick(rng, _PRIOR[a]) for a in variant}
        return CellStatement(kind, _spec(values, cell))
    if label == "entailment" and kind == "object":
        o = pick(rng, [o for o in scene.objects if o.cell != tuple(cover)])
        return CellStatement(kind, _spec({a: getattr(o, a) for a in variant}, o.cell))
    for _ in range(max_tries):  # the rest: uniform over the visible cells (and the prior's values) with the label
        cell = pick(rng, visible)
        values = {} if kind == "empty" else {a: pick(rng, _PRIOR[a]) for a in variant}
        stmt = CellStatement(kind, _spec(values, cell))
        if statement_label(stmt, scene, cover) == label:
            return stmt
    raise RuntimeError(f"no {label} statement of variant {variant!r} found for scene {scene.image_id}")  # pragma: no cover


def make_entailment(scenes: Sequence[Tuple[str, Scene]], rng: np.random.Generator,
                    image_path_of) -> Tuple[List[Dict[str, Any]], Dict[str, Tuple[Cell, Scene]]]:
    """The SNLI-VE records of one split: for every (path, scene), its covered image
    (``image_path_of(scene)``) and three statements, one per label, in random order; and every
    covered image's cover and scene."""
    records, covers = [], {}
    for _, scene in scenes:
        cover = choose_cover(scene, rng)
        path = image_path_of(scene)
        covers[path] = (cover, scene)
        for label in [LABELS[int(i)] for i in rng.permutation(len(LABELS))]:
            variant = VARIANTS[int(rng.integers(len(VARIANTS)))]
            stmt = make_statement(scene, cover, label, variant, rng)
            records.append({"image": path, "sentence": statement_text(stmt, rng), "label": label,
                            "covered": f"{ROWS[cover[0]]} {COLS[cover[1]]}", "kind": stmt.kind})
    return records, covers


def cell_box(cell: Cell, image_size: int) -> Tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1; inclusive) of a grid cell in an image of ``image_size``."""
    step = image_size / 3.0
    r, c = cell
    return (int(np.floor(c * step)), int(np.floor(r * step)),
            int(np.ceil((c + 1) * step)) - 1, int(np.ceil((r + 1) * step)) - 1)


def render_covered(scene: Union[Scene, Dict[str, Any]], cover: Cell, image_size: int) -> Image.Image:
    """The scene rendered (:func:`shapesworld.scene.render_scene`) with its ``cover`` cell painted over."""
    img = render_scene(scene, image_size)
    ImageDraw.Draw(img).rectangle(cell_box(cover, image_size), fill=COVER_COLOR)
    return img
