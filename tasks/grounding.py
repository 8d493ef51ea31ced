"""Weakly supervised grounding by Grad-CAM (ALBEF): the box of a phrase from its heat map, scored by IoU
against the named object's box.

The rule (:func:`heat_box`): the phrase's Grad-CAM map (``Pipeline.gradcam``, the mean over its tokens)
is interpolated to the image's size; the pixels whose heat is at least ``threshold`` times the map's
maximum are kept; of their connected regions (``connectivity`` 4 or 8) the largest by pixel count is
taken (``region: largest``; ``all`` takes every kept pixel), and its bounding box is the prediction. A
map without positive heat predicts no box (a miss). A phrase counts as grounded when the predicted box
overlaps the object's box at IoU >= ``iou`` (0.5, the RefCOCO criterion).

ALBEF itself scores RefCOCO+ by ranking detector proposals by the heat inside them
(``sum / area ** alpha``); :func:`rank_boxes` does that with the candidate boxes of the data (on the
shapes world: every object of the scene), reported beside the heat box.

Baselines (:func:`baselines`): the centre box (a box of the mean object size at the image centre), a
random box of that size anywhere in the image, and, for the ranking protocol, a random candidate box.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from engine.config import opt
from models.gradcam import GradCAMConfig

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (pixels; x1, y1 exclusive)


@dataclass
class GroundingConfig:
    gradcam: GradCAMConfig = opt(GradCAMConfig, "which cross-attention the heat maps read")
    threshold: float = opt(0.5, "keep the pixels whose heat is at least this fraction of the map's maximum")
    region: str = opt("largest", "largest: the largest connected region of kept pixels; all: every kept pixel")
    connectivity: int = opt(4, "pixel neighbourhood of a connected region: 4 or 8")
    iou: float = opt(0.5, "a phrase is grounded when its box overlaps the object's at least this IoU")
    rank_alpha: float = opt(0.5, "ALBEF's proposal ranking: heat inside a box / area ** rank_alpha")
    random_draws: int = opt(200, "random boxes per phrase for the random-box baseline")
    seed: int = opt(0, "seed of the random-box baseline")

    def validate(self) -> None:
        self.gradcam.validate()
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"grounding.threshold must be in (0, 1]; got {self.threshold}")
        if self.region not in ("largest", "all"):
            raise ValueError(f"grounding.region must be largest or all; got {self.region!r}")
        if self.connectivity not in (4, 8):
            raise ValueError(f"grounding.connectivity must be 4 or 8; got {self.connectivity}")


def box_iou(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 when either is None or empty)."""
    if a is None or b is None:
        return 0.0
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def largest_region(mask: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """The largest connected region of a boolean (H, W) mask (the first found among equally large ones)."""
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        region, todo = [], deque([(int(y0), int(x0))])
        while todo:
            y, x = todo.popleft()
            region.append((y, x))
            for dy, dx in steps:
                v, u = y + dy, x + dx
                if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    todo.append((v, u))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def heat_box(heat: torch.Tensor, cfg: GroundingConfig) -> Optional[Box]:
    """The predicted box of a heat map (H, W) at the image's size, by the rule of the module docstring."""
    h = heat.detach().double().cpu().numpy()
    top = h.max()
    if not top > 0:
        return None
    keep = h >= cfg.threshold * top
    if cfg.region == "largest":
        keep = largest_region(keep, cfg.connectivity)
    ys, xs = np.nonzero(keep)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def rank_boxes(heat: torch.Tensor, boxes: Sequence[Sequence[float]], alpha: float) -> int:
    """ALBEF's choice among candidate boxes: the index of the box with the most heat per ``area ** alpha``."""
    scores = []
    for x0, y0, x1, y1 in boxes:
        area = max((x1 - x0) * (y1 - y0), 1e-9)
        scores.append(float(heat[int(y0):int(y1), int(x0):int(x1)].double().sum()) / area ** alpha)
    return int(np.argmax(scores))


def phrase_heats(pipe, items: Sequence[dict], image_root: str, gradcam: GradCAMConfig) -> list[torch.Tensor]:
    """Each item's phrase heat map at its image's size (``items``: ``{"image", "phrase", ...}``)."""
    out = []
    for item in items:
        with Image.open(f"{image_root}/{item['image']}") as img:
            img = img.convert("RGB")
        cam = pipe.gradcam(img, item["phrase"], gradcam)
        out.append(cam.at_size(cam.phrase_map, (img.height, img.width), gradcam.upsample))
    return out


def score_heats(heats: Sequence[torch.Tensor], items: Sequence[dict], cfg: GroundingConfig) -> dict:
    """Grounding accuracy of the heat box and of the candidate ranking (needs ``items[i]["box"]`` and
    ``["boxes"]``), with the mean IoU of the heat box."""
    cfg.validate()
    ious = [box_iou(heat_box(h, cfg), it["box"]) for h, it in zip(heats, items)]
    ranked = [box_iou(it["boxes"][rank_boxes(h, it["boxes"], cfg.rank_alpha)], it["box"]) for h, it in zip(heats, items)]
    n = max(len(items), 1)
    return {"n": len(items), "heat_box_acc": sum(i >= cfg.iou for i in ious) / n, "heat_box_mean_iou": sum(ious) / n,
            "rank_acc": sum(i >= cfg.iou for i in ranked) / n}


def baselines(items: Sequence[dict], sizes: Sequence[tuple[int, int]], cfg: GroundingConfig) -> dict:
    """The centre box, a random box (both of the mean object size) and a random candidate box, scored
    like :func:`score_heats` (``sizes``: each item's image (width, height))."""
    n = max(len(items), 1)
    bw = float(np.mean([it["box"][2] - it["box"][0] for it in items])) if items else 0.0
    bh = float(np.mean([it["box"][3] - it["box"][1] for it in items])) if items else 0.0
    rng = np.random.default_rng(cfg.seed)
    centre = rand = cand = 0.0
    for it, (w, h) in zip(items, sizes):
        centre += box_iou(((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2), it["box"]) >= cfg.iou
        xs, ys = rng.uniform(0, max(w - bw, 0), cfg.random_draws), rng.uniform(0, max(h - bh, 0), cfg.random_draws)
        rand += np.mean([box_iou((x, y, x + bw, y + bh), it["box"]) >= cfg.iou for x, y in zip(xs, ys)])
        cand += np.mean([box_iou(b, it["box"]) >= cfg.iou for b in it["boxes"]])
    return {"centre_box_acc": centre / n, "random_box_acc": float(rand / n), "random_candidate_acc": float(cand / n),
            "box_size": [round(bw, 2), round(bh, 2)]}
