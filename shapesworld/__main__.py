"""Command line: generate the shapes world into a folder::

    python -m shapesworld --out data/shapes [--seed 0 --num-train-images 1500 ...]

Every :class:`~shapesworld.config.ShapesConfig` field is a ``--field-name`` option. The run skips all
work when ``out`` holds a complete world for the same configuration (``--force`` regenerates).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

from shapesworld.config import DEFAULT_ROOT, GENERATOR_VERSION, ShapesConfig
from shapesworld.write import ensure_shapes


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shapesworld",
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
