"""``run_finetune.py --predict`` for VQA, NLVR2, SNLI-VE and retrieval: each prints one JSON object per
prediction, through the Python API (``inference.Pipeline``). Captioning's predictor is in
``tasks/caption_generate.py``.

    --task vqa --checkpoint C --predict IMG [IMG ...] --question "Q" [--question ...] [--open-ended]
    --task nlvr2 --checkpoint C --predict LEFT RIGHT [LEFT RIGHT ...] --text "S" [--text ...]
    --task snli_ve --checkpoint C --predict IMG [IMG ...] --text "S" [--text ...]
    --task retrieval_* --checkpoint C --predict IMG [IMG ...] --text T [--text T ...]   # every pair
    --task retrieval_* --checkpoint C --predict DIR_OR_JSON --text T [--top-k K]         # a gallery
"""
from __future__ import annotations

import os
from pathlib import Path

from engine.config import ConfigError
from tasks.spec import Predictor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _files_exist(files: list[str]) -> None:
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"not found: {missing}")


def _paired(name: str, texts: list[str], n: int, what: str) -> list[str]:
    """One text for every input (``n``), or one given for all of them."""
    if len(texts) == 1:
        return texts * n
    if len(texts) != n:
        raise ConfigError(f"--{name}: give one for all {what} or one per {what[:-1]} ({n}); got {len(texts)}")
    return texts


# ---------------------------------------------------------------------- VQA
def _check_vqa(inputs: list[str], args) -> None:
    _files_exist(inputs)
    if not getattr(args, "question", None):
        raise ConfigError("--predict for VQA needs --question \"...\" (one for all images, or one per image)")


def _predict_vqa(pipeline, inputs: list[str], args) -> list[dict]:
    questions = _paired("question", args.question, len(inputs), "images")
    answers = pipeline.answer(inputs, questions, open_ended=args.open_ended)
    return [{"image": i, "question": q, "answer": a} for i, q, a in zip(inputs, questions, answers)]


VQA = Predictor(help="answer --question about each image file (JSON {image, question, answer}) with a fine-tuned "
                     "VQA --checkpoint", metavar="IMAGE", predict=_predict_vqa, check=_check_vqa,
                flags={"--question": {"action": "append", "metavar": "Q", "help": "the question (repeat: one per image)"},
                       "--open-ended": {"action": "store_true",
                                        "help": "generate the answer instead of ranking the checkpoint's answer list"}})


# ---------------------------------------------------------------------- NLVR2
def _check_nlvr2(inputs: list[str], args) -> None:
    _files_exist(inputs)
    if len(inputs) % 2:
        raise ConfigError(f"--predict for NLVR2 takes image pairs: LEFT RIGHT [LEFT RIGHT ...]; got {len(inputs)} files")
    if not getattr(args, "text", None):
        raise ConfigError("--predict for NLVR2 needs --text \"statement\" (one for all pairs, or one per pair)")


def _predict_nlvr2(pipeline, inputs: list[str], args) -> list[dict]:
    lefts, rights = inputs[0::2], inputs[1::2]
    texts = _paired("text", args.text, len(lefts), "pairs")
    out = pipeline.nlvr2(lefts, rights, texts)
    return [{"images": [l, r], "text": t, "label": label, "prob": p}
            for l, r, t, (label, p) in zip(lefts, rights, texts, out)]


NLVR2 = Predictor(help="judge --text about each LEFT RIGHT image pair (JSON {images, text, label, prob}) with a "
                       "fine-tuned NLVR2 --checkpoint", metavar="IMAGE", predict=_predict_nlvr2, check=_check_nlvr2,
                  flags={"--text": {"action": "append", "metavar": "S", "help": "the statement (repeat: one per pair)"}})


# ---------------------------------------------------------------------- SNLI-VE
def _check_snli_ve(inputs: list[str], args) -> None:
    _files_exist(inputs)
    if not getattr(args, "text", None):
        raise ConfigError("--predict for SNLI-VE needs --text \"statement\" (one for all images, or one per image)")


def _predict_snli_ve(pipeline, inputs: list[str], args) -> list[dict]:
    texts = _paired("text", args.text, len(inputs), "images")
    return [{"image": i, "text": t, "label": label, "probs": probs}
            for i, t, (label, probs) in zip(inputs, texts, pipeline.entail(inputs, texts))]


SNLI_VE = Predictor(help="judge --text against each image file: entailment, neutral or contradiction (JSON {image, "
                         "text, label, probs}) with a fine-tuned SNLI-VE --checkpoint", metavar="IMAGE",
                    predict=_predict_snli_ve, check=_check_snli_ve,
                    flags={"--text": {"action": "append", "metavar": "S",
                                      "help": "the statement (repeat: one per image)"}})


# ---------------------------------------------------------------------- retrieval
def gallery(source: str, image_root: str) -> list[str]:
    """The image files of a gallery: a folder's images (sorted; not recursive), or the images of a
    retrieval JSON (``[{"image", ...}]``, paths relative to ``data.image_root``)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"gallery {source}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    from datasets.formats import read_annotations
    records = read_annotations(source, {"image": str}, "retrieval gallery")
    files = list(dict.fromkeys(os.path.join(image_root, r["image"]) for r in records))
    _files_exist(files[:1] + files[-1:])
    return files


def _is_gallery(inputs: list[str]) -> bool:
    return len(inputs) == 1 and (os.path.isdir(inputs[0]) or inputs[0].lower().endswith(".json"))


def _check_retrieval(inputs: list[str], args) -> None:
    _files_exist(inputs)
    if not getattr(args, "text", None):
        raise ConfigError("--predict for retrieval needs --text \"caption\" (repeat for several)")


def _predict_retrieval(pipeline, inputs: list[str], args) -> list[dict]:
    if _is_gallery(inputs):
        files = gallery(inputs[0], pipeline.cfg.data.image_root)
        top = pipeline.retrieve(args.text, files, k=args.top_k)
        return [{"text": t, "rank": i + 1, "image": files[hit["index"]], "score": hit["score"], "itc": hit["itc"]}
                for t, hits in zip(args.text, top) for i, hit in enumerate(hits)]
    out = []
    for image in inputs:
        scores = {r["text"]: r for r in pipeline.rank(image, args.text)}
        out += [{"image": image, "text": t, "score": scores[t]["score"], "itc": scores[t]["itc"]} for t in args.text]
    return out


RETRIEVAL = Predictor(help="score each image file against each --text (JSON {image, text, score: ITM, itc}); with one "
                           "folder or retrieval JSON: its top-k images per text; a pre-training --checkpoint is enough",
                      metavar="IMAGE_OR_GALLERY", predict=_predict_retrieval, check=_check_retrieval,
                      flags={"--text": {"action": "append", "metavar": "T", "help": "a caption (repeat for several)"},
                             "--top-k": {"type": int, "default": 5, "help": "gallery mode: images per text (default 5)"}})
