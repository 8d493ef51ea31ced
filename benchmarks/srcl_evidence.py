"""Which evidence finds the false negatives? The SRCL weights of trained study checkpoints recomputed
under other ``loss.contrastive`` regulation settings (``tasks.srcl_diagnostics.diagnose_checkpoint``
with ``regulation=``), on each checkpoint's own world's test split: the weight AUC for the true
false negatives and their mean weights. A screening that needs no training: the similarities are
the checkpoint's, only the regulation differs.

The *ceiling* rows use the truth, which no training run has: each caption's share of the split's
images it is true of (the best any caption-only prior such as the generality or the length can
know), alone and added (as a logit) to the checkpoint's standardised evidence. They bound what a
better estimate of that prior can give with this checkpoint's similarities.

    python benchmarks/srcl_evidence.py                 # the study's p 0.5 / 1.0 SRCL seed-0 checkpoints
    python benchmarks/srcl_evidence.py --runs output/srcl_study/runs/p0.50_srcl_s0 ...

Results: ``--out`` (JSON) and ``<out stem>_table.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> loss.contrastive settings (delta 1 throughout: the AUC hardly depends on delta)
SETTINGS = {
    "cross (paper)": {},
    "cross, standardised": {"standardise": True},
    "intra": {"evidence": "intra"},
    "intra, standardised": {"evidence": "intra", "standardise": True},
    "cross+intra": {"evidence": "cross+intra"},
    "cross+intra, standardised": {"evidence": "cross+intra", "standardise": True},
    "cross + 1.5 generality, standardised": {"generality_weight": 1.5, "standardise": True},
    "cross + 3 generality, standardised": {"generality_weight": 3.0, "standardise": True},
    "cross+intra + 1.5 generality, standardised": {"evidence": "cross+intra", "generality_weight": 1.5,
                                                   "standardise": True},
    "cross - pair": {"pair_weight": 1.0},
    "cross - pair, standardised": {"pair_weight": 1.0, "standardise": True},
    "cross - 0.5 pair + 0.75 generality, standardised": {"pair_weight": 0.5, "generality_weight": 0.75, "standardise": True},
    "cross - pair + 0.75 generality, standardised": {"pair_weight": 1.0, "generality_weight": 0.75, "standardise": True},
    "cross - 2 pair + 0.75 generality, standardised": {"pair_weight": 2.0, "generality_weight": 0.75, "standardise": True},
    "cross, standardised, length 0.5": {"standardise": True, "length_weight": 0.5},
    "cross, standardised, length 1": {"standardise": True, "length_weight": 1.0},
    "cross - pair + 0.75 generality, standardised, length 0.5": {"pair_weight": 1.0, "generality_weight": 0.75,
                                                                 "standardise": True, "length_weight": 0.5},
    "cross - pair + 0.75 generality, standardised, length 1": {"pair_weight": 1.0, "generality_weight": 0.75,
                                                               "standardise": True, "length_weight": 1.0},
}
# name -> (factor of the checkpoint's evidence, its loss.contrastive settings) added to the truth's logit prior
CEILINGS = {
    "ceiling: the truth's share of images per caption (oracle prior)": (0.0, {"standardise": True}),
    "ceiling: oracle prior + 0.5 x cross, standardised": (0.5, {"standardise": True}),
    "ceiling: oracle prior + cross, standardised": (1.0, {"standardise": True}),
    "ceiling: oracle prior + 2 x cross, standardised": (2.0, {"standardise": True}),
    "ceiling: oracle prior + cross - pair + 0.75 generality, standardised": (
        1.0, {"pair_weight": 1.0, "generality_weight": 0.75, "standardise": True}),
}


def ceiling_aucs(ckpt: str, world_root: str, split: str = "test", batch_size: int = 64) -> dict[str, dict]:
    """The weight AUC (delta 1) of each ``CEILINGS`` evidence on ``split``, in the batches of
    ``tasks.srcl_diagnostics.diagnose_checkpoint`` (same pairs, order and anchors)."""
    import dataclasses
    import os

    import torch
    from models import losses as L
    from objectives.pretrain import regulation_evidence
    from shapesworld.truth import ShapesWorld
    from tasks.srcl_diagnostics import _pairs, pair_batches
    from tasks.zero_shot import itc_features, load_vlp_checkpoint

    model, tok, cfg = load_vlp_checkpoint(ckpt, "cpu", objective=True)
    world, d = ShapesWorld.load(world_root), cfg.data
    pairs = _pairs(world, split, d.max_words, d.clean_style, 0)
    images, captions = sorted({p for p, _ in pairs}), sorted({c for _, c in pairs})
    img_row, cap_row = {p: i for i, p in enumerate(images)}, {c: i for i, c in enumerate(captions)}
    fi, ft = itc_features(model, tok, [os.path.join(world_root, p) for p in images], captions, cfg.model.vision.img_size,
                          batch_size, cfg.tokenizer.max_length, momentum=True, progress=False, transform_cfg=d.transform)[:2]
    share = torch.as_tensor(world.truth_matrix(captions, images)).double().mean(1).clamp(1e-3, 1 - 1e-3)
    prior = (share / (1 - share)).log()
    parts: dict[str, dict[str, list]] = {name: {"w": [], "neg": [], "truth": []} for name in CEILINGS}
    for ii, cc, neg, truth in pair_batches(world, pairs, img_row, cap_row, batch_size):
        sim = (fi[ii] @ ft[cc].T).double()
        for name, (factor, reg) in CEILINGS.items():
            ccfg = dataclasses.replace(cfg.loss.contrastive, **reg)
            e = regulation_evidence(ccfg, neg, (fi[ii].double(), ft[cc].double(), fi[ii].double(), ft[cc].double()),
                                    (sim, sim.T))[0]
            for key, value in (("w", L.regulation_weights(prior[cc][None, :] + factor * e, neg, 1.0)),
                               ("neg", neg), ("truth", truth)):  # the last batch padded with non-negatives
                parts[name][key].append(torch.nn.functional.pad(value, (0, batch_size - len(ii))))
    out = {}
    for name, p in parts.items():
        r = L.false_negative_auc(*(torch.cat(p[k]) for k in ("w", "neg", "truth")))
        out[name] = {"weight_auc": r["auc"], "w_false_neg": r["w_false_neg"], "w_true_neg": r["w_true_neg"]}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["output/srcl_study/runs/p0.50_srcl_s0", "output/srcl_study/runs/p1.00_srcl_s0"],
                   help="study run folders (checkpoint_last.pth + spec.json naming the world)")
    p.add_argument("--out", default="benchmarks/results/srcl_evidence.json")
    args = p.parse_args(argv)
    from tasks.srcl_diagnostics import diagnose_checkpoint, study_runs
    try:
        runs = study_runs(args.runs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = []
    for folder, (ckpt, world, _) in zip(args.runs, runs):
        run = Path(folder)
        for name, reg in SETTINGS.items():
            d = diagnose_checkpoint(ckpt, world, "test", batch_size=64, progress=False,
                                    regulation={"delta": 1.0, **reg})
            rows.append({"run": run.name, "world": Path(world).name, "setting": name, "regulation": reg,
                         "weight_auc": d["weight_auc"], "w_false_neg": d["weight_w_false_neg"],
                         "w_true_neg": d["weight_w_true_neg"], "false_negative_rate": d["false_negative_rate"]})
            print(f"{run.name} {name}: AUC {d['weight_auc']:.3f}", flush=True)
        for name, d in ceiling_aucs(ckpt, world).items():
            rows.append({"run": run.name, "world": Path(world).name, "setting": name, "regulation": "truth", **d})
            print(f"{run.name} {name}: AUC {d['weight_auc']:.3f}", flush=True)
    runs = [r.name for r in map(Path, args.runs)]
    lines = ["| regulating evidence (delta 1) | " + " | ".join(f"{r}: AUC / w FN / w TN" for r in runs) + " |",
             "|" + "---|" * (len(runs) + 1)]
    for name in [*SETTINGS, *CEILINGS]:
        cells = [next(f"{x['weight_auc']:.3f} / {x['w_false_neg']:.2f} / {x['w_true_neg']:.2f}"
                      for x in rows if x["run"] == r and x["setting"] == name) for r in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/srcl_evidence.py " + " ".join(argv or sys.argv[1:]),
                               "wall_seconds": time.time() - t0, "rows": rows, "table_markdown": table}, indent=1) + "\n",
                   encoding="utf-8")
    out.with_name(out.stem + "_table.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
