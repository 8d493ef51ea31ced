"""Pre-training input pipeline alone: images/s per loader worker, and what a GPU rate needs.

Measures what one DataLoader worker does for pre-training (JPEG decode, augmentation, caption
choice, then per batch tokenisation, MLM masking and collation) for both readers: the JSON reader
(``datasets.formats.PretrainDataset``, one file per image) and the tar-shard reader
(``datasets.shards.ShardPretrainDataset``). Inputs are photo-sized JPEGs made from the photographs
bundled with scikit-image (resized, with a little sensor-like grain so that the files compress like
photographs: the bits per pixel are recorded), at 640x480 and 2000x1500 by default.

Parts (every variant alternates with the others in each round; each keeps its fastest round):

- ``stages``: per image, the full decode (``datasets.formats.load_image``), a reduced-size JPEG
  decode (PIL ``Image.draft``: the DCT scaling of libjpeg, 1/2, 1/4 or 1/8, chosen so that the
  smallest crop the training transform can take is still at least ``img_size`` pixels, i.e. never
  upsampled), the training transform (RandomResizedCrop + RandAugment + normalise) on each, and per
  batch the collator (tokenise + mask + stack). What the reduced decode changes in the training
  input is recorded as the PSNR between the two decodes' smallest crop (the same region of the
  photograph, where the reduced decode keeps the fewest pixels) resized to ``img_size``.
- ``readers``: end to end through each reader in this process (no DataLoader), with and without
  the reduced decode for the shard reader (the JSON reader's decode is ``load_image``; the
  reduced variant swaps it for the same decode with ``draft``).
- ``loader``: a DataLoader with ``--workers`` workers: time to the first batch of an epoch with new
  workers per epoch and with persistent workers (``train.persistent_workers``, the default), through
  the training loader itself (``tasks.train_data.SampledTrainData``).

Per-worker rates assume one torch thread per worker (DataLoader workers use 1) and one core per
worker. The table of workers needed per GPU rate (``--rates``) divides by the measured per-worker
rate; on a machine whose cores are shared the rates are lower bounds.

    python benchmarks/loader_throughput.py --out benchmarks/results/loader_throughput.json
    python benchmarks/loader_throughput.py --quick        # a few images, one round (smoke run)
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from datasets.formats import PretrainCollator, PretrainDataset, load_image  # noqa: E402
from datasets.shards import ShardPretrainDataset, write_shards  # noqa: E402
from datasets.text import train_wordpiece_tokenizer  # noqa: E402
from datasets.transforms import TransformConfig, apply_seeded, build_transform  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "motorcycle_left")
WORDS = {
    "adj": "small large red blue green wooden old young smiling white black bright dark busy quiet".split(),
    "noun": "man woman dog cat car table street tree bicycle building child horse boat train window".split(),
    "verb": "sitting standing walking parked lying running waiting resting".split(),
    "place": "park beach road kitchen field river market station garden room".split(),
}


def _photo_sources() -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # not bundled with this scikit-image (would need a download): skip
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    if not out:
        raise RuntimeError("no scikit-image photographs available (pip install scikit-image)")
    return out


def make_photo(src: np.ndarray, size: tuple[int, int], grain: float, rng: np.random.Generator) -> Image.Image:
    """``src`` cropped to the aspect of ``size`` (w, h), resized (Lanczos) and given Gaussian grain."""
    w, h = size
    sh, sw = src.shape[:2]
    if sw / sh > w / h:
        cw, ch = int(sh * w / h), sh
    else:
        cw, ch = sw, int(sw * h / w)
    x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    img = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.LANCZOS)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0.0, grain, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def caption(rng: random.Random) -> str:
    a, n, v, p = (WORDS[k] for k in ("adj", "noun", "verb", "place"))
    return (f"a {rng.choice(a)} {rng.choice(n)} {rng.choice(v)} near a {rng.choice(a)} {rng.choice(n)} "
            f"in the {rng.choice(p)} with a {rng.choice(a)} {rng.choice(n)} behind it")


def make_data(root: Path, sizes: list[tuple[int, int]], n: int, quality: int, grain: float, seed: int) -> dict:
    """Per size: ``n`` JPEGs, a JSON annotation file and tar shards; returns their description."""
    sources = _photo_sources()
    rng, crng = np.random.default_rng(seed), random.Random(seed)
    out = {}
    for w, h in sizes:
        key = f"{w}x{h}"
        d = root / key
        (d / "images").mkdir(parents=True, exist_ok=True)
        records, nbytes = [], 0
        for i in range(n):
            img = make_photo(sources[i % len(sources)], (w, h), grain, rng)
            path = d / "images" / f"{i:05d}.jpg"
            img.save(path, quality=quality)
            nbytes += path.stat().st_size
            records.append({"image": f"images/{i:05d}.jpg", "caption": [caption(crng), caption(crng)]})
        ann = d / "pretrain.json"
        ann.write_text(json.dumps(records))
        write_shards(records, d, d / "shards", samples_per_shard=max(1, n // 2))
        out[key] = {"size": (w, h), "ann": str(ann), "root": str(d), "shards": str(d / "shards" / "index.json"),
                    "images": n, "mean_file_kib": nbytes / n / 1024, "bits_per_pixel": 8 * nbytes / n / (w * h)}
    return out


def draft_factor(w: int, h: int, img_size: int, scale_min: float, max_ratio: float = 4 / 3) -> int:
    """The largest JPEG DCT scaling 1/f (f in 1, 2, 4, 8) at which the smallest crop of
    RandomResizedCrop(scale=(scale_min, 1), ratio up to ``max_ratio``) keeps both sides at least
    ``img_size`` pixels: then the reduced decode never makes the transform upsample."""
    smallest = math.sqrt(scale_min * w * h / max_ratio)
    f = 1
    while f < 8 and smallest / (2 * f) >= img_size:
        f *= 2
    return f


def load_image_draft(path_or_bytes, img_size: int, scale_min: float) -> tuple[Image.Image, int]:
    """Decode at the reduced size of :func:`draft_factor` (JPEG only); returns (RGB image, f)."""
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as img:
        f = draft_factor(img.width, img.height, img_size, scale_min) if img.format == "JPEG" else 1
        if f > 1:
            img.draft("RGB", (math.ceil(img.width / f), math.ceil(img.height / f)))
        img.load()
        return img.convert("RGB"), f


def _best_rate(fn, n_items: int, rounds_results: list) -> float:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    rounds_results.append(n_items / dt)
    return n_items / dt


def _smallest_crop(img: Image.Image, img_size: int, scale_min: float, max_ratio: float = 4 / 3) -> torch.Tensor:
    """The centred crop of the smallest area and most extreme aspect RandomResizedCrop can take,
    resized (bicubic, antialiased) to ``img_size`` x ``img_size``, as a [0, 1] tensor: the training
    input where a reduced decode loses most detail."""
    from torchvision.transforms import functional as TF

    w, h = img.size
    area = scale_min * w * h
    cw, ch = min(w, round(math.sqrt(area * max_ratio))), min(h, round(math.sqrt(area / max_ratio)))
    crop = TF.resized_crop(img, (h - ch) // 2, (w - cw) // 2, ch, cw, [img_size, img_size],
                           interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.to_tensor(crop)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def stages(data: dict, img_size: int, tcfg: TransformConfig, tokenizer, batch: int, rounds: int) -> dict:
    """Per-stage images/s (full vs reduced decode, transform on each, collator per batch)."""
    transform = build_transform(img_size, True, tcfg)
    out = {}
    for key, d in data.items():
        paths = sorted(Path(d["root"], "images").glob("*.jpg"))
        res = {k: [] for k in ("decode", "decode_draft", "transform", "transform_draft", "collate")}
        full = [load_image(p) for p in paths]
        drafted = [load_image_draft(str(p), img_size, tcfg.scale_min) for p in paths]
        factor = drafted[0][1]
        crng = random.Random(0)
        samples = [{"caption": caption(crng), "image": torch.zeros(3, img_size, img_size), "image_idx": i, "seed": i,
                    "index": i, "n_bad": 0}
                   for i in range(batch)]
        collator = PretrainCollator(tokenizer, 30, 0.15)
        for _ in range(rounds):  # variants alternate inside every round
            _best_rate(lambda: [load_image(p) for p in paths], len(paths), res["decode"])
            _best_rate(lambda: [load_image_draft(str(p), img_size, tcfg.scale_min) for p in paths], len(paths),
                       res["decode_draft"])
            _best_rate(lambda: [apply_seeded(transform, im, i) for i, im in enumerate(full)], len(paths),
                       res["transform"])
            _best_rate(lambda: [apply_seeded(transform, im, i) for i, (im, _) in enumerate(drafted)], len(paths),
                       res["transform_draft"])
            _best_rate(lambda: [collator(samples) for _ in range(4)], 4 * batch, res["collate"])
        quality = [psnr(_smallest_crop(a, img_size, tcfg.scale_min), _smallest_crop(b, img_size, tcfg.scale_min), 1.0)
                   for a, (b, _) in zip(full, drafted)]
        best = {k: max(v) for k, v in res.items()}
        per_image = {k: 1.0 / v for k, v in best.items()}
        out[key] = {
            "images_per_s": best, "all_rounds": res, "draft_factor": factor,
            "drafted_size": drafted[0][0].size, "psnr_db_full_vs_draft_min": min(quality),  # smallest crop, same region from both decodes
            "psnr_db_full_vs_draft_mean": sum(quality) / len(quality),
            "pipeline_images_per_s": 1.0 / (per_image["decode"] + per_image["transform"] + per_image["collate"]),
            "pipeline_draft_images_per_s": 1.0 / (per_image["decode_draft"] + per_image["transform_draft"]
                                                  + per_image["collate"]),
        }
    return out


class _DraftShards(ShardPretrainDataset):
    """The shard reader with the reduced-size decode (for the measurement only)."""

    draft_img_size, draft_scale_min = 256, 0.5

    def _sample(self, index, name, parts):
        import datasets.shards as S

        original = S._decode_image
        S._decode_image = lambda data, *_a, **_k: load_image_draft(data, self.draft_img_size, self.draft_scale_min)[0]
        try:
            return super()._sample(index, name, parts)
        finally:
            S._decode_image = original


class _DraftJson(PretrainDataset):
    """The JSON reader with the reduced-size decode (for the measurement only)."""

    draft_img_size, draft_scale_min = 256, 0.5

    def __getitem__(self, index):
        import datasets.formats as FM

        original = FM.load_image
        FM.load_image = lambda p, *_a, **_k: load_image_draft(os.fspath(p), self.draft_img_size, self.draft_scale_min)[0]
        try:
            return super().__getitem__(index)
        finally:
            FM.load_image = original


def _json_dataset(d: dict, transform, draft: bool):
    cls = _DraftJson if draft else PretrainDataset
    return cls([d["ann"]], d["root"], transform, 30, "albef", 0)


def _shard_dataset(d: dict, transform, draft: bool, batch: int):
    cls = _DraftShards if draft else ShardPretrainDataset
    ds = cls([d["shards"]], transform, 30, "albef", 0, 16)
    ds.configure(batch, 1, 0, 1)
    ds.set_position(0, 0)
    return ds


def readers(data: dict, img_size: int, tcfg: TransformConfig, tokenizer, batch: int, rounds: int) -> dict:
    """End to end per reader (dataset + collator, in this process): images/s."""
    transform = build_transform(img_size, True, tcfg)
    collator = PretrainCollator(tokenizer, 30, 0.15)
    out = {}
    for key, d in data.items():
        res = {k: [] for k in ("json", "json_draft", "shards", "shards_draft")}

        def run_json(draft):
            ds = _json_dataset(d, transform, draft)
            idx = list(range(len(ds)))
            n = len(idx) // batch * batch
            for s in range(0, n, batch):
                collator([ds[i] for i in idx[s:s + batch]])
            return n

        def run_shards(draft):
            ds = _shard_dataset(d, transform, draft, batch)
            buf, n = [], 0
            for sample in ds:
                buf.append(sample)
                if len(buf) == batch:
                    collator(buf)
                    n += batch
                    buf = []
            return n

        for _ in range(rounds):
            for name, fn in (("json", lambda: run_json(False)), ("json_draft", lambda: run_json(True)),
                             ("shards", lambda: run_shards(False)), ("shards_draft", lambda: run_shards(True))):
                t0 = time.perf_counter()
                n = fn()
                res[name].append(n / (time.perf_counter() - t0))
        out[key] = {"images_per_s": {k: max(v) for k, v in res.items()}, "all_rounds": res}
    return out


def loader(data: dict, img_size: int, tcfg: TransformConfig, tokenizer, batch: int, workers: int,
           rounds: int, epochs: int) -> dict:
    """The training loader itself (``tasks.train_data.SampledTrainData``: sampler, workers, collation)
    with ``workers`` workers over the largest size: first-batch latency per epoch and images/s over
    ``epochs`` epochs, new workers per epoch vs persistent workers (``train.persistent_workers``);
    pinned memory where CUDA exists (the loader pins on a CUDA device)."""
    from engine import distributed as D
    from engine.trainer import TrainConfig
    from tasks.train_data import SampledTrainData

    key = list(data)[-1]
    d = data[key]
    transform = build_transform(img_size, True, tcfg)
    collator = PretrainCollator(tokenizer, 30, 0.15)
    ds = _json_dataset(d, transform, False)
    dist = D.DistInfo(device=torch.device("cuda")) if torch.cuda.is_available() else D.DistInfo()
    variants = [("new_workers", False), ("persistent", True)]
    res = {name: [] for name, _ in variants}
    for _ in range(rounds):
        for name, persistent in variants:
            train = TrainConfig(batch_size=batch, seed=0, persistent_workers=persistent)
            loader = SampledTrainData(ds, collator, train, dist, workers, loader_seed=0)
            firsts, t0, n = [], time.perf_counter(), 0
            for epoch in range(epochs):
                te = time.perf_counter()
                for i, (b,) in enumerate(loader.batches(epoch, 0)):
                    if i == 0:
                        firsts.append(time.perf_counter() - te)
                    n += b["image"].shape[0]
            total = time.perf_counter() - t0
            res[name].append({"first_batch_s": firsts, "images_per_s": n / total, "epochs": epochs,
                              "batches_per_epoch": loader.steps_per_epoch()})
            del loader
    best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in res.items()}
    return {"size": key, "workers": workers, "batch": batch, "best": best, "all_rounds": res,
            "pinned_memory": "on (CUDA device)" if torch.cuda.is_available() else "off (no CUDA device)"}


def workers_needed(stage_res: dict, reader_res: dict, rates: list[int]) -> list[dict]:
    rows = []
    for key in reader_res:
        for name, per_worker in reader_res[key]["images_per_s"].items():
            rows.append({"size": key, "reader": name, "images_per_s_per_worker": per_worker,
                         **{f"workers_for_{r}": math.ceil(r / per_worker) for r in rates}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["640x480", "2000x1500"], help="image sizes WxH")
    ap.add_argument("--images", type=int, default=32, help="JPEGs per size")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated files")
    ap.add_argument("--grain", type=float, default=3.0, help="std of the Gaussian grain added (0-255 scale)")
    ap.add_argument("--img-size", type=int, default=256, help="training resolution (configs/pretrain.yaml: 256)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader part (0 = skip it)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per loader measurement")
    ap.add_argument("--rates", nargs="+", type=int, default=[1000, 3000, 10000], help="GPU pairs/s to feed")
    ap.add_argument("--parts", nargs="+", default=["stages", "readers", "loader"], choices=["stages", "readers", "loader"])
    ap.add_argument("--data-dir", default=None, help="where to write the generated data (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="4 images per size, 1 round, 1 epoch (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/loader_throughput.json"))
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds, args.epochs, args.batch = 4, 1, 1, 2
    torch.set_num_threads(1)  # as in a DataLoader worker
    sizes = [tuple(int(x) for x in s.lower().split("x")) for s in args.sizes]
    tmp = None
    root = Path(args.data_dir) if args.data_dir else Path(tmp := tempfile.mkdtemp(prefix="loader_bench_"))
    load_before = os.getloadavg()
    try:
        data = make_data(root, sizes, args.images, args.quality, args.grain, 0)
        for key, d in data.items():
            print(f"{key}: {d['images']} JPEGs, {d['mean_file_kib']:.0f} KiB each, {d['bits_per_pixel']:.2f} bits/pixel",
                  flush=True)
        tok = train_wordpiece_tokenizer([caption(random.Random(i)) for i in range(200)], 400)
        tcfg = TransformConfig()
        result = {"data": {k: {x: v for x, v in d.items() if x not in ("ann", "root", "shards")} for k, d in data.items()}}
        if "stages" in args.parts:
            result["stages"] = stages(data, args.img_size, tcfg, tok, args.batch, args.rounds)
            for key, r in result["stages"].items():
                s = r["images_per_s"]
                print(f"{key} stages (images/s, 1 thread): decode {s['decode']:.1f}, decode with draft 1/{r['draft_factor']} "
                      f"{s['decode_draft']:.1f}; transform {s['transform']:.1f} / after draft {s['transform_draft']:.1f}; "
                      f"collate {s['collate']:.0f}; pipeline {r['pipeline_images_per_s']:.1f} -> "
                      f"{r['pipeline_draft_images_per_s']:.1f} with draft (PSNR full vs draft: min "
                      f"{r['psnr_db_full_vs_draft_min']:.1f} dB)", flush=True)
        if "readers" in args.parts:
            result["readers"] = readers(data, args.img_size, tcfg, tok, args.batch, args.rounds)
            for key, r in result["readers"].items():
                print(f"{key} readers (images/s per worker): " +
                      ", ".join(f"{k} {v:.1f}" for k, v in r["images_per_s"].items()), flush=True)
            result["workers_needed"] = workers_needed(result.get("stages", {}), result["readers"], args.rates)
            print("\n| size | reader | images/s per worker | " + " | ".join(f"workers for {r}/s" for r in args.rates) + " |")
            print("|---|---|---|" + "---|" * len(args.rates))
            for row in result["workers_needed"]:
                print(f"| {row['size']} | {row['reader']} | {row['images_per_s_per_worker']:.1f} | "
                      + " | ".join(str(row[f"workers_for_{r}"]) for r in args.rates) + " |")
        if "loader" in args.parts and args.workers > 0:
            result["loader"] = loader(data, args.img_size, tcfg, tok, args.batch, args.workers, args.rounds, args.epochs)
            for name, r in result["loader"]["best"].items():
                print(f"loader {result['loader']['size']} workers={args.workers} {name}: {r['images_per_s']:.1f} images/s, "
                      f"first batch per epoch {[round(x, 2) for x in r['first_batch_s']]} s", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    from PIL import features

    result["meta"] = {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)), "torch": torch.__version__,
        "pillow": Image.__version__, "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
