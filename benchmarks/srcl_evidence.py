"""Which evidence finds the false negatives? The SRCL weights of trained study checkpoints recomputed
under other ``loss.contrastive`` regulation settings (``tasks.srcl_diagnostics.diagnose_checkpoint``
with ``regulation=``), on each checkpoint's own world's test split: the weight AUC for the true
false negatives and their mean weights. A screening that needs no training: the similarities are
the checkpoint's, only the regulation differs.

The *ceiling* rows use the truth, which no training run has: each caption's share of the split's
images it is true of (the best any caption-only prior such as the generality or the length can
know), alone and added (as a logit) to the checkpoint's standardised evidence. They bound what a
better estimate of that prior can give with this checkpoint's similarities.

The *caption-set* rows take an image anchor's intra-modal evidence over all of its image's captions
in the split (the world has five per image, as COCO does), not only the batch row's own caption: a
screening of what a loader that carried every caption of an image would give.

    python benchmarks/srcl_evidence.py                 # the study's p 0.5 / 1.0 SRCL seed-0 checkpoints
    python benchmarks/srcl_evidence.py --runs output/srcl_study/runs/p0.50_srcl_s0 ...
    python benchmarks/srcl_evidence.py --helpers HELPER_RUN_P05 HELPER_RUN_P10   # + rows with a helper

With ``--helpers`` (one study run folder per ``--runs`` entry, e.g. a long InfoNCE run on the same
world: docs/srcl_study.md says how the study's were made) the *helper* rows take the weights from
that frozen helper's similarity alone (alpha 1) under the ``HELPER_SETTINGS``.

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


# name -> loss.contrastive settings of the rows with a helper (``--helpers``; alpha 1: the helper's similarity alone)
HELPER_SETTINGS = {
    "helper: cross": {},
    "helper: cross, standardised": {"standardise": True},
    "helper: cross, standardised, length 0.5": {"standardise": True, "length_weight": 0.5},
    "helper: cross - pair + 0.75 generality, standardised, length 0.5": {"pair_weight": 1.0, "generality_weight": 0.75,
                                                                         "standardise": True, "length_weight": 0.5},
}
# the ceilings of the helper's similarity (``--helpers``; its online features, as the helper rows)
HELPER_CEILINGS = {
    "helper ceiling: oracle prior + helper cross, standardised": (1.0, {"standardise": True}),
    "helper ceiling: oracle prior + 2 x helper cross, standardised": (2.0, {"standardise": True}),
}
# name -> (factor of the checkpoint's evidence, its loss.contrastive settings) added to the intra-modal
# evidence over all of the anchor image's captions (``caption_set_aucs``)
CAPTION_SETS = {
    "intra over all the image's captions (max), standardised": (0.0, {}),
    "cross, standardised + intra over all the image's captions (max), standardised": (1.0, {"standardise": True}),
    "cross, standardised, length 0.5 + intra over all the image's captions (max), standardised": (
        1.0, {"standardise": True, "length_weight": 0.5}),
}


def _checkpoint_split(ckpt: str, world_root: str, split: str, batch_size: int, momentum: bool = True):
    """The checkpoint's run config and momentum (or online) features of ``split``
    (``SplitFeatures``), the pairs in the diagnostics' order."""
    from tasks.srcl_diagnostics import split_features
    from tasks.zero_shot import load_vlp_checkpoint

    model, tok, cfg = load_vlp_checkpoint(ckpt, "cpu", objective=momentum)
    return cfg, tok, split_features(model, tok, cfg, world_root, split, batch_size, momentum=momentum)


def _pooled_weight_aucs(sf, batch_size: int, evidence_fns: dict) -> dict[str, dict]:
    """For each ``name -> fn(ii, cc, neg, sim)`` (the evidence of a batch's image anchors for its
    captions, float64): the weight AUC (delta 1) and mean weights, pooled over the batches of
    ``tasks.srcl_diagnostics.diagnose_checkpoint`` (same pairs, order and anchors)."""
    import torch
    from models import losses as L
    from tasks.srcl_diagnostics import pair_batches

    parts: dict[str, dict[str, list]] = {name: {"w": [], "neg": [], "truth": []} for name in evidence_fns}
    for ii, cc, neg, truth in pair_batches(sf.world, sf.pairs, sf.img_row, sf.cap_row, batch_size):
        sim = (sf.image_feats[ii] @ sf.text_feats[cc].T).double()
        for name, fn in evidence_fns.items():
            for key, value in (("w", L.regulation_weights(fn(ii, cc, neg, sim), neg, 1.0)),
                               ("neg", neg), ("truth", truth)):  # the last batch padded with non-negatives
                parts[name][key].append(torch.nn.functional.pad(value, (0, batch_size - len(ii))))
    out = {}
    for name, p in parts.items():
        r = L.false_negative_auc(*(torch.cat(p[k]) for k in ("w", "neg", "truth")))
        out[name] = {"weight_auc": r["auc"], "w_false_neg": r["w_false_neg"], "w_true_neg": r["w_true_neg"]}
    return out


def _evidence(ccfg, reg: dict, neg, sf, ii, cc, sim, length=None):
    """The image anchors' evidence of the checkpoint's similarity under ``loss.contrastive`` ``ccfg``
    with ``reg`` replaced (``objectives.pretrain.regulation_evidence``, float64)."""
    import dataclasses

    from objectives.pretrain import regulation_evidence
    fi, ft = sf.image_feats[ii].double(), sf.text_feats[cc].double()
    return regulation_evidence(dataclasses.replace(ccfg, **reg), neg, (fi, ft, fi, ft), (sim, sim.T), length)[0]


def ceiling_aucs(ckpt: str, world_root: str, split: str = "test", batch_size: int = 64,
                 ceilings: Optional[dict] = None, momentum: bool = True) -> dict[str, dict]:
    """The weight AUC (delta 1) of each ``ceilings`` evidence (default ``CEILINGS``) on ``split``, in
    the batches of ``tasks.srcl_diagnostics.diagnose_checkpoint`` (same pairs, order and anchors),
    from the checkpoint's momentum features (online ones without ``momentum``, as a helper's)."""
    import torch

    cfg, _, sf = _checkpoint_split(ckpt, world_root, split, batch_size, momentum)
    share = torch.as_tensor(sf.world.truth_matrix(sf.captions, sf.images)).double().mean(1).clamp(1e-3, 1 - 1e-3)
    prior = (share / (1 - share)).log()
    fns = {name: (lambda ii, cc, neg, sim, f=factor, r=reg:
                  prior[cc][None, :] + f * _evidence(cfg.loss.contrastive, r, neg, sf, ii, cc, sim))
           for name, (factor, reg) in (CEILINGS if ceilings is None else ceilings).items()}
    return _pooled_weight_aucs(sf, batch_size, fns)


def caption_set_aucs(ckpt: str, world_root: str, split: str = "test", batch_size: int = 64) -> dict[str, dict]:
    """The weight AUC (delta 1) of each ``CAPTION_SETS`` evidence on ``split`` (batches as
    :func:`ceiling_aucs`): the intra-modal evidence of an image anchor taken over *all* of its
    image's captions in the split, not only the batch row's: the negative caption's highest cosine
    (momentum text encoder) to any of them, standardised per anchor over its negatives."""
    import torch
    from models import losses as L
    from tasks.srcl_diagnostics import caption_lengths

    cfg, tok, sf = _checkpoint_split(ckpt, world_root, split, batch_size)
    own: dict[int, list[int]] = {}
    for path, caption in sf.pairs:
        own.setdefault(sf.img_row[path], []).append(sf.cap_row[caption])
    ft = sf.text_feats.double()
    length = caption_lengths(tok, sf.captions, cfg.tokenizer.max_length)
    ccfg = cfg.loss.contrastive

    def set_max(ii, cc, neg):
        e = torch.stack([(ft[own[int(i)]] @ ft[cc].T).max(0).values for i in ii])
        return L.regulation_evidence(e, neg, standardise=True)

    fns = {name: (lambda ii, cc, neg, sim, f=factor, r=reg:
                  set_max(ii, cc, neg) + (f * _evidence(ccfg, r, neg, sf, ii, cc, sim, length[cc]) if f else 0.0))
           for name, (factor, reg) in CAPTION_SETS.items()}
    return _pooled_weight_aucs(sf, batch_size, fns)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["output/srcl_study/runs/p0.50_srcl_s0", "output/srcl_study/runs/p1.00_srcl_s0"],
                   help="study run folders (checkpoint_last.pth + spec.json naming the world)")
    p.add_argument("--helpers", nargs="+", default=None,
                   help="one study run folder per --runs entry: its checkpoint is the frozen helper of the helper rows")
    p.add_argument("--out", default="benchmarks/results/srcl_evidence.json")
    args = p.parse_args(argv)
    from tasks.srcl_diagnostics import diagnose_checkpoint, study_runs
    if args.helpers is not None and len(args.helpers) != len(args.runs):
        print(f"error: --helpers names {len(args.helpers)} folder(s) for {len(args.runs)} --runs; give one per run",
              file=sys.stderr)
        return 2
    try:
        runs = study_runs(args.runs)
        helpers = [c for c, _, _ in study_runs(args.helpers)] if args.helpers else [None] * len(runs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = []
    for folder, (ckpt, world, _), helper in zip(args.runs, runs, helpers):
        run = Path(folder)
        settings = [(name, reg, None) for name, reg in SETTINGS.items()]
        settings += [(name, reg, helper) for name, reg in HELPER_SETTINGS.items() if helper]
        for name, reg, h in settings:
            d = diagnose_checkpoint(ckpt, world, "test", batch_size=64, progress=False,
                                    regulation={"delta": 1.0, **reg}, helper=h, alpha=1.0 if h else None)
            rows.append({"run": run.name, "world": Path(world).name, "setting": name, "regulation": reg,
                         **({"helper": h} if h else {}),
                         "weight_auc": d["weight_auc"], "w_false_neg": d["weight_w_false_neg"],
                         "w_true_neg": d["weight_w_true_neg"], "false_negative_rate": d["false_negative_rate"]})
            print(f"{run.name} {name}: AUC {d['weight_auc']:.3f}", flush=True)
        found = [*caption_set_aucs(ckpt, world).items(), *ceiling_aucs(ckpt, world).items()]
        if helper:
            found += ceiling_aucs(helper, world, ceilings=HELPER_CEILINGS, momentum=False).items()
        for name, d in found:
            kind = "truth" if name in CEILINGS or name in HELPER_CEILINGS else "all captions of the image"
            rows.append({"run": run.name, "world": Path(world).name, "setting": name, "regulation": kind, **d})
            print(f"{run.name} {name}: AUC {d['weight_auc']:.3f}", flush=True)
    runs = [r.name for r in map(Path, args.runs)]
    lines = ["| regulating evidence (delta 1) | " + " | ".join(f"{r}: AUC / w FN / w TN" for r in runs) + " |",
             "|" + "---|" * (len(runs) + 1)]
    for name in [*SETTINGS, *(HELPER_SETTINGS if args.helpers else ()), *CAPTION_SETS, *CEILINGS,
                 *(HELPER_CEILINGS if args.helpers else ())]:
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
