"""Scenes: a few coloured shapes on a 3x3 grid over a plain or textured background; drawing them
(:func:`sample_scene`) and rendering them with PIL (:func:`render_scene`, a pure function of the
scene and the image size)."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from shapesworld.config import ShapesConfig

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
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
BACKGROUND_COLORS: Tuple[Tuple[int, int, int], ...] = (
    (200, 200, 200), (222, 214, 192), (184, 194, 206), (112, 112, 112), (196, 208, 188),
)
SPLITS: Tuple[str, ...] = ("train", "val", "test")

_SIZE_FRACTION = {"small": 0.24, "large": 0.40}  # radius as a fraction of a grid cell


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

    @property
    def box(self) -> Tuple[int, int, int, int]:
        """The object's box in pixels of the written image, ``(x0, y0, x1, y1)`` with ``x1``, ``y1``
        exclusive: the bounding box of the pixels :func:`render_scene` paints for it (drawn alone)."""
        canvas = Image.new("L", (self.x + self.radius + 2, self.y + self.radius + 2), 0)
        _draw_shape(ImageDraw.Draw(canvas), self, fill=255)
        return canvas.getbbox()


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
            "objects": [{**dataclasses.asdict(o), "box": list(o.box)} for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Scene":
        names = [f.name for f in dataclasses.fields(SceneObject)]
        objects = tuple(SceneObject(**{k: o[k] for k in names}) for o in d["objects"])
        return cls(image_id=int(d["image_id"]), split=d["split"], objects=objects,
                   background=d["background"], background_color=tuple(d["background_color"]),
                   texture=dict(d.get("texture", {})))


def as_scene(scene: Union[Scene, Mapping[str, Any]]) -> Scene:
    return scene if isinstance(scene, Scene) else Scene.from_dict(scene)


def pick(rng: np.random.Generator, seq: Sequence):
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
            shape, color = pick(rng, SHAPES), pick(rng, COLOR_NAMES)
            if (shape, color) not in used:
                break
        used.add((shape, color))
        size = pick(rng, SIZES)
        r_i, c_i = divmod(c, 3)
        radius = max(2, int(round(_SIZE_FRACTION[size] * cell)))
        slack = max(0, min(int(cell / 2 - radius - 1), int(0.15 * cell)))
        x = int(round((c_i + 0.5) * cell)) + int(rng.integers(-slack, slack + 1))
        y = int(round((r_i + 0.5) * cell)) + int(rng.integers(-slack, slack + 1))
        objects.append(SceneObject(shape, color, size, ROWS[r_i], COLS[c_i], x, y, radius))
    textured = rng.random() < cfg.textured_background_prob
    background = pick(rng, ("striped", "speckled")) if textured else "plain"
    bg = pick(rng, BACKGROUND_COLORS)
    texture: Dict[str, Any] = {}
    if background == "striped":
        lo, hi = max(4, size_px // 16), max(5, size_px // 8)
        texture = {"orientation": pick(rng, ("horizontal", "vertical", "diagonal")),
                   "period": int(rng.integers(lo, hi + 1)),
                   "stripe_color": [max(0, v - 28) for v in bg]}
    elif background == "speckled":
        texture = {"amplitude": 22, "noise_seed": int(rng.integers(2**31 - 1))}
    return Scene(image_id, split, tuple(objects), background, tuple(bg), texture)


# --------------------------------------------------------------------------------- rendering
def _draw_shape(draw: ImageDraw.ImageDraw, o: SceneObject, fill=None) -> None:
    x, y, r = o.x, o.y, o.radius
    fill = COLORS[o.color] if fill is None else fill
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
    scene = as_scene(scene)
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


def render_job(job: Tuple[str, Dict[str, Any], int, str]) -> None:
    """Render ``(path, scene dict, image size, format)`` to ``path`` (a temporary file, then rename)."""
    path, scene, size, fmt = job
    img = render_scene(scene, size)
    tmp = path + ".tmp"
    if fmt == "png":
        img.save(tmp, format="PNG")
    else:
        img.save(tmp, format="JPEG", quality=95)
    os.replace(tmp, path)
