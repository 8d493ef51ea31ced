"""The generator's configuration: every field that determines the generated files."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

GENERATOR = "shapesworld"
GENERATOR_VERSION = "shapes-1.1"  # 1.1: every object of scenes.json has its pixel box
DEFAULT_ROOT = "data/shapes"

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               tuple: "a list of three integers"}


def _of_type(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return isinstance(value, kind) and kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    if kind is tuple:
        return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, kind)


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
    # the folder a preset's ``x-synthetic`` section generates the world into; not part of the content:
    # two folders with the same other fields hold byte-identical files
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
        """The config of a mapping (a manifest's ``config``, a preset's section); ValueError names an
        unknown field or a value of the wrong type."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ShapesConfig fields: {sorted(unknown)}")
        for f in dataclasses.fields(cls):
            kind = type(f.default)
            if f.name in d and not _of_type(d[f.name], kind):
                raise ValueError(f"{f.name} must be {_TYPE_NAMES[kind]} (got {d[f.name]!r})")
        return cls(**dict(d))

    def split_sizes(self) -> Dict[str, int]:
        return {"train": self.num_train_images, "val": self.num_val_images,
                "test": self.num_test_images}

