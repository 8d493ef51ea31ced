"""SNLI-VE: the data format and its errors, the 3-way head against a float64 re-computation, the
metrics against an independent count, the shapes world's entailment data (derived from the scene
truth, balanced, and not predictable from the text alone), fine-tuning / evaluation / prediction end
to end on a tiny world from a tiny pre-training checkpoint, and the one-line errors."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run_finetune
from datasets.formats import DataError
from datasets.snli_ve_data import CLASS_NAMES, LABELS, SNLIVEDataset, read_snli_ve
from datasets.text import pre_caption
from datasets.transforms import build_transform
from engine.checkpoint import load_checkpoint
from engine.config import load_config
from inference import InferenceError, checkpoint_task, load_model_and_preprocess
from models.snli_ve import VEHeadConfig, VEModel
from shapesworld.config import ShapesConfig
from shapesworld.entailment import (COVER_COLOR, LABELS as WORLD_LABELS, cell_box, make_entailment, parse_entailment,
                                    statement_label)
from shapesworld.entailment_write import covered_image_path
from shapesworld.grammar import Claim
from shapesworld.scene import COLS, ROWS, sample_scene
from shapesworld.truth import claim_is_true
from tasks.snli_ve import SNLIVEConfig
from tasks.snli_ve_eval import metrics
from tests.pretrain_helpers import ROOT, TINY_MODEL
from tests.pretrain_helpers import one_thread, pretrained, world  # noqa: F401 (fixtures)

DEMO = ROOT / "configs/demo/snli_ve.yaml"


def model_overrides() -> list[str]:
    return [f"{k}={v}" for k, v in TINY_MODEL.items()] + ["model.text.hidden_dropout=0.0",
                                                          "model.text.attention_dropout=0.0"]


def ve_overrides(world: Path, out: Path, **extra) -> list[str]:
    o = {"data.train_files": f"[{world / 'snli_ve_train.json'}]", "data.dev_files": f"[{world / 'snli_ve_dev.json'}]",
         "data.test_files": f"[{world / 'snli_ve_test.json'}]", "data.image_root": str(world), "x-synthetic": "null",
         "data.num_workers": 0, "data.eval_batch_size": 7, "train.output_dir": str(out), "train.batch_size": 8,
         "train.epochs": 1, "train.log_every": 1, "train.progress": "false", "schedule.warmup_steps": 1}
    o.update(extra)
    return model_overrides() + [f"{k}={v}" for k, v in o.items()]


def run_cli(*argv: str) -> tuple[int, list[dict], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_finetune.main(list(argv))
    rows = [json.loads(x) for x in out.getvalue().splitlines() if x.startswith("{")]
    return rc, rows, err.getvalue()


@pytest.fixture(scope="module")
def finetuned(world, pretrained, tmp_path_factory) -> Path:
    """A tiny SNLI-VE fine-tuning run (one epoch) from the tiny pre-training checkpoint: its output folder."""
    out = tmp_path_factory.mktemp("ve") / "ft"
    rc, _, err = run_cli("--task", "snli_ve_shapes", "--checkpoint", str(pretrained), "--set", *ve_overrides(world, out))
    assert rc == 0, err[-2000:]
    return out


# ------------------------------------------------------------------ labels and the data format
def test_labels_are_albefs_class_indices():
    assert LABELS == {"contradiction": 0, "neutral": 1, "entailment": 2}  # ALBEF's ve_dataset
    assert CLASS_NAMES == ("contradiction", "neutral", "entailment")
    assert set(WORLD_LABELS) == set(LABELS)


def test_reader_errors_name_file_record_and_key(tmp_path):
    good = {"image": "1234", "sentence": "Two dogs run on the grass.", "label": "entailment"}
    cases = [
        ({**good, "label": "maybe"}, "record 1: key 'label': SNLI-VE label must be one of"),
        ({**good, "label": 2}, "record 1: key 'label' must be"),
        ({k: v for k, v in good.items() if k != "sentence"}, "record 1: missing key 'sentence'"),
        ({**good, "image": " "}, "record 1: key 'image' is empty"),
        ({**good, "image": None}, "record 1: key 'image' must be"),
    ]
    path = tmp_path / "ve.json"
    for bad, message in cases:
        path.write_text(json.dumps([good, bad]))
        with pytest.raises(DataError, match=message) as err:
            read_snli_ve(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    path.write_text(json.dumps([good, {**good, "sentence": "?!"}]))
    with pytest.raises(DataError, match=r"record 1: key 'sentence' \('\?!'\) is empty after cleaning"):
        SNLIVEDataset(path, tmp_path, build_transform(32, False))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_snli_ve(tmp_path / "missing.json")
    # a name without an extension is a Flickr30K id (ALBEF: image_root/<id>.jpg); other names are kept
    path.write_text(json.dumps([good, {**good, "image": "sub/x.png"}]))
    ds = SNLIVEDataset(path, tmp_path, build_transform(32, False))
    assert ds.image_path(0) == str(tmp_path / "1234.jpg") and ds.image_path(1) == str(tmp_path / "sub/x.png")
    assert ds.labels() == [2, 2] and ds.sentences[0] == pre_caption(good["sentence"])


def test_bad_record_through_the_command_line_is_one_line(world, pretrained, tmp_path):
    records = json.loads((world / "snli_ve_dev.json").read_text())
    records[2]["label"] = "unknown"
    bad = tmp_path / "dev.json"
    bad.write_text(json.dumps(records))
    rc, _, err = run_cli("--task", "snli_ve_shapes", "--checkpoint", str(pretrained), "--set",
                         *ve_overrides(world, tmp_path / "o", **{"data.dev_files": f"[{bad}]"}))
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and lines[-1].startswith("error: ") and f"{str(bad)!r} record 2: key 'label'" in lines[-1]
    assert "Traceback" not in err


# ------------------------------------------------------------------ the model
def tiny_model(vocab: int = 50, hidden: int = 0) -> VEModel:
    cfg = load_config(SNLIVEConfig, DEMO, model_overrides())
    mcfg = dataclasses.replace(cfg.model, text=dataclasses.replace(cfg.model.text, vocab_size=vocab))
    torch.manual_seed(0)
    return VEModel(mcfg, VEHeadConfig(classifier_hidden=hidden)).eval()


def inputs(b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(5, 50, (b, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return image, ids, mask


def test_logits_are_albefs_classifier_on_the_fused_cls_in_float64():
    model = tiny_model().double()
    h = model.cfg.text.hidden_size
    assert [tuple(m.weight.shape) for m in model.cls_head if hasattr(m, "weight")] == [(h, h), (3, h)]  # ALBEF
    assert [tuple(m.weight.shape) for m in tiny_model(hidden=20).cls_head if hasattr(m, "weight")] == [(20, h), (3, 20)]
    image, ids, mask = inputs()
    with torch.no_grad():
        logits = model(image.double(), ids, mask).numpy()
        base = model.base
        cls = base.fuse(base.encode_text(ids, mask), mask, base.encode_image(image.double()))[:, 0].numpy()
    w1, b1, w2, b2 = (p.detach().numpy().astype(np.float64) for p in
                      (model.cls_head[0].weight, model.cls_head[0].bias, model.cls_head[2].weight, model.cls_head[2].bias))
    expected = np.maximum(cls @ w1.T + b1, 0.0) @ w2.T + b2
    assert logits.dtype == np.float64 and np.abs(logits - expected).max() < 1e-12
    with torch.no_grad():  # the image is read
        other = model.fused_cls(image.double() + 1.0, ids, mask).numpy()
    assert np.abs(other - cls).max() > 1e-3


def test_every_trainable_parameter_gets_a_gradient():
    model = tiny_model().train()
    model(*inputs()).sum().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"base.itm_head.weight", "base.vision_proj.weight"} <= frozen
    in_groups = {id(p) for g in model.param_groups(1e-4, 1e-5, 0.02) for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}


def test_metrics_against_an_independent_count():
    rng = np.random.default_rng(0)
    labels = [int(v) for v in rng.integers(0, 3, 200)]
    probs = rng.dirichlet([1.0, 1.0, 1.0], 200)
    preds = {i: [float(v) for v in p] for i, p in enumerate(probs)}
    m = metrics(preds, labels)
    cm = np.zeros((3, 3), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels), probs.argmax(1)), 1)
    assert m["confusion"] == {CLASS_NAMES[t]: {CLASS_NAMES[p]: int(cm[t, p]) for p in range(3)} for t in range(3)}
    assert m["accuracy"] == pytest.approx(100.0 * np.trace(cm) / 200)
    assert m["accuracy_by_class"] == pytest.approx({CLASS_NAMES[k]: 100.0 * cm[k, k] / cm[k].sum() for k in range(3)})
    assert m["n_by_class"] == {CLASS_NAMES[k]: int(cm[k].sum()) for k in range(3)}


# ------------------------------------------------------------------ the shapes world's SNLI-VE data
def test_shapes_records_follow_from_the_scene_truth_and_the_cover(world):
    scenes = json.loads((world / "scenes.json").read_text())
    for split, name in (("train", "train"), ("val", "dev"), ("test", "test")):
        records = json.loads((world / f"snli_ve_{name}.json").read_text())
        by_image = collections.defaultdict(list)
        for r in records:
            by_image[r["image"]].append(r["label"])
        originals = {covered_image_path(split, sc["image_id"]): (p, sc) for p, sc in scenes.items() if sc["split"] == split}
        assert sorted(by_image) == sorted(originals)
        assert all(sorted(v) == sorted(WORLD_LABELS) for v in by_image.values())  # one statement per label per image
        for r in records:
            path, scene = originals[r["image"]]
            row, col = r["covered"].split()
            cover = (ROWS.index(row), COLS.index(col))
            assert statement_label(parse_entailment(r["sentence"]), scene, cover) == r["label"]
            assert parse_entailment(pre_caption(r["sentence"])) == parse_entailment(r["sentence"])
        for image in list(by_image)[:6]:  # the pixels: the cover paints its cell, the rest is the scene's image
            path, scene = originals[image]
            row, col = next(r["covered"] for r in records if r["image"] == image).split()
            x0, y0, x1, y1 = cell_box((ROWS.index(row), COLS.index(col)), 32)
            covered = np.asarray(Image.open(world / image).convert("RGB")).astype(int)
            plain = np.asarray(Image.open(world / path).convert("RGB")).astype(int)
            inside = np.zeros(covered.shape[:2], dtype=bool)
            inside[y0:y1 + 1, x0:x1 + 1] = True
            assert (covered[inside] == COVER_COLOR).all() and (covered[~inside] == plain[~inside]).all()
    manifest = json.loads((world / "snli_ve_manifest.json").read_text())
    assert manifest["files"]["snli_ve_train.json"] == {k: 48 for k in WORLD_LABELS}


def _statements(n_scenes: int, seed: int) -> list[dict]:
    cfg = ShapesConfig()
    rng = np.random.default_rng(seed)
    scenes = [(str(i), sample_scene(rng, cfg, i)) for i in range(n_scenes)]
    records, covers = make_entailment(scenes, rng, lambda sc: str(sc.image_id))
    for r in records:
        r["_scene"], r["_cover"] = covers[r["image"]][1], covers[r["image"]][0]
    return records


def test_the_text_alone_does_not_tell_the_label():
    """Text-only baselines trained on 3,000 images' statements and tested on 1,000 others: the majority
    label, an exact-text lookup, the statement's kind, and naive Bayes over its words are all at chance."""
    train, test = _statements(3000, 1), _statements(1000, 2)
    texts = lambda r: pre_caption(r["sentence"])  # noqa: E731 (the words a model sees)
    by_text = collections.defaultdict(collections.Counter)
    for r in train:
        by_text[texts(r)][r["label"]] += 1
    assert sum(len(c) == 3 for c in by_text.values()) > 200  # the same statement with all three labels
    overall = collections.Counter(r["label"] for r in train)
    assert overall == {k: 3000 for k in WORLD_LABELS}
    majority = overall.most_common(1)[0][0]

    def accuracy(predict) -> float:
        return sum(predict(r) == r["label"] for r in test) / len(test)

    lookup = accuracy(lambda r: by_text[texts(r)].most_common(1)[0][0] if texts(r) in by_text else majority)
    by_kind = collections.defaultdict(collections.Counter)
    for r in train:
        by_kind[r["kind"], len(texts(r).split())][r["label"]] += 1
    kind = accuracy(lambda r: by_kind[r["kind"], len(texts(r).split())].most_common(1)[0][0])
    words = {k: collections.Counter() for k in WORLD_LABELS}
    for r in train:
        words[r["label"]].update(texts(r).split())
    vocab = set().union(*words.values())
    total = {k: sum(c.values()) for k, c in words.items()}

    def bayes(r) -> str:
        return max(WORLD_LABELS, key=lambda k: sum(math.log((words[k][w] + 1) / (total[k] + len(vocab)))
                                                   for w in texts(r).split()))
    nb = accuracy(bayes)
    for name, acc in {"majority": accuracy(lambda r: majority), "lookup": lookup, "kind": kind, "bayes": nb}.items():
        assert abs(acc - 1 / 3) < 0.03, (name, acc)  # 3,000 test statements: chance +- 2.5 standard deviations
    # neutral is undecidable by the image: "a shape at <the covered cell>" is true of some scenes, false of others
    hidden = [claim_is_true(Claim((s.spec,)), r["_scene"]) for r in train if r["label"] == "neutral"
              for s in [parse_entailment(r["sentence"])] if s.kind == "object" and s.spec.shape is None
              and s.spec.color is None and s.spec.size is None]
    assert sum(hidden) > 50 and len(hidden) - sum(hidden) > 50


# ------------------------------------------------------------------ end to end
def test_finetune_writes_results_that_the_predictions_reproduce(world, finetuned, tmp_path):
    results = json.loads((finetuned / "results.json").read_text())
    assert results["task"] == "snli_ve" and results["checkpoint"].endswith("checkpoint_best.pth")
    for split in ("dev", "test"):
        gold = json.loads((world / f"snli_ve_{split}.json").read_text())
        preds = json.loads((finetuned / f"predictions_{split}.json").read_text())
        assert [(p["image"], p["sentence"], p["label"]) for p in preds] == [(g["image"], g["sentence"], g["label"])
                                                                          for g in gold]
        cm = collections.Counter((p["label"], max(p["probs"], key=p["probs"].get)) for p in preds)
        assert all(p["prediction"] == max(p["probs"], key=p["probs"].get) for p in preds)
        assert all(abs(sum(p["probs"].values()) - 1) < 1e-5 for p in preds)
        r = results[split]
        assert r["confusion"] == {t: {q: cm[t, q] for q in CLASS_NAMES} for t in CLASS_NAMES}
        assert r["accuracy"] == pytest.approx(100.0 * sum(p["correct"] for p in preds) / len(preds))
        for c in CLASS_NAMES:
            n = sum(p["label"] == c for p in preds)
            assert r["accuracy_by_class"][c] == pytest.approx(100.0 * cm[c, c] / n)
    ev = tmp_path / "ev"
    rc, _, err = run_cli("--task", "snli_ve_shapes", "--checkpoint", str(finetuned / "checkpoint_best.pth"),
                         "--evaluate", "--set", *ve_overrides(world, ev))
    assert rc == 0, err[-1000:]
    again = json.loads((ev / "results.json").read_text())
    assert [again[s]["confusion"] for s in ("dev", "test")] == [results[s]["confusion"] for s in ("dev", "test")]


def test_predict_and_the_python_api(world, finetuned):
    ck = str(finetuned / "checkpoint_best.pth")
    images = [str(world / covered_image_path("test", i)) for i in (56, 57)]
    texts = ["There is a red circle at the top left.", "There is nothing in the center."]
    rc, rows, err = run_cli("--task", "snli_ve_shapes", "--checkpoint", ck, "--predict", *images,
                            "--text", texts[0], "--text", texts[1])
    assert rc == 0, err[-1000:]
    assert [(r["image"], r["text"]) for r in rows] == list(zip(images, texts))
    api = load_model_and_preprocess(ck)
    assert api.task == "snli_ve" and checkpoint_task({"model": load_checkpoint(ck)["model"]}) == "snli_ve"
    for row, (label, probs) in zip(rows, api.entail([Image.open(p) for p in images], texts)):
        assert set(row["probs"]) == set(CLASS_NAMES) and abs(sum(row["probs"].values()) - 1) < 1e-6
        assert row["label"] == max(row["probs"], key=row["probs"].get) == label
        assert row["probs"] == pytest.approx(probs, abs=1e-6)
    # the probabilities are the softmax of the model's logits (float64 re-computation)
    with torch.no_grad():
        ids = api.tokenizer([pre_caption(t) for t in texts], padding="longest", return_tensors="pt")
        logits = api.model(api.images(images), ids["input_ids"], ids["attention_mask"]).double()
    expected = torch.softmax(logits, dim=-1)
    for row, e in zip(rows, expected):
        assert [row["probs"][c] for c in CLASS_NAMES] == pytest.approx(e.tolist(), abs=1e-6)
    with pytest.raises(InferenceError, match=r"entail\(\): 2 images but 1 statements"):
        api.entail(images, texts[:1])


def test_wrong_checkpoints_and_inputs_are_one_line(world, pretrained, finetuned, tmp_path):
    ck = str(finetuned / "checkpoint_best.pth")
    img = str(world / covered_image_path("test", 56))
    other = load_checkpoint(ck)
    other["task"] = "nlvr2"
    torch.save(other, tmp_path / "nlvr2.pth")
    cases = [
        (["--task", "snli_ve_shapes", "--checkpoint", str(tmp_path / "nlvr2.pth"), "--predict", img, "--text", "s"],
         "is a nlvr2 checkpoint, not one for snli_ve"),
        (["--task", "nlvr2_shapes", "--checkpoint", ck, "--predict", img, img, "--text", "s"],
         "is a snli_ve checkpoint, not one for nlvr2"),
        (["--task", "snli_ve_shapes", "--checkpoint", str(pretrained), "--evaluate", "--set", *ve_overrides(world, tmp_path / "e")],
         "has no SNLI-VE classifier"),
        (["--task", "snli_ve_shapes", "--checkpoint", ck, "--predict", img], "needs --text"),
        (["--task", "snli_ve_shapes", "--checkpoint", ck, "--predict", img, img, img, "--text", "a", "--text", "b"],
         "--text: give one for all images or one per image (3); got 2"),
        (["--task", "snli_ve_shapes", "--checkpoint", ck, "--predict", "missing.png", "--text", "s"], "missing.png"),
    ]
    for argv, message in cases:
        rc, rows, err = run_cli(*argv)
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert rc == 2 and rows == [] and len(lines) == 1 and message in lines[0], (argv, err[-800:])
    with pytest.raises(InferenceError, match="it cannot entail"):
        load_model_and_preprocess(str(pretrained)).entail([img], ["s"])



# ------------------------------------------------------------------ learning
def test_the_classifier_learns_a_label_that_only_image_and_text_together_decide():
    """A toy task in the style of SNLI-VE: the image is bright, dark or grey (c), the sentence one of
    three (q), and the class (c + q) mod 3, so that neither the image nor the text alone is above
    chance (33 %). From the random initialisation a few hundred steps learn it through the fusion
    encoder's [CLS]."""
    import torch.nn.functional as F
    model = tiny_model().train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        c, q = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
        image = torch.randn(n, 3, 32, 32, generator=g) * 0.5 + torch.tensor([1.5, -1.5, 0.0])[c, None, None, None]
        ids = torch.stack([torch.full((n,), 2), 10 + q, torch.full((n,), 3)], dim=1)
        return image, ids, torch.ones_like(ids), (c + q) % 3

    test = batch(96)
    acc = 0.0
    for step in range(400):
        image, ids, mask, y = batch(16)
        loss = F.cross_entropy(model(image, ids, mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 19:
            model.eval()
            with torch.no_grad():
                acc = (model(*test[:3]).argmax(1) == test[3]).float().mean().item()
            model.train()
            if acc >= 0.9:
                break
    assert acc >= 0.9, acc


def test_the_snli_ve_part_is_deterministic_restored_and_never_written_over_a_foreign_file(tmp_path):
    from shapesworld.write import ensure_shapes
    cfg = ShapesConfig(seed=4, image_size=24, num_train_images=5, num_val_images=2, num_test_images=2,
                       captions_per_image=1, vqa_questions_per_image=1, nlvr2_pairs=(2, 1, 1))
    a, b = tmp_path / "a", tmp_path / "b"
    ensure_shapes(a, cfg)
    ensure_shapes(b, cfg)
    part = sorted(p.relative_to(a) for p in a.rglob("*") if "snli_ve" in str(p.relative_to(a)) and p.is_file())
    assert len(part) == 3 + 1 + 9  # the three splits, the manifest, one covered image per scene
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in part)
    # a world written before the part existed (here: the part removed) gets it on the next use
    for p in part:
        (b / p).unlink()
    _, created = ensure_shapes(b, cfg)
    assert not created and all((a / p).read_bytes() == (b / p).read_bytes() for p in part)
    # a file the generator did not write is never written over
    (b / "snli_ve_manifest.json").unlink()
    (b / "snli_ve_dev.json").write_text("mine")
    with pytest.raises(FileExistsError, match="snli_ve_dev.json"):
        ensure_shapes(b, cfg)
    assert (b / "snli_ve_dev.json").read_text() == "mine"
    # no positions, no SNLI-VE part
    c = tmp_path / "c"
    ensure_shapes(c, dataclasses.replace(cfg, use_positions=False))
    assert not list(c.glob("snli_ve*"))
