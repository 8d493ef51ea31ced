"""Inference on REAL photos (scikit-image's bundled photographs, tests/real_photos.py): a tiny model
pre-trained on 12 photos with hand-written captions, fine-tuned a step for each task, then every
``--predict`` form (JSON lines on stdout) and the Python API (``inference.py``) on PIL images, and their
one-line errors."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import run_finetune
import run_pretrain
from inference import InferenceError, load_model_and_preprocess
from tests.pretrain_helpers import one_thread  # noqa: F401  (autouse)
from tests.real_photos import NAMES, PHOTOS, write_photo_dataset

TINY = {"model.vision.img_size": 32, "model.vision.patch_size": 8, "model.vision.width": 32, "model.vision.depth": 1,
        "model.vision.num_heads": 2, "model.text.hidden_size": 32, "model.text.num_text_layers": 1,
        "model.text.num_fusion_layers": 1, "model.text.num_heads": 2, "model.text.intermediate_size": 64,
        "model.embed_dim": 16}


def _sets(d: dict) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def _pretrain(p: dict, out: Path, steps: int, lr: float) -> str:
    rc = run_pretrain.main(["--config", "configs/demo/pretrain.yaml", "--set", *_sets({
        **TINY, "x-synthetic": "null", "data.train_files": f"[{p['pretrain']}]", "data.image_root": p["image_root"],
        "data.num_workers": 0, "train.output_dir": str(out), "train.batch_size": 12, "train.epochs": 1000,
        "train.max_steps": steps, "train.progress": "false", "train.num_threads": 1, "tokenizer.vocab_size": 200,
        "loss.queue_size": 24, "diagnostics.every": 0, "optim.lr": lr, "optim.lr_vision": lr,
        "train.log_every": 1000, "train.save_every": 100000})])
    assert rc == 0
    return str(out / "checkpoint_last.pth")


FINETUNE = {  # task -> (demo config, the data paths of the photo fixture)
    "vqa_shapes": ("vqa", lambda p: {"data.train_files": f"[{p['vqa_train']}]", "data.val_file": p["vqa_val_gt"],
                                     "data.test_file": p["vqa_test"], "data.test_gt_file": p["vqa_test_gt"],
                                     "data.answer_list": p["answer_list"]}),
    "nlvr2_shapes": ("nlvr2", lambda p: {"data.train_files": f"[{p['nlvr2_train']}]", "data.dev_files": f"[{p['nlvr2_dev']}]",
                                         "data.test_files": f"[{p['nlvr2_test']}]"}),
    "caption_shapes": ("caption", lambda p: {"data.train_files": f"[{p['caption_train']}]", "data.val_file": p["caption_val"],
                                             "data.test_file": p["caption_test"], "data.val_gt_file": "null",
                                             "data.test_gt_file": "null"}),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    p = write_photo_dataset(root / "data")
    digests = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in (root / "data").rglob("*") if f.is_file()}
    torch.set_num_threads(1)
    ck = {"pretrain": _pretrain(p, root / "pre", 200, 1e-3), "random": _pretrain(p, root / "rnd", 1, 1e-12)}
    for task, (cfg, paths) in FINETUNE.items():
        out = root / task
        rc = run_finetune.main(["--task", task, "--checkpoint", ck["pretrain"], "--set", *_sets({
            **paths(p), "x-synthetic": "null", "data.image_root": p["image_root"], "data.num_workers": 0,
            "train.output_dir": str(out), "train.max_steps": 1, "train.epochs": 1, "train.batch_size": 4,
            "train.progress": "false", "train.num_threads": 1})])
        assert rc == 0, task
        ck[task] = str(out / "checkpoint_last.pth")
    return {"paths": p, "ck": ck, "root": root, "digests": digests}


def photo(world, name: str) -> str:
    return f"{world['paths']['image_root']}/photos/{name}.jpg"


def predict(*argv: str) -> tuple[int, list[dict], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_finetune.main(list(argv))
    return rc, [json.loads(line) for line in out.getvalue().splitlines() if line.strip()], err.getvalue()


def test_user_files_are_untouched(world):
    root = world["root"] / "data"
    now = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in root.rglob("*") if f.is_file()}
    assert now == world["digests"]


def test_training_on_the_photos_ranks_the_true_captions_higher_than_a_random_model(world):
    images = [photo(world, n) for n in NAMES]
    captions = [(i, c) for i, n in enumerate(NAMES) for c in PHOTOS[n][0]]

    def mean_rank(ck: str) -> float:
        m = load_model_and_preprocess(ck)
        sim = m.encode_text([c for _, c in captions]) @ m.encode_image(images).T
        return sum(int((sim[j] > sim[j, i]).sum()) + 1 for j, (i, _) in enumerate(captions)) / len(captions)

    trained, random = mean_rank(world["ck"]["pretrain"]), mean_rank(world["ck"]["random"])
    assert random >= 5.0  # about chance (6.5 of 12)
    assert trained < 0.6 * random


def test_retrieval_pairs_and_gallery(world):
    images = [photo(world, "chelsea"), photo(world, "coffee")]
    rc, rows, _ = predict("--task", "retrieval_flickr", "--checkpoint", world["ck"]["pretrain"], "--predict", *images,
                          "--text", "a tabby cat", "--text", "a cup of coffee")
    assert rc == 0 and len(rows) == 4
    assert [(r["image"], r["text"]) for r in rows] == [(i, t) for i in images for t in ("a tabby cat", "a cup of coffee")]
    assert all(0.0 <= r["score"] <= 1.0 and -1.0 <= r["itc"] <= 1.0 for r in rows)
    folder = f"{world['paths']['image_root']}/photos"
    rc, rows, _ = predict("--task", "retrieval_flickr", "--checkpoint", world["ck"]["pretrain"], "--predict", folder,
                          "--text", "a red motorcycle", "--top-k", "3")
    assert rc == 0 and [r["rank"] for r in rows] == [1, 2, 3] and len({r["image"] for r in rows}) == 3
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    rc, rows, _ = predict("--task", "retrieval_flickr", "--checkpoint", world["ck"]["pretrain"], "--predict",
                          world["paths"]["retrieval_test"], "--text", "a horse", "--top-k", "2",
                          "--set", f"data.image_root={world['paths']['image_root']}")
    assert rc == 0 and len(rows) == 2 and all(Path(r["image"]).name in {f"{n}.jpg" for n in NAMES[6:]} for r in rows)


def test_caption_vqa_nlvr2_predictions(world):
    ck, img = world["ck"], photo(world, "astronaut")
    rc, rows, _ = predict("--task", "caption_shapes", "--checkpoint", ck["caption_shapes"], "--predict", img,
                          photo(world, "moon"))
    assert rc == 0 and [r["image"] for r in rows] == [img, photo(world, "moon")]
    assert all(isinstance(r["caption"], str) for r in rows)
    rc, rows, _ = predict("--task", "vqa_shapes", "--checkpoint", ck["vqa_shapes"], "--predict", img,
                          "--question", "what color is the suit?")
    answers = json.loads(Path(world["paths"]["answer_list"]).read_text())
    assert rc == 0 and rows[0]["question"] == "what color is the suit?" and rows[0]["answer"] in answers
    rc, rows, _ = predict("--task", "vqa_shapes", "--checkpoint", ck["vqa_shapes"], "--predict", img, "--question",
                          "is there a flag?", "--open-ended")
    assert rc == 0 and isinstance(rows[0]["answer"], str)
    left, right = photo(world, "chelsea"), photo(world, "horse")
    rc, rows, _ = predict("--task", "nlvr2_shapes", "--checkpoint", ck["nlvr2_shapes"], "--predict", left, right,
                          "--text", "there is exactly one animal in each image")
    assert rc == 0 and rows[0]["images"] == [left, right] and rows[0]["label"] in ("True", "False")
    assert 0.0 <= rows[0]["prob"] <= 1.0 and (rows[0]["label"] == "True") == (rows[0]["prob"] >= 0.5)


def test_python_api_on_pil_images(world):
    ck = world["ck"]
    cat = Image.open(photo(world, "chelsea"))
    m = load_model_and_preprocess(ck["pretrain"], device="cpu")
    assert m.task == "retrieval" and callable(m.transform) and m.tokenizer is not None
    img, txt = m.encode_image([cat, photo(world, "coffee")]), m.encode_text(["a cat", "a cup", "a rocket"])
    assert img.shape == (2, 16) and txt.shape == (3, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    ranked = m.rank(cat, ["a cat", "a rocket at night"])
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    top = m.retrieve(["a cat"], [photo(world, n) for n in NAMES], k=4)
    assert len(top[0]) == 4 and len({h["index"] for h in top[0]}) == 4
    # the same model as the command line (whose config may resize with another interpolation: not bit-equal)
    _, rows, _ = predict("--task", "retrieval_flickr", "--checkpoint", ck["pretrain"], "--predict",
                         photo(world, "chelsea"), "--text", "a cat")
    assert rows[0]["score"] == pytest.approx(next(r["score"] for r in ranked if r["text"] == "a cat"), abs=1e-3)
    cap = load_model_and_preprocess(ck["caption_shapes"])
    assert cap.task == "caption" and len(cap.caption([cat, cat])) == 2
    vqa = load_model_and_preprocess(ck["vqa_shapes"])
    assert vqa.task == "vqa" and vqa.answer([cat], ["what animal is this?"])[0] in vqa.answer_list
    nl = load_model_and_preprocess(ck["nlvr2_shapes"])
    (label, prob), = nl.nlvr2([cat], [photo(world, "horse")], ["both images show a cat"])
    assert label in ("True", "False") and 0.0 <= prob <= 1.0
    with pytest.raises(InferenceError, match="is a caption checkpoint: it cannot answer"):
        cap.answer([cat], ["what is it?"])
    with pytest.raises(InferenceError, match="nosuch.jpg"):
        m.encode_image(["nosuch.jpg"])


@pytest.mark.parametrize("argv, message", [
    (["--task", "vqa_shapes", "--checkpoint", "{vqa_shapes}", "--predict", "{img}"], "needs --question"),
    (["--task", "vqa_shapes", "--checkpoint", "{vqa_shapes}", "--predict", "missing.jpg", "--question", "q?"],
     "not found: ['missing.jpg']"),
    (["--task", "nlvr2_shapes", "--checkpoint", "{nlvr2_shapes}", "--predict", "{img}", "--text", "s"], "image pairs"),
    (["--task", "nlvr2_shapes", "--checkpoint", "{vqa_shapes}", "--predict", "{img}", "{img}", "--text", "s"],
     "is a vqa checkpoint, not one for nlvr2"),
    (["--task", "caption_shapes", "--checkpoint", "{pretrain}", "--predict", "{img}"], "has no caption decoder"),
    (["--task", "retrieval_flickr", "--checkpoint", "{pretrain}", "--predict", "{img}"], "needs --text"),
    (["--task", "caption_shapes", "--checkpoint", "{caption_shapes}", "--predict", "{img}", "--question", "q"],
     "unrecognized arguments: --question"),
])
def test_errors_are_one_line(world, argv, message):
    argv = [a.format(img=photo(world, "coffee"), **world["ck"]) for a in argv]
    rc, rows, err = predict(*argv)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and rows == [] and len(lines) == 1 and message in lines[0], err[-500:]
