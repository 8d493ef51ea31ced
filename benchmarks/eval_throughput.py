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

``--rerank-compare`` measures instead the cost of one re-ranked pair at the paper's retrieval
settings (ViT-B/16 384 px + BERT-base 6 + 6, ``configs/retrieval_coco.yaml``), one image against
``--rerank-k-test`` captions per call: the fusion with the image tokens gathered per pair (the
cross-attention keys/values projected per pair, as the evaluator did before) against
``tasks.retrieval_eval.itm_match_scores`` (projected once per image), time and FLOPs per pair. With
``--albef-root`` (a local salesforce/ALBEF checkout whose ``models/xbert.py`` imports under the
installed ``transformers``, e.g. 4.57 in a separate virtual environment) it also builds ALBEF's
retrieval model with its own random initialisation, loads the same weights into ours
(``models.loading``), runs ALBEF's ``evaluation()`` and our evaluator on a small random split and
compares the re-ranked scores and rankings, and times the body of ALBEF's re-ranking loop:

    python benchmarks/eval_throughput.py --rerank-compare --rerank-k-test 128 256 --rounds 3 --threads 1 \
        --albef-root /path/to/ALBEF   # a checkout of salesforce/ALBEF; run with the Python that can import ALBEF's code
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
from typing import Optional

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
            batch: int, itm_batch: int, device: str, workers: int, rounds: int = 1,
            kv_paths: tuple[str, ...] = ("shared",)) -> list[dict]:
    """Time the evaluator for each ``k_test`` on one synthetic split; one row per ``k_test``, re-ranking
    path and round (rounds alternate the order of the ``k_test`` values and of the paths, against
    drifting machine load). ``kv_paths``: ``shared`` is the evaluator as it is (cross-attention
    keys/values once per image); ``per_pair`` swaps in :func:`gathered_itm_scores` (once per pair)."""
    import torch

    from tasks import retrieval_eval

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
        model = VLPModel(cfg.model).to(dev).eval()
        transform = build_transform(size, False, cfg.data.transform)
        amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
        t_text, t_image = encoder_times(model, data, tokenizer, transform, cfg.tokenizer.max_length, batch, dev, amp)
        shared = retrieval_eval.itm_match_scores
        runs = [(k, path) for k in k_tests for path in kv_paths]
        for rnd in range(rounds):
            for k, path in (runs if rnd % 2 == 0 else runs[::-1]):
                ecfg = RetrievalEvalConfig(k_test=k, batch_size=batch, itm_batch_size=itm_batch, progress=False,
                                           save_ranked=False)
                ev = RetrievalEvaluator(data, tokenizer, ecfg, transform, cfg.tokenizer.max_length, dev, workers, amp)
                retrieval_eval.itm_match_scores = shared if path == "shared" else gathered_itm_scores
                try:
                    t0 = time.perf_counter()
                    res = ev.run(model)
                    wall = time.perf_counter() - t0
                finally:
                    retrieval_eval.itm_match_scores = shared
                tm = res.timings
                rows.append({"model": model_name, "precision": precision, "kv": path, "images": data.num_images,
                             "captions": data.num_texts, "k_test": k, "itm_pairs": res.num_pairs,
                             "itm_pairs_upper_bound": (data.num_images + data.num_texts) * k,
                             "features_s": tm["features"], "itc_s": tm["itc"], "itm_s": tm["itm"],
                             "total_s": tm["total"], "wall_s": wall, "itm_share": tm["itm"] / tm["total"],
                             "itm_pairs_per_s": res.num_pairs / max(tm["itm"], 1e-9),
                             "text_encode_s": t_text, "image_encode_s": t_image,
                             "threads": torch.get_num_threads(), "extrapolated": False, "round": rnd})
                print(f"{model_name:14s} {precision:5s} {path:8s} {data.num_images}x{data.num_texts} k_test={k:4d}: total {tm['total']:8.1f} s "
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
    model = VLPModel(cfg.model).to(dev).eval()
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


# ------------------------------------------------------------------------------ re-ranking: old / new / ALBEF
RERANK_CONFIG = "configs/retrieval_coco.yaml"
# ALBEF's retrieval ViT (models/model_retrieval.py: a DeiT-layout ViT-B/16, LayerNorm eps 1e-6): the
# same FLOPs as the CLIP layout of the config, and the layout an ALBEF state dict loads into.
ALBEF_VIT = ["model.vision.pre_norm=false", "model.vision.act=gelu", "model.vision.layer_norm_eps=1e-6"]


def rerank_flops(text_cfg, n_tokens: int, width: int, text_len: int) -> dict[str, float]:
    """Analytic FLOPs of the fusion encoder + ITM head for one re-ranked (image, caption) pair
    (1 multiply-add = 2 FLOPs; attention included; norms, softmax, GELU left out): ``kv`` is the
    cross-attention key/value projections of the image tokens (made once per pair when the tokens are
    gathered per pair, once per image when shared), ``rest`` everything else."""
    h, inter, L, n = text_cfg.hidden_size, text_cfg.intermediate_size, text_len, n_tokens
    layers = text_cfg.num_fusion_layers
    self_attn = 2 * (4 * L * h * h + 2 * L * L * h)
    cross_q_out_attn = 2 * (2 * L * h * h + 2 * L * n * h)
    ffn = 2 * 2 * L * h * inter
    return {"kv": layers * 2 * 2 * n * width * h, "rest": layers * (self_attn + cross_q_out_attn + ffn) + 2 * h * 2}


def gathered_itm_scores(model, states, mask, tokens, img):
    """The re-ranking fusion before keys/values were shared: the image tokens gathered per pair, so
    each image's cross-attention keys/values are projected once per pair (kept here only for the
    comparison; the evaluator uses ``tasks.retrieval_eval.itm_match_scores``)."""
    return model.itm_logits(model.fuse(states, mask, tokens[img]))[:, 1].float()


def import_albef(root: Path):
    """ALBEF's retrieval model class and its own ``evaluation()`` (``Retrieval.py``) from a local
    salesforce/ALBEF checkout at ``root``. ALBEF's package is also called ``models``: it is imported
    while this project's ``models`` modules are set aside, then kept as ``albef_models.*``.
    ``evaluation()`` is compiled from ``Retrieval.py`` alone (its training-script imports are not
    needed) with the names it uses; single process."""
    import ast
    import datetime
    import importlib
    import types

    import numpy as np
    import torch
    import torch.nn.functional as F

    root = Path(root)
    ours = {k: m for k, m in sys.modules.items() if k in ("models", "utils") or k.startswith("models.")}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, str(root))
    try:
        model_retrieval = importlib.import_module("models.model_retrieval")
        utils = importlib.import_module("utils")
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if k in ("models", "utils") or k.startswith("models.")]:
            sys.modules["albef_" + k] = sys.modules.pop(k)
        sys.modules.update(ours)
    tree = ast.parse((root / "Retrieval.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "evaluation")
    names = {"torch": torch, "F": F, "utils": utils, "time": time, "datetime": datetime, "np": np,
             "dist": torch.distributed, "args": types.SimpleNamespace(distributed=False)}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(root / "Retrieval.py"), "exec"), names)
    return model_retrieval.ALBEF, names["evaluation"]


def build_rerank_models(albef_root: Optional[str], seed: int = 0):
    """Our model at the paper's retrieval settings (ViT-B/16 384 px + BERT-base 6 + 6) and, with
    ``albef_root``, ALBEF's retrieval model with its own random initialisation, loaded into ours
    (``models.loading``; momentum copies and queues, the training objective's part, not loaded)."""
    import torch

    from engine.config import load_config
    from models.loading import load_checkpoint_into
    from models.vlp import VLPModel
    from tasks.retrieval import RetrievalConfig

    cfg = load_config(RetrievalConfig, ROOT / RERANK_CONFIG, ALBEF_VIT + ["loss.queue_size=0"])
    torch.manual_seed(seed)
    ours = VLPModel(cfg.model).eval()
    albef = evaluation = None
    if albef_root:
        ALBEF, evaluation = import_albef(Path(albef_root))
        v = cfg.model.vision
        albef_cfg = {"distill": False, "embed_dim": cfg.model.embed_dim, "vision_width": v.width,
                     "image_res": v.img_size, "bert_config": str(Path(albef_root) / "configs/config_bert.json"),
                     "temp": cfg.model.temp, "queue_size": 16, "momentum": cfg.loss.momentum}
        torch.manual_seed(seed)
        albef = ALBEF(config=albef_cfg).eval()
        load_checkpoint_into(ours, {"model": albef.state_dict()}, source="ALBEF (random init)")
        for name in ("visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m"):
            delattr(albef, name)  # evaluation() does not use the momentum copies
        albef.model_pairs = []
    return cfg, ours, albef, evaluation


def albef_i2t_scores(albef, states, mask, image_tokens):
    """The body of ALBEF's image-to-text re-ranking loop (``Retrieval.py: evaluation``) for one
    image and its candidate captions: the image tokens repeated per caption."""
    import torch

    k = states.shape[0]
    encoder_output = image_tokens.repeat(k, 1, 1)
    encoder_att = torch.ones(encoder_output.size()[:-1], dtype=torch.long)
    output = albef.text_encoder(encoder_embeds=states, attention_mask=mask, encoder_hidden_states=encoder_output,
                                encoder_attention_mask=encoder_att, return_dict=True, mode="fusion")
    return albef.itm_head(output.last_hidden_state[:, 0, :])[:, 1]


class WordTokenizer:
    """One id per word of ``WORDS`` (the synthetic captions' words) between ``[CLS]`` = 1 and
    ``[SEP]`` = 2, pad 0; called like a Hugging Face tokenizer (``padding="longest"`` or
    ``"max_length"``, truncation to ``max_length``, PyTorch tensors), the calls our evaluator and
    ALBEF's ``evaluation()`` make. Independent of the ``transformers`` version."""

    def __init__(self) -> None:
        self.vocab = {w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}

    def __len__(self) -> int:
        return len(self.vocab) + 3

    def __call__(self, texts, padding="longest", truncation=True, max_length=30, return_tensors="pt"):
        import torch
        from transformers import BatchEncoding

        rows = [[1] + [self.vocab[w] for w in t.split()][: max_length - 2] + [2] for t in texts]
        n = max_length if padding == "max_length" else max(map(len, rows))
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})


class _OneBatchLoader:
    """What ALBEF's ``evaluation()`` reads from its data loader: ``dataset.text``, ``dataset.image``
    and batches of ``(images, ids)`` (here one batch)."""

    def __init__(self, images, texts, image_names) -> None:
        import types

        self.images = images
        self.dataset = types.SimpleNamespace(text=list(texts), image=list(image_names))

    def __iter__(self):
        import torch

        return iter([(self.images, torch.arange(self.images.shape[0]))])


def rerank_agreement(cfg, ours, albef, evaluation, n_images: int, k: int) -> dict:
    """ALBEF's own ``evaluation()`` and our evaluator (keys/values shared, and per pair) on the same
    random split (``n_images`` random images, 5 random captions each, the same pixels and token
    ids): the re-ranked scores of both directions and the top-``k`` rankings."""
    import contextlib as cl
    import io

    import numpy as np
    import torch

    from datasets.formats import load_image
    from datasets.transforms import build_transform
    from tasks import retrieval_eval
    from tasks.retrieval_eval import RetrievalEvalConfig, RetrievalEvaluator

    size = cfg.model.vision.img_size
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_split(Path(tmp), n_images, 5, size)
        tok = WordTokenizer()
        tf = build_transform(size, False, cfg.data.transform)
        ecfg = RetrievalEvalConfig(k_test=k, batch_size=n_images, itm_batch_size=256, progress=False,
                                   save_ranked=False, cache_image_tokens=True)
        dev = torch.device("cpu")
        new = RetrievalEvaluator(data, tok, ecfg, tf, cfg.tokenizer.max_length, dev).run(ours)
        saved = retrieval_eval.itm_match_scores
        retrieval_eval.itm_match_scores = gathered_itm_scores
        try:
            old = RetrievalEvaluator(data, tok, ecfg, tf, cfg.tokenizer.max_length, dev).run(ours)
        finally:
            retrieval_eval.itm_match_scores = saved
        images = torch.stack([tf(load_image(f)) for f in data.image_files])
        loader = _OneBatchLoader(images, data.texts, data.image_names)
        with cl.redirect_stdout(io.StringIO()):
            s_i2t, s_t2i = evaluation(albef, loader, tok, dev, {"k_test": k})
    s_i2t, s_t2i = torch.from_numpy(np.asarray(s_i2t)), torch.from_numpy(np.asarray(s_t2i))
    out = {"images": n_images, "captions": data.num_texts, "k_test": k}
    for name, res in (("shared", new), ("per_pair", old)):
        diffs, same = [], True
        for ranked, scores, ref in ((res.i2t_ranked, res.i2t_scores, s_i2t), (res.t2i_ranked, res.t2i_scores, s_t2i)):
            diffs.append(float((scores - ref.gather(1, ranked)).abs().max()))
            ref_rank = torch.sort(ref, dim=1, descending=True, stable=True).indices[:, :ranked.shape[1]]
            same &= bool(torch.equal(ref_rank, ranked))
        out[f"{name}_vs_albef_max_abs_diff"] = max(diffs)
        out[f"{name}_vs_albef_same_ranking"] = same
    out["shared_vs_per_pair_max_abs_diff"] = max(float((new.i2t_scores - old.i2t_scores).abs().max()),
                                                 float((new.t2i_scores - old.t2i_scores).abs().max()))
    out["shared_vs_per_pair_same_ranking"] = bool(torch.equal(new.i2t_ranked, old.i2t_ranked)
                                                  and torch.equal(new.t2i_ranked, old.t2i_ranked))
    out["score_range"] = [float(s_i2t[s_i2t > -100].min()), float(s_i2t[s_i2t > -100].max())]
    return out


def rerank_compare(k_tests: list[int], rounds: int, albef_root: Optional[str], text_len: int = 30,
                   check_images: int = 8, check_k: int = 6) -> dict:
    """Time and FLOPs per re-ranked pair at the paper's retrieval settings, one image-to-text query
    (1 image x ``k`` candidate captions) per call: the image tokens gathered per pair (before),
    ``tasks.retrieval_eval.itm_match_scores`` (keys/values once per image, now) and, with
    ``albef_root``, the body of ALBEF's own re-ranking loop on ALBEF's model holding the same
    weights. Variants alternate within each round and the fastest round is kept. FLOPs are counted
    (``torch.utils.flop_counter``, one call) and analytic (:func:`rerank_flops`); the counter does not
    see the CPU kernel of ``scaled_dot_product_attention`` (ours), so its analytic attention FLOPs are
    added to our counts (ALBEF's attention is plain matrix products and counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tasks.retrieval_eval import itm_match_scores

    cfg, ours, albef, evaluation = build_rerank_models(albef_root)
    v, t = cfg.model.vision, cfg.model.text
    n_tok = 1 + (v.img_size // v.patch_size) ** 2
    fl = rerank_flops(t, n_tok, v.width, text_len)
    sdpa = t.num_fusion_layers * 2 * 2 * (text_len * text_len + text_len * n_tok) * t.hidden_size
    out: dict = {"config": RERANK_CONFIG, "overrides": ALBEF_VIT, "image_tokens": n_tok, "text_len": text_len,
                 "analytic_gflop_per_pair": {"per_pair_kv": (fl["kv"] + fl["rest"]) / 1e9,
                                             "kv_share": fl["kv"] / (fl["kv"] + fl["rest"]),
                                             "rest": fl["rest"] / 1e9},
                 "rows": [], "all_rounds": []}
    with torch.no_grad():
        if albef is not None:
            t0 = time.perf_counter()
            out["agreement"] = rerank_agreement(cfg, ours, albef, evaluation, check_images, check_k)
            out["agreement"]["seconds"] = time.perf_counter() - t0
            print(f"agreement with ALBEF's evaluation(): {out['agreement']}", flush=True)
        g = torch.Generator().manual_seed(0)
        for k in k_tests:
            image = torch.randn(1, n_tok, v.width, generator=g)
            states = torch.randn(k, text_len, t.hidden_size, generator=g)
            mask = torch.ones(k, text_len, dtype=torch.long)
            img = torch.zeros(k, dtype=torch.long)
            variants = {"per_pair": lambda: gathered_itm_scores(ours, states, mask, image, img),
                        "shared": lambda: itm_match_scores(ours, states, mask, image, img)}
            if albef is not None:
                variants["albef"] = lambda: albef_i2t_scores(albef, states, mask, image)
            scores, counted, best = {}, {}, {}
            for name, fn in variants.items():  # first call: FLOP count (and warm-up)
                with FlopCounterMode(display=False) as fc:
                    scores[name] = fn().float()
                counted[name] = fc.get_total_flops() + (sdpa * k if name != "albef" else 0)
                best[name] = float("inf")
            for rnd in range(rounds):
                names = list(variants) if rnd % 2 == 0 else list(variants)[::-1]
                for name in names:
                    t0 = time.perf_counter()
                    variants[name]()
                    dt = time.perf_counter() - t0
                    best[name] = min(best[name], dt)
                    out["all_rounds"].append({"k_test": k, "variant": name, "round": rnd, "seconds": dt,
                                              "loadavg": os.getloadavg()[0]})
                    print(f"  k_test {k:4d} {name:9s} round {rnd}: {dt:7.2f} s ({1e3 * dt / k:.1f} ms/pair)", flush=True)
            analytic = {"per_pair": fl["kv"] + fl["rest"], "albef": fl["kv"] + fl["rest"],
                        "shared": fl["rest"] + fl["kv"] / k}
            row = {"k_test": k, "pairs": k}
            for name in variants:
                row[name] = {"s_per_pair": best[name] / k, "pairs_per_s": k / best[name],
                             "gflop_per_pair_counted": counted[name] / k / 1e9,
                             "gflop_per_pair_analytic": analytic[name] / 1e9,
                             "gflop_per_s": counted[name] / best[name] / 1e9}
            row["speedup_shared_vs_per_pair"] = best["per_pair"] / best["shared"]
            row["max_abs_diff_shared_vs_per_pair"] = float((scores["shared"] - scores["per_pair"]).abs().max())
            if albef is not None:
                row["speedup_shared_vs_albef"] = best["albef"] / best["shared"]
                row["max_abs_diff_shared_vs_albef"] = float((scores["shared"] - scores["albef"]).abs().max())
                row["max_abs_diff_per_pair_vs_albef"] = float((scores["per_pair"] - scores["albef"]).abs().max())
                row["same_ranking_as_albef"] = {n: bool(torch.equal(torch.sort(scores[n], descending=True, stable=True).indices,
                                                                    torch.sort(scores["albef"], descending=True, stable=True).indices))
                                                for n in ("shared", "per_pair")}
            out["rows"].append(row)
            print(f"k_test {k}: " + ", ".join(f"{n} {1e3 * row[n]['s_per_pair']:.1f} ms/pair "
                                              f"({row[n]['gflop_per_pair_counted']:.2f} GFLOP/pair)" for n in variants)
                  + f"; shared {row['speedup_shared_vs_per_pair']:.2f}x faster than per pair", flush=True)
    return out


def rerank_table(res: dict) -> str:
    head = ("| k_test | path | ms / pair | pairs/s | GFLOP/pair (counted) | GFLOP/pair (analytic) | GFLOP/s | "
            "vs per pair |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    labels = {"albef": "ALBEF `evaluation()` (per pair)", "per_pair": "ours before (gathered per pair)",
              "shared": "ours now (`image_index`, once per image)"}
    for row in res["rows"]:
        for name in ("albef", "per_pair", "shared"):
            if name in row:
                r = row[name]
                lines.append(f"| {row['k_test']} | {labels[name]} | {1e3 * r['s_per_pair']:.1f} | {r['pairs_per_s']:.2f} | "
                             f"{r['gflop_per_pair_counted']:.2f} | {r['gflop_per_pair_analytic']:.2f} | "
                             f"{r['gflop_per_s']:.1f} | {row['per_pair']['s_per_pair'] / r['s_per_pair']:.2f}x |")
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows: list[dict]) -> str:
    head = ("| model | precision | re-ranking keys/values | images x captions | k_test | ITM pairs | features s | ITC s | "
            "ITM s | total s | ITM share | note |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        note = f"extrapolated from {r['measured_on']}" if r["extrapolated"] else "measured"
        kv = {"shared": "once per image", "per_pair": "once per pair"}[r.get("kv", "per_pair")]
        out.append(f"| {r['model']} | {r['precision']} | {kv} | {r['images']} x {r['captions']} | {r['k_test']} | "
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
    ap.add_argument("--kv-paths", nargs="+", default=["shared"], choices=["shared", "per_pair"],
                    help="re-ranking paths to time: shared = the evaluator (cross-attention keys/values once per "
                         "image), per_pair = image tokens gathered per pair (as before; for the comparison)")
    ap.add_argument("--fusion-compare", type=int, default=0, metavar="PAIRS",
                    help="also time PAIRS re-ranking pairs (over --batch images) with image tokens gathered per "
                         "pair vs VLPModel.fuse(image_index=...)")
    ap.add_argument("--rerank-compare", action="store_true",
                    help="instead of the evaluation timing: time and count FLOPs per re-ranked pair at the paper's "
                         "retrieval settings (ViT-B/16 384 px + BERT-base 6+6), one image x K captions per call, "
                         "keys/values shared per image vs gathered per pair (and ALBEF's code with --albef-root)")
    ap.add_argument("--rerank-k-test", nargs="+", type=int, default=[128, 256], metavar="K",
                    help="candidates per query for --rerank-compare")
    ap.add_argument("--albef-root", default=None,
                    help="local salesforce/ALBEF checkout importable here (--rerank-compare): load the same random "
                         "weights into ALBEF's model, run its evaluation() re-ranking and time its loop body")
    ap.add_argument("--check-images", type=int, default=8,
                    help="images (5 captions each) of the split on which ALBEF's evaluation() and ours are compared")
    ap.add_argument("--check-k-test", type=int, default=6, help="k_test of that comparison")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/results/eval_throughput.json, "
                                                "or rerank_compare.json with --rerank-compare)")
    args = ap.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.rerank_compare:
        res = rerank_compare(args.rerank_k_test, args.rounds, args.albef_root, check_images=args.check_images,
                             check_k=args.check_k_test)
        print()
        print(rerank_table(res))
        import transformers
        meta = {"machine": cpu_model(), "cpus": os.cpu_count(),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads(), "python": sys.executable,
                "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(), "date": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        out = Path(args.out or ROOT / "benchmarks/results/rerank_compare.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, **res}, indent=2))
        print(f"wrote {out}")
        return
    rows: list[dict] = []
    all_runs: list[dict] = []
    for m in args.models:
        runs = measure(m, args.images, args.captions_per_image, args.k_test, args.precision, args.batch,
                       args.itm_batch, args.device, args.workers, args.rounds, tuple(args.kv_paths))
        all_runs += runs
        for path in args.kv_paths:
            measured = [min((r for r in runs if r["k_test"] == k and r["kv"] == path), key=lambda r: r["total_s"])
                        for k in args.k_test]
            rows += measured
            if args.images < args.target_images:
                biggest = max(measured, key=lambda r: r["k_test"])
                rows += [extrapolate(biggest, args.target_images, args.captions_per_image, k) for k in args.target_k_test]
    fusion = [fusion_compare(m, args.batch, args.fusion_compare, 30, args.precision, args.device)
              for m in args.models] if args.fusion_compare else []
    print()
    print(table(rows))
    meta = {"machine": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out or ROOT / "benchmarks/results/eval_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "fusion_compare": fusion, "all_rounds": all_runs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
