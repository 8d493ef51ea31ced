"""Image transforms (train / eval) and seeded application for per-sample reproducible augmentation."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = ["TransformConfig", "build_transform", "decode_min_side", "apply_seeded"]

# torchvision RandomResizedCrop's default aspect-ratio range is (3/4, 4/3): the narrowest crop
RRC_MIN_ASPECT = 3.0 / 4.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                   "nearest": InterpolationMode.NEAREST}


@dataclass
class TransformConfig:
    """Augmentation settings. ALBEF uses scale (0.5, 1.0), RandAugment(2, 7) and no flip for
    pre-training (flipping would contradict captions that say "left" or "right")."""
    scale_min: float = field(default=0.5, metadata={"help": "smallest area fraction of the random resized crop (training)"})
    scale_max: float = field(default=1.0, metadata={"help": "largest area fraction of the random resized crop (training)"})
    hflip: bool = field(default=False, metadata={"help": "random horizontal flip (off: captions say left/right)"})
    randaugment: bool = field(default=True, metadata={"help": "apply RandAugment when training"})
    ra_num_ops: int = field(default=2, metadata={"help": "RandAugment: operations per image"})
    ra_magnitude: int = field(default=7, metadata={"help": "RandAugment: magnitude"})
    mean: tuple[float, float, float] = field(default=CLIP_MEAN, metadata={"help": "per-channel normalisation mean"})
    std: tuple[float, float, float] = field(default=CLIP_STD, metadata={"help": "per-channel normalisation std"})
    interpolation: str = field(default="bicubic", metadata={"help": "resize interpolation: bicubic, bilinear or nearest"})


def build_transform(img_size: int, train: bool, cfg: TransformConfig | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """Train: RandomResizedCrop(scale) [+ horizontal flip] [+ RandAugment] + ToTensor + Normalize.
    Eval: Resize((img_size, img_size)) + ToTensor + Normalize. Input: an RGB PIL image."""
    cfg = cfg or TransformConfig()
    try:
        interp = _INTERPOLATIONS[cfg.interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {cfg.interpolation!r}; valid: {sorted(_INTERPOLATIONS)}") from None
    if train:
        steps = [T.RandomResizedCrop(img_size, scale=(cfg.scale_min, cfg.scale_max), interpolation=interp)]
        if cfg.hflip:
            steps.append(T.RandomHorizontalFlip())
        if cfg.randaugment:
            steps.append(T.RandAugment(num_ops=cfg.ra_num_ops, magnitude=cfg.ra_magnitude, interpolation=interp))
    else:
        steps = [T.Resize((img_size, img_size), interpolation=interp)]
    steps += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(steps)


def decode_min_side(img_size: int, train: bool, cfg: TransformConfig | None = None) -> int:
    """The shorter image side a decode must keep for :func:`build_transform` to lose no detail (a JPEG
    much larger than this may be decoded reduced, see ``datasets.formats.load_image``). Eval resizes
    to ``img_size``; training's smallest random crop (area ``scale_min``, aspect ratio down to 3/4)
    must still span ``img_size`` pixels."""
    if not train:
        return img_size
    cfg = cfg or TransformConfig()
    return math.ceil(img_size / math.sqrt(cfg.scale_min * RRC_MIN_ASPECT))


def apply_seeded(transform: Callable, img, seed: int):
    """Run ``transform(img)`` with torch's CPU generator and Python's ``random`` seeded from ``seed``,
    restoring both afterwards: the same seed gives the same result in any worker, process or order.
    Only the CPU generator is seeded (``torch.default_generator``, not ``torch.manual_seed``, which
    would also reseed CUDA generators and so the model's dropout when loading runs in the main
    process)."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            return transform(img)
        finally:
            random.setstate(py_state)
