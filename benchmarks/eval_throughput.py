"""Retrieval-evaluation time: ITC over all image-caption pairs, then ITM re-ranking of the top
``k_test`` candidates of every query (both directions), through the project's evaluator
(``tasks.retrieval_eval.RetrievalEvaluator``), on a synthetic split of random images and captions.

The split has the shape of COCO/Flickr test sets, 5 captions per image (default 1,000 images x
5,000 captions); the model is randomly initialised (the cost does not depend on the weights; the
number of unique re-ranked pairs does a little: random weights give almost no overlap between the
image-to-text and text-to-image top-k lists, so close to the ``(images + captions) x k_test`` upper
bound). Several ``k_test`` values are timed to show the cost is linear in ``k_test`` and dominated by
the re-ranking.

For models too slow to evaluate the full set on this machine (ViT-B/16 + BERT-base on 2 CPU cores),
``--images`` runs a smaller split and the report extrapolates to ``--target-images`` from the
measured cost per caption (text pass), per image (two ViT passes: features, then re-ranking) and
per re-ranked pair, with the upper-bound pair count: clearly marked ``extrapolated``.

    python benchmarks/eval_throughput.py --models demo --k-test 16 32 64
    python benchmarks/eval_throughput.py --models vitb_bertbase --images 40 --k-test 4 8

Writes a table to stdout and JSON to benchmarks/results/eval_throughput.json (``--out``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"demo": "configs/demo/pretrain.yaml", "vitb_bertbase": "configs/pretrain.yaml"}
WORDS = ("a an the small large red green blue yellow purple cyan circle square star triangle shape object "
         "left right top bottom center of on with and picture image photo showing two three one striped plain "
         "background next to above below near").split()


def synthetic_split(root: Path, n_images: int, captions_per_image: int, size: int, seed: int = 0):
    """Random RGB PNGs and random captions (8-20 words) in the evaluator's data structure."""
    import numpy as np
    from PIL import Image

    from datasets.retrieval_data import RetrievalEvalData

    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    data = RetrievalEvalData(str(root / "synthetic_test.json"), [], [], [], [], [])
    for i in range(n_images):
        name = f"img_{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name)
        data.image_files.append(str(root / name))
        data.image_names.append(name)
        data.img2txt.append([])
        for _ in range(captions_per_image):
            data.img2txt[-1].append(len(data.texts))
            data.texts.append(" ".join(words.choice(WORDS) for _ in range(words.randint(8, 20))))
            data.txt2img.append(i)
    return data


def measure(model_name: str, n_images: int, captions_per_image: int, k_tests: list[int], precision: str,
            batch: int, itm_batch: int, device: str, workers: int, rounds: int = 1) -> list[dict]:
    """Time the evaluator for each ``k_test`` on one synthetic split; one row per ``k_test`` and
    round (rounds alternate the order of the ``k_test`` values, against drifting machine load)."""
    import torch

    from datasets.text import train_wordpiece_tokenizer
    from datasets.transforms import build_transform
    from engine.config import load_config
    from models.vlp import VLPModel
    from tasks.pretrain import PretrainConfig
    from tasks.retrieval_eval import RetrievalEvalConfig, RetrievalEvaluator

    cfg = load_config(PretrainConfig, ROOT / CONFIGS[model_name],
                      ["model.vision_weights=null", "model.text_weights=null", "tokenizer.path=null"])
    size = cfg.model.vision.img_size
    dev = torch.device(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_split(Path(tmp), n_images, captions_per_image, size)
        tokenizer = train_wordpiece_tokenizer(data.texts, 400)
        torch.manual_seed(0)
        model = VLPModel(cfg.model, momentum=False).to(dev).eval()
        transform = build_transform(size, False, cfg.data.transform)
        amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
        t_text, t_image = encoder_times(model, data, tokenizer, transform, cfg.tokenizer.max_length, batch, dev, amp)
        for rnd in range(rounds):
            for k in (k_tests if rnd % 2 == 0 else k_tests[::-1]):
                ecfg = RetrievalEvalConfig(k_test=k, batch_size=batch, itm_batch_size=itm_batch, progress=False,
                                           save_ranked=False)
                ev = RetrievalEvaluator(data, tokenizer, ecfg, transform, cfg.tokenizer.max_length, dev, workers, amp)
                t0 = time.perf_counter()
                res = ev.run(model)
                wall = time.perf_counter() - t0
                tm = res.timings
                rows.append({"model": model_name, "precision": precision, "images": data.num_images,
                             "captions": data.num_texts, "k_test": k, "itm_pairs": res.num_pairs,
                             "itm_pairs_upper_bound": (data.num_images + data.num_texts) * k,
                             "features_s": tm["features"], "itc_s": tm["itc"], "itm_s": tm["itm"],
                             "total_s": tm["total"], "wall_s": wall, "itm_share": tm["itm"] / tm["total"],
                             "itm_pairs_per_s": res.num_pairs / max(tm["itm"], 1e-9),
                             "text_encode_s": t_text, "image_encode_s": t_image,
                             "threads": torch.get_num_threads(), "extrapolated": False, "round": rnd})
                print(f"{model_name:14s} {precision:5s} {data.num_images}x{data.num_texts} k_test={k:4d}: total {tm['total']:8.1f} s "
                      f"(features {tm['features']:.1f}, ITC {tm['itc']:.2f}, ITM {tm['itm']:.1f} s for {res.num_pairs} pairs, "
                      f"{100 * tm['itm'] / tm['total']:.0f}% ITM)", flush=True)
    return rows


def encoder_times(model, data, tokenizer, transform, max_length: int, batch: int, dev, amp) -> tuple[float, float]:
    """Seconds to encode all captions (text layers) and all images (ViT, decoding included), the two
    unimodal passes the evaluator makes (it runs the ViT a second time while re-ranking)."""
    import torch

    from datasets.formats import load_image
    from datasets.retrieval_data import tokenize_texts

    ids, mask = tokenize_texts(tokenizer, data.texts, max_length)
    with torch.no_grad(), amp():
        t0 = time.perf_counter()
        for a in range(0, data.num_texts, batch):
            model.encode_text(ids[a:a + batch].to(dev), mask[a:a + batch].to(dev))
        t1 = time.perf_counter()
        for a in range(0, data.num_images, batch):
            images = torch.stack([transform(load_image(f)) for f in data.image_files[a:a + batch]]).to(dev)
            model.encode_image(images)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def extrapolate(row: dict, target_images: int, captions_per_image: int, k: int) -> dict:
    """Scale a measured row to ``target_images`` and ``k``: the text pass linear in captions, the two
    ViT passes (features, re-ranking) linear in images, ITC linear in images x captions, and the
    fusion part of the re-ranking (ITM time minus one ViT pass) linear in the upper-bound pair count
    ``(images + captions) x k``."""
    n_t = target_images * captions_per_image
    s_img, s_txt = target_images / row["images"], n_t / row["captions"]
    pairs = (target_images + n_t) * k
    per_pair = max(row["itm_s"] - row["image_encode_s"], 0.0) / row["itm_pairs"]
    feat = row["text_encode_s"] * s_txt + row["image_encode_s"] * s_img
    itc = row["itc_s"] * s_img * s_txt
    itm = row["image_encode_s"] * s_img + per_pair * pairs
    return {**row, "images": target_images, "captions": n_t, "k_test": k, "itm_pairs": pairs,
            "itm_pairs_upper_bound": pairs, "features_s": feat, "itc_s": itc, "itm_s": itm,
            "total_s": feat + itc + itm, "wall_s": None, "itm_share": itm / (feat + itc + itm),
            "extrapolated": True, "measured_on": f"{row['images']}x{row['captions']} k_test={row['k_test']}"}


def fusion_compare(model_name: str, n_images: int, pairs: int, text_len: int, precision: str, device: str,
                   repeats: int = 4) -> dict:
    """ITM re-ranking pairs/s of the fusion encoder, image tokens gathered per pair
    (``fuse(states, mask, tokens[img])``, keys/values projected per pair) against
    ``fuse(states, mask, tokens, image_index=img)`` (projected once per image): the choice a
    re-ranking loop has when it scores many captions of each image."""
    import torch

    from engine.config import load_config
    from models.vlp import VLPModel
    from tasks.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, ROOT / CONFIGS[model_name],
                      ["model.vision_weights=null", "model.text_weights=null", "tokenizer.path=null"])
    dev = torch.device(device)
    torch.manual_seed(0)
    model = VLPModel(cfg.model, momentum=False).to(dev).eval()
    v = cfg.model.vision
    n_tok = 1 + (v.img_size // v.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(n_images, n_tok, v.width, generator=g).to(dev)
    states = torch.randn(pairs, text_len, cfg.model.text.hidden_size, generator=g).to(dev)
    mask = torch.ones(pairs, text_len, dtype=torch.long, device=dev)
    img = torch.arange(pairs, device=dev) % n_images
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    out = {"model": model_name, "precision": precision, "images": n_images, "pairs": pairs, "image_tokens": n_tok}
    variants = {"gathered": lambda: model.fuse(states, mask, tokens[img]),
                "image_index": lambda: model.fuse(states, mask, tokens, image_index=img)}
    best = {name: float("inf") for name in variants}
    with torch.no_grad(), amp:
        for fn in variants.values():
            fn()
        for _ in range(repeats):  # alternate the variants, against drifting machine load
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - t0)
    for name in variants:
        out[f"{name}_pairs_per_s"] = pairs / best[name]
    out["speedup"] = out["image_index_pairs_per_s"] / out["gathered_pairs_per_s"]
    print(f"{model_name:14s} {precision:5s} fusion re-ranking {pairs} pairs over {n_images} images: "
          f"{out['gathered_pairs_per_s']:.1f} pairs/s gathered, {out['image_index_pairs_per_s']:.1f} pairs/s with "
          f"image_index ({out['speedup']:.2f}x)", flush=True)
    return out


def table(rows: list[dict]) -> str:
    head = "| model | precision | images x captions | k_test | ITM pairs | features s | ITC s | ITM s | total s | ITM share | note |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        note = f"extrapolated from {r['measured_on']}" if r["extrapolated"] else "measured"
        out.append(f"| {r['model']} | {r['precision']} | {r['images']} x {r['captions']} | {r['k_test']} | "
                   f"{r['itm_pairs']} | {r['features_s']:.1f} | {r['itc_s']:.2f} | {r['itm_s']:.1f} | "
                   f"{r['total_s']:.1f} | {100 * r['itm_share']:.0f}% | {note} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["demo"], choices=list(CONFIGS))
    ap.add_argument("--images", type=int, default=1000, help="images in the synthetic split")
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--k-test", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--target-images", type=int, default=1000, help="extrapolate smaller runs to this many images")
    ap.add_argument("--target-k-test", nargs="+", type=int, default=[128, 256], help="k_test values to extrapolate to")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=64, help="images/captions per encoder batch")
    ap.add_argument("--itm-batch", type=int, default=256, help="pairs per fusion call")
    ap.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every k_test this many times (alternating order) and keep the fastest")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--fusion-compare", type=int, default=0, metavar="PAIRS",
                    help="also time PAIRS re-ranking pairs (over --batch images) with image tokens gathered per "
                         "pair vs VLPModel.fuse(image_index=...)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/eval_throughput.json"))
    args = ap.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows: list[dict] = []
    all_runs: list[dict] = []
    for m in args.models:
        runs = measure(m, args.images, args.captions_per_image, args.k_test, args.precision, args.batch,
                       args.itm_batch, args.device, args.workers, args.rounds)
        all_runs += runs
        measured = [min((r for r in runs if r["k_test"] == k), key=lambda r: r["total_s"]) for k in args.k_test]
        rows += measured
        if args.images < args.target_images:
            biggest = max(measured, key=lambda r: r["k_test"])
            rows += [extrapolate(biggest, args.target_images, args.captions_per_image, k) for k in args.target_k_test]
    fusion = [fusion_compare(m, args.batch, args.fusion_compare, 30, args.precision, args.device)
              for m in args.models] if args.fusion_compare else []
    print()
    print(table(rows))
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "fusion_compare": fusion, "all_rounds": all_runs}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
