"""Weakly supervised grounding by Grad-CAM on the shapes world (ALBEF's grounding, tasks/grounding.py).

For every object of every image of a split, the phrase that names it ("red circle": a scene never
holds two objects of one colour and shape) goes through ``Pipeline.gradcam``; the box around the
phrase map's mass (threshold, largest connected region) counts when it overlaps the object's box
(``scenes.json``) at IoU >= 0.5. Reported per fusion layer and threshold, beside ALBEF's protocol of
ranking candidate boxes (here: the scene's objects) by their heat, and the baselines: centre box,
random box, random candidate; and all of these again on the phrases of images with several objects
(``multi_object``), where choosing the named object is not trivial.

    python benchmarks/grounding_shapes.py --checkpoint output/demo_pretrain/checkpoint_last.pth
    python benchmarks/grounding_shapes.py --checkpoint C --data data/shapes --split val --thresholds 0.3 0.5

Writes ``--out`` (default benchmarks/results/grounding_shapes.json) with the command, the date and
every number.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    from tasks.grounding import GroundingConfig
    d = GroundingConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a pre-training or retrieval checkpoint")
    ap.add_argument("--data", default="data/shapes", help="the shapes world")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    ap.add_argument("--phrase", default=None, help='phrase template (default "{color} {shape}")')
    ap.add_argument("--layers", type=int, nargs="+", default=None,
                    help="fusion layers to read (default: every fusion layer of the model)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.3, d.threshold, 0.7],
                    help="heat thresholds (fractions of the map's maximum)")
    ap.add_argument("--region", default=d.region, choices=["largest", "all"])
    ap.add_argument("--connectivity", type=int, default=d.connectivity, choices=[4, 8])
    ap.add_argument("--upsample", default=d.gradcam.upsample, choices=["bicubic", "bilinear", "nearest"])
    ap.add_argument("--limit", type=int, default=None, help="at most this many phrases (a quick run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default=None, help="a note kept in the results (e.g. how the checkpoint was trained)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/grounding_shapes.json"))
    return ap


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    import dataclasses

    import torch
    from PIL import Image

    from inference import load_model_and_preprocess
    from models.gradcam import GradCAMConfig
    from shapesworld.grounding import PHRASE, grounding_items
    from tasks.grounding import GroundingConfig, baselines, phrase_heats, score_heats

    torch.set_num_threads(args.threads)
    items = grounding_items(args.data, args.split, args.phrase or PHRASE)[: args.limit]
    pipe = load_model_and_preprocess(args.checkpoint)
    n_fusion = pipe.base.cfg.text.num_fusion_layers
    layers = args.layers if args.layers is not None else list(range(n_fusion))
    sizes = []
    for it in items:
        with Image.open(os.path.join(args.data, it["image"])) as img:
            sizes.append(img.size)
    base = GroundingConfig(region=args.region, connectivity=args.connectivity)
    results = []
    for layer in layers:
        gc = GradCAMConfig(layer=layer, upsample=args.upsample)
        t0 = time.perf_counter()
        heats = phrase_heats(pipe, items, args.data, gc)
        seconds = time.perf_counter() - t0
        multi = [i for i, it in enumerate(items) if len(it["boxes"]) > 1]
        for th in args.thresholds:
            cfg = dataclasses.replace(base, gradcam=gc, threshold=th)
            results.append({"layer": layer, "threshold": th, **score_heats(heats, items, cfg),
                            "multi_object": score_heats([heats[i] for i in multi], [items[i] for i in multi], cfg),
                            "gradcam_seconds": round(seconds, 2)})
            print(f"layer {layer} threshold {th}: heat box {results[-1]['heat_box_acc']:.3f} "
                  f"(mean IoU {results[-1]['heat_box_mean_iou']:.3f}), ranking {results[-1]['rank_acc']:.3f}")
    chance = baselines(items, sizes, base)
    multi = [i for i, it in enumerate(items) if len(it["boxes"]) > 1]
    chance["multi_object"] = baselines([items[i] for i in multi], [sizes[i] for i in multi], base)
    print(f"baselines: centre box {chance['centre_box_acc']:.3f}, random box {chance['random_box_acc']:.3f}, "
          f"random candidate {chance['random_candidate_acc']:.3f}")
    return {"command": "python benchmarks/grounding_shapes.py " + shlex.join(argv),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "checkpoint": args.checkpoint, "note": args.note, "data": args.data, "split": args.split, "phrases": len(items),
            "images": len({it["image"] for it in items}), "fusion_layers": n_fusion,
            "rule": {"region": args.region, "connectivity": args.connectivity, "upsample": args.upsample,
                     "iou": base.iou, "rank_alpha": base.rank_alpha},
            "results": results, "baselines": chance}


def main(argv: Optional[list[str]] = None) -> int:
    from engine.cli import run_reporting_errors

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)

    def go() -> int:
        try:
            report = run(args, argv)
        except ValueError as err:  # a world without boxes, a bad phrase template or layer
            print(f"error: {err}", file=sys.stderr)
            return 2
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
        print(f"wrote {args.out}")
        return 0

    return run_reporting_errors(go)


if __name__ == "__main__":
    sys.exit(main())
