"""What the web demo (tools/demo.py) shows, as PNG data URLs and JSON-ready values: images, Grad-CAM
heat maps over an image (ALBEF's overlay), and the SRCL view of a demo batch of the shapes world (the
regulation weights beside the world's truth: which negatives are false negatives)."""
from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from models.losses import false_negative_auc, regulation_weights


@dataclass
class ViewConfig:
    """How the demo draws: ``display`` (px, the longest side of a shown image), ``cell`` (px per
    matrix entry), ``overlay_gamma`` (the heat's opacity ``heat ** gamma``, ALBEF's 0.7)."""

    display: int = 256
    cell: int = 18
    overlay_gamma: float = 0.7


def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def display_image(img: Image.Image, view: ViewConfig) -> Image.Image:
    """``img`` scaled so that its longest side is ``view.display`` (small images enlarged, pixels kept)."""
    img = img.convert("RGB")
    scale = view.display / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.NEAREST if scale > 1 else Image.BICUBIC)


def _colormap(name: str, values: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps
    return colormaps[name](values)[..., :3]


def heat_overlay(img: Image.Image, heat: torch.Tensor, view: ViewConfig) -> Image.Image:
    """A heat map (H, W, at the displayed image's size) over ``img``: normalised to [0, 1], ``jet``
    colours blended with opacity ``heat ** gamma`` (ALBEF's visualisation)."""
    base = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    h = heat.detach().double().numpy()
    h = h - h.min()
    if h.max() > 0:
        h = h / h.max()
    a = (h ** view.overlay_gamma)[..., None]
    out = (1 - a) * base + a * _colormap("jet", h)
    return Image.fromarray((out * 255).round().clip(0, 255).astype(np.uint8))


def matrix_image(values: np.ndarray, view: ViewConfig, cmap: str, lo: float, hi: float,
                 blank: Optional[np.ndarray] = None) -> Image.Image:
    """A matrix as coloured cells (``cmap`` over [lo, hi]; all one colour when lo == hi); entries where
    ``blank`` is True are grey."""
    v = np.clip((values.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = _colormap(cmap, v)
    if blank is not None:
        rgb[blank] = 0.55
    img = Image.fromarray((rgb * 255).round().astype(np.uint8))
    return img.resize((values.shape[1] * view.cell, values.shape[0] * view.cell), Image.NEAREST)


def srcl_batch(pipe, world_root: str, n: int, delta: float, view: ViewConfig) -> dict:
    """The SRCL weights of a batch of ``n`` images of the world's test split and one caption each
    (image-to-text anchors; the caption of image ``i`` is the ``i % 5``-th of its own), with the
    checkpoint's ITC similarities and ``delta``, beside the world's truth: which captions of other
    images are true of the anchor (false negatives). Needs the world's ``retrieval_test.json`` and
    ``scenes.json``."""
    from shapesworld.truth import ShapesWorld

    path = os.path.join(world_root, "retrieval_test.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: generate the shapes world with "
                                f"`python -m shapesworld --out {world_root}`")
    with open(path, encoding="utf-8") as fh:
        recs = json.load(fh)[:n]
    world = ShapesWorld.load(world_root)
    captions = [r["caption"][i % len(r["caption"])] for i, r in enumerate(recs)]
    rels = [r["image"] for r in recs]
    sim = pipe.encode_image([os.path.join(world_root, p) for p in rels]) @ pipe.encode_text(captions).T
    neg = ~torch.eye(len(recs), dtype=torch.bool)
    truth = torch.from_numpy(world.truth_matrix(captions, rels).T.copy())  # (image, caption)
    weights = regulation_weights(sim.double(), neg, delta)
    stats = false_negative_auc(weights, neg, truth & neg)
    diag = ~neg.numpy()
    w = weights.numpy()
    lo, hi = float(w[~diag].min()), float(w[~diag].max())
    return {
        "captions": captions,
        "thumbs": [png_data_url(display_image(Image.open(os.path.join(world_root, p)), ViewConfig(display=48)))
                   for p in rels],
        "weights_png": png_data_url(matrix_image(w, view, "viridis", lo, hi, diag)), "w_min": lo, "w_max": hi,
        "truth_png": png_data_url(matrix_image((truth & neg).numpy().astype(float), view, "gray", 0.0, 1.0, diag)),
        "weights": np.round(w, 4).tolist(), "truth": truth.numpy().tolist(), "delta": delta,
        "auc": stats["auc"], "w_false_neg": stats["w_false_neg"], "w_true_neg": stats["w_true_neg"],
        "n_false_neg": int(stats["n_false_neg"]), "n_true_neg": int(stats["n_true_neg"]),
    }
