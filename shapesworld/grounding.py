"""Grounding phrases of a world: for each object of each image of a split, a phrase that names it and
only it, with its box (``scenes.json`` keeps every object's box in pixels of the written image). A
scene never holds two objects of the same colour and shape, so "red circle" names one object."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from shapesworld.config import GENERATOR_VERSION
from shapesworld.scene import SPLITS

PHRASE = "{color} {shape}"  # the default phrase; fields: color, shape, size, row, col


def grounding_items(root: str, split: str = "test", phrase: str = PHRASE) -> List[Dict[str, Any]]:
    """``[{"image", "phrase", "box", "boxes", "object"}]`` for every object of ``split``: ``box`` the named
    object's ``[x0, y0, x1, y1]`` (pixels, ends exclusive), ``boxes`` every object's box in that image,
    ``object`` the index of the named one. ``ValueError`` (one line) for a world without boxes or a
    phrase template that does not name one object."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {list(SPLITS)}")
    path = os.path.join(root, "scenes.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: generate the shapes world with `python -m shapesworld --out {root}`")
    with open(path, encoding="utf-8") as fh:
        scenes = json.load(fh)
    items = []
    for rel, sc in scenes.items():
        if sc["split"] != split:
            continue
        objects = sc["objects"]
        if any("box" not in o for o in objects):
            raise ValueError(f"{path}: {rel} has objects without a box: the world was written before "
                             f"{GENERATOR_VERSION}; regenerate it with `python -m shapesworld --out {root}`")
        try:
            phrases = [phrase.format(**o) for o in objects]
        except KeyError as err:
            raise ValueError(f"phrase template {phrase!r}: unknown field {err}; fields: color, shape, size, row, col") from None
        for i, o in enumerate(objects):
            if phrases.count(phrases[i]) > 1:
                raise ValueError(f"phrase template {phrase!r} names several objects of {rel} ({phrases[i]!r})")
            items.append({"image": rel, "phrase": phrases[i], "box": list(o["box"]),
                          "boxes": [list(b["box"]) for b in objects], "object": i})
    return items
