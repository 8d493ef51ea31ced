"""Tests for the synthetic shapes world (shapesworld/): files, formats, oracle, rendering, the CLI."""
import dataclasses
import hashlib
import importlib
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time
import typing
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets
import run_finetune
import shapesworld
from datasets.text import pre_caption
from engine.config import ConfigError, load_config, read_config
from run_finetune import TASKS
from shapesworld import record, write
from shapesworld.__main__ import main as shapes_cli
from shapesworld.annotate import ANSWER_TYPES, CAPTION_KINDS, make_captions
from shapesworld.config import GENERATOR, ShapesConfig
from shapesworld.grammar import Claim, ObjectSpec, clean, parse_caption
from shapesworld.preset import prepare, strings_in
from shapesworld.scene import COLORS, COLS, ROWS, sample_scene
from shapesworld.statements import parse_statement
from shapesworld.truth import ShapesWorld, answer_question, claim_is_true
from shapesworld.write import ensure_shapes, generate_shapes
from tasks.pretrain import PretrainConfig
from tests.pretrain_helpers import tiny_overrides
from tools.config_docs import discover, find_config_class

TINY = dict(num_train_images=40, num_val_images=10, num_test_images=10, nlvr2_pairs=(40, 10, 10),
            vqa_questions_per_image=2)

RECORD_KEYS = {
    "pretrain.json": {"image", "caption"},
    "retrieval_train.json": {"image", "caption", "image_id"},
    "retrieval_val.json": {"image", "caption"},
    "retrieval_test.json": {"image", "caption"},
    "vqa_train.json": {"question_id", "question", "answer", "image", "dataset", "answer_type"},
    "vqa_val.json": {"question_id", "question", "answer", "image", "dataset", "answer_type"},
    "vqa_test.json": {"question_id", "question", "image", "dataset", "answer_type"},
    "vqa_test_gt.json": {"question_id", "question", "answer", "image", "dataset", "answer_type"},
    "nlvr2_train.json": {"images", "sentence", "label"},
    "nlvr2_dev.json": {"images", "sentence", "label"},
    "nlvr2_test.json": {"images", "sentence", "label"},
    "caption_train.json": {"image", "caption", "image_id"},
    "caption_val.json": {"image", "caption", "image_id"},
    "caption_test.json": {"image", "caption", "image_id"},
}


def load(root, name):
    with open(os.path.join(root, name), "r", encoding="utf-8") as fh:
        return json.load(fh)


def tree_bytes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    generate_shapes(root, ShapesConfig(**TINY))
    return root


@pytest.fixture(scope="module")
def world(world_dir):
    return ShapesWorld.load(world_dir)


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path):
    cfg = ShapesConfig(**{**TINY, "num_train_images": 20})
    generate_shapes(tmp_path / "a", cfg)
    generate_shapes(tmp_path / "b", cfg)
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    generate_shapes(tmp_path / "c", ShapesConfig(**{**TINY, "num_train_images": 20, "seed": 1}))
    c = tree_bytes(tmp_path / "c")
    assert c["scenes.json"] != a["scenes.json"]
    assert c["pretrain.json"] != a["pretrain.json"]
    images = [k for k in a if k.startswith("images")]
    assert sum(a[k] != c[k] for k in images) > len(images) // 2


# ------------------------------------------------------------------------- files and formats
def test_every_file_exists_with_exact_record_keys(world_dir):
    man = load(world_dir, "manifest.json")
    for name in record.ANNOTATION_FILES + ("manifest.json",):
        assert os.path.exists(os.path.join(world_dir, name)), name
    for name, keys in RECORD_KEYS.items():
        recs = load(world_dir, name)
        assert isinstance(recs, list) and recs, name
        assert man["files"][name] == len(recs)
        for r in recs:
            assert set(r) == keys, (name, r)
            for p in ([r["image"]] if "image" in r else r["images"]):
                assert os.path.exists(os.path.join(world_dir, p)), p
    cpi = TINY.get("captions_per_image", 5)
    pre = load(world_dir, "pretrain.json")
    assert len(pre) == 40 and all(isinstance(r["caption"], list) and len(r["caption"]) == cpi
                                  for r in pre)
    rt = load(world_dir, "retrieval_train.json")
    assert len(rt) == 40 * cpi
    assert all(isinstance(r["caption"], str) and isinstance(r["image_id"], int) for r in rt)
    ids = {}
    for r in rt:
        ids.setdefault(r["image"], set()).add(r["image_id"])
    assert all(len(v) == 1 for v in ids.values()) and len({min(v) for v in ids.values()}) == 40
    for split in ("val", "test"):
        recs = load(world_dir, f"retrieval_{split}.json")
        assert len(recs) == 10 and all(len(r["caption"]) == cpi for r in recs)
        assert all(r["image"].startswith(f"images/{split}/") for r in recs)
    for r in load(world_dir, "vqa_train.json"):
        assert r["dataset"] == "vqa" and r["answer_type"] in ANSWER_TYPES
        assert len(r["answer"]) == 10 and isinstance(r["question_id"], int)
    for name in ("nlvr2_train.json", "nlvr2_dev.json", "nlvr2_test.json"):
        assert all(r["label"] in ("True", "False") and len(r["images"]) == 2
                   for r in load(world_dir, name))
    assert len(load(world_dir, "nlvr2_train.json")) == 40
    assert set(load(world_dir, "scenes.json")) == {r["image"] for r in pre} | {
        r["image"] for s in ("val", "test") for r in load(world_dir, f"retrieval_{s}.json")}
    answers = load(world_dir, "answer_list.json")
    assert isinstance(answers, list) and all(isinstance(a, str) for a in answers)
    assert len(set(answers)) == len(answers)
    assert man["images"] == {"train": 40, "val": 10, "test": 10}
    assert man["config"] == ShapesConfig(**TINY).to_json()


def test_images_open_at_configured_size(world_dir, tmp_path):
    paths = list(load(world_dir, "scenes.json"))
    assert all(re.fullmatch(r"images/(train|val|test)/\d{6}\.png", p) for p in paths)
    for p in paths:
        with Image.open(os.path.join(world_dir, p)) as im:
            assert im.size == (96, 96) and im.mode == "RGB" and im.format == "PNG"
    cfg = ShapesConfig(num_train_images=4, num_val_images=2, num_test_images=2, image_size=64,
                       image_format="jpg", nlvr2_pairs=(2, 1, 1))
    generate_shapes(tmp_path, cfg)
    for p in load(tmp_path, "scenes.json"):
        assert p.endswith(".jpg")
        with Image.open(tmp_path / p) as im:
            assert im.size == (64, 64) and im.format == "JPEG"


# -------------------------------------------------------------------------------- the oracle
def test_every_written_caption_is_true_of_its_image_and_parses_after_cleaning(world, world_dir):
    n = 0
    for rec in load(world_dir, "retrieval_train.json") + [
            {"image": r["image"], "caption": c} for r in load(world_dir, "retrieval_test.json")
            for c in r["caption"]]:
        cap = rec["caption"]
        assert world.is_true(cap, rec["image"]), cap
        cleaned = pre_caption(cap, style="albef")  # the words the models see
        assert cleaned == cleaned.lower() and not re.search(r"[,.'!?\"():;]", cleaned)
        assert parse_caption(cleaned) == parse_caption(cap)
        n += 1
    assert n == 40 * 5 + 10 * 5


def test_generated_claims_round_trip_through_text():
    cfg = ShapesConfig(max_objects=5)
    rng = np.random.default_rng(123)
    kinds = Counter()
    for i in range(300):
        scene = sample_scene(rng, cfg, i)
        for cap in make_captions(scene, cfg, rng):
            kinds[cap.kind] += 1
            assert parse_caption(cap.text) == cap.claim, cap
            assert parse_caption(pre_caption(cap.text, style="albef")) == cap.claim, cap
            assert parse_caption(pre_caption(cap.text, style="albef").upper() + "!") == cap.claim
            assert claim_is_true(cap.claim, scene), cap
    assert set(kinds) == set(CAPTION_KINDS)


def test_parse_caption_rejects_foreign_text_naming_it():
    for text in ("a dog on the beach", "a red red circle", "two shapes and", "",
                 "a red circle at the left top"):
        with pytest.raises(ValueError, match=re.escape(repr(text))):
            parse_caption(text)
    claim = parse_caption("A small red circle at the top-left, and a large blue square.")
    assert claim == Claim((ObjectSpec("circle", "red", "small", "top", "left"),
                           ObjectSpec("square", "blue", "large")))
    assert parse_caption("an image with two shapes") == Claim(count=2)
    assert parse_caption("Three shapes on a striped background.") == Claim(count=3,
                                                                            background="striped")


def test_full_caption_is_false_of_a_scene_missing_one_of_its_objects(world_dir):
    scenes = load(world_dir, "scenes.json")
    checked = 0
    for path, sc in scenes.items():
        for text, kind in zip(sc["captions"], sc["caption_kinds"]):
            if kind != "full" or len(sc["objects"]) < 2:
                continue
            claim = parse_caption(text)
            assert claim_is_true(claim, sc)
            for j in range(len(sc["objects"])):
                smaller = dict(sc, objects=sc["objects"][:j] + sc["objects"][j + 1:])
                assert not claim_is_true(claim, smaller), (text, j)
                checked += 1
    assert checked > 20


def test_partial_captions_have_false_negatives_and_full_captions_rarely(world, world_dir):
    scenes = load(world_dir, "scenes.json")
    train = world.images("train")
    others = {"full": [], "partial": []}
    for path in train:
        for text, kind in zip(scenes[path]["captions"], scenes[path]["caption_kinds"]):
            truth = world.truth_matrix([text], train)[0]
            assert truth[train.index(path)]
            others["full" if kind == "full" else "partial"].append(int(truth.sum()) - 1)
    full, partial = np.mean(others["full"]), np.mean(others["partial"])
    assert partial > 3 * full and partial > 2.0, (partial, full)
    assert full / (len(train) - 1) < 0.05
    assert max(others["partial"]) >= 5
    fn = load(world_dir, "manifest.json")["false_negatives"]
    per = fn["per_kind"]
    assert per["full"]["mean_fraction"] < per["attribute"]["mean_fraction"]
    assert per["full"]["mean_fraction"] < per["count"]["mean_fraction"]
    assert 0 < fn["mean_fraction"] < 1


def test_raising_partial_caption_prob_raises_false_negative_rate(tmp_path):
    rates = []
    for p in (0.0, 0.5, 1.0):
        cfg = ShapesConfig(**{**TINY, "partial_caption_prob": p, "num_train_images": 50})
        fn = generate_shapes(tmp_path / str(p), cfg)["false_negatives"]
        rates.append(fn["mean_fraction"])
        if p == 0.0:
            assert fn["partial_fraction"] == 0.0 and set(fn["per_kind"]) == {"full"}
        if p == 1.0:
            assert fn["partial_fraction"] == 1.0 and "full" not in fn["per_kind"]
    assert rates[0] < rates[1] < rates[2], rates


def test_truth_matrix_equals_loop_over_is_true(world, world_dir):
    scenes = load(world_dir, "scenes.json")
    captions = [c for sc in scenes.values() for c in sc["captions"]][::3] + [
        "two shapes", "a single shape", "something red", "a cross next to a star",
        "a red shape above a blue shape", "a shape on a textured background"]
    images = world.images()[::2]
    mat = world.truth_matrix(captions, images)
    loop = np.array([[world.is_true(c, im) for im in images] for c in captions])
    assert mat.dtype == bool and mat.shape == (len(captions), len(images))
    assert np.array_equal(mat, loop)
    assert 0 < mat.mean() < 1
    # integer image ids address the same images
    ids = [scenes[p]["image_id"] for p in images]
    assert np.array_equal(world.truth_matrix(captions, ids), mat)
    # scenes with many objects exercise the permutation search (relations, distinctness)
    cfg = ShapesConfig(min_objects=3, max_objects=6)
    rng = np.random.default_rng(7)
    big = {f"s{i}": sample_scene(rng, cfg, i) for i in range(60)}
    bw = ShapesWorld(big)
    caps = [c.text for s in list(big.values())[:20] for c in make_captions(s, cfg, rng)]
    m2 = bw.truth_matrix(caps, list(big))
    assert np.array_equal(m2, np.array([[bw.is_true(c, p) for p in big] for c in caps]))


def test_truth_matrix_is_fast_after_first_parse(world, world_dir):
    scenes = load(world_dir, "scenes.json")
    caps = [c for sc in scenes.values() for c in sc["captions"]][:64]
    imgs = (world.images() * 2)[:64]
    world.truth_matrix(caps, imgs)
    best = min(_timed(lambda: world.truth_matrix(caps, imgs)) for _ in range(5))
    assert best < 0.01, best


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -------------------------------------------------------------------------------- rendering
def test_rendering_matches_the_scene(world_dir):
    scenes = load(world_dir, "scenes.json")
    plain = 0
    for path, sc in scenes.items():
        arr = np.asarray(Image.open(os.path.join(world_dir, path)).convert("RGB"))
        for o in sc["objects"]:
            assert tuple(arr[o["y"], o["x"]]) == COLORS[o["color"]], (path, o)
            cell = 96 / 3
            assert int(o["x"] // cell) == COLS.index(o["col"])
            assert int(o["y"] // cell) == ROWS.index(o["row"])
        if sc["background"] == "plain":
            plain += 1
            assert tuple(arr[0, 0]) == tuple(sc["background_color"])
            assert tuple(arr[-1, -1]) == tuple(sc["background_color"])
        # a large object covers more pixels of its colour than a small one
        counts = {o["size"]: int((arr == COLORS[o["color"]]).all(-1).sum()) for o in sc["objects"]}
        if len(counts) == 2 and len({o["color"] for o in sc["objects"]}) == len(sc["objects"]):
            assert counts["large"] > counts["small"]
    assert plain > 0


# ------------------------------------------------------------------------------------ tasks
def test_vqa_answers_agree_with_the_oracle(world, world_dir):
    answers = set(load(world_dir, "answer_list.json"))
    qids = []
    types = Counter()
    for name in ("vqa_train.json", "vqa_val.json", "vqa_test_gt.json"):
        for r in load(world_dir, name):
            majority, n = Counter(r["answer"]).most_common(1)[0]
            assert majority == world.answer(r["question"], r["image"]), r
            assert n > len(r["answer"]) / 2
            assert set(r["answer"]) <= answers
            types[r["answer_type"]] += 1
            qids.append(r["question_id"])
    test = load(world_dir, "vqa_test.json")
    assert [r["question_id"] for r in test] == [r["question_id"] for r in
                                                load(world_dir, "vqa_test_gt.json")]
    assert len(qids) == len(set(qids))
    assert set(types) == set(ANSWER_TYPES)
    noisy = sum(len(set(r["answer"])) > 1 for r in load(world_dir, "vqa_train.json"))
    assert noisy > 0  # annotator noise is there
    scene = {"image_id": 0, "split": "train", "background": "plain", "background_color": [0, 0, 0],
             "objects": [dict(shape="circle", color="red", size="large", row="top", col="left",
                              x=16, y=16, radius=13),
                         dict(shape="star", color="red", size="small", row="bottom",
                              col="right", x=80, y=80, radius=8)]}
    assert answer_question("What color is the circle?", scene) == "red"
    assert answer_question("what shape is the small red object", scene) == "star"
    assert answer_question("How many red shapes are there?", scene) == "2"
    assert answer_question("is there a blue star", scene) == "no"
    with pytest.raises(ValueError):
        answer_question("what shape is the red object", scene)  # not unique


def test_nlvr2_labels_agree_with_the_statements_and_are_balanced(world, world_dir):
    split_of = {"nlvr2_train.json": "train", "nlvr2_dev.json": "val", "nlvr2_test.json": "test"}
    kinds = Counter()
    for name, split in split_of.items():
        recs = load(world_dir, name)
        labels = Counter(r["label"] for r in recs)
        assert abs(labels["True"] - labels["False"]) <= 1, labels
        for r in recs:
            left, right = r["images"]
            assert left != right
            assert world.scene(left).split == split and world.scene(right).split == split
            assert world.nlvr2_is_true(r["sentence"], left, right) == (r["label"] == "True"), r
            kinds[parse_statement(r["sentence"]).kind] += 1
    assert len(kinds) >= 5


def test_coco_ground_truth_loads_and_matches_caption_files(world_dir):
    from pycocotools.coco import COCO

    for split in ("val", "test"):
        coco = COCO(os.path.join(world_dir, f"caption_{split}_gt.json"))
        recs = load(world_dir, f"caption_{split}.json")
        assert sorted(coco.getImgIds()) == sorted(r["image_id"] for r in recs)
        for r in recs:
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[r["image_id"]]))
            assert [a["caption"] for a in anns] == r["caption"]
        gt = load(world_dir, f"caption_{split}_gt.json")
        assert set(gt) == {"images", "annotations", "info", "licenses", "type"}
        assert gt["type"] == "captions"
        assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])


# ------------------------------------------------------------------------ generation control
def test_ensure_shapes_skips_complete_worlds_and_redoes_interrupted_ones(tmp_path):
    cfg = ShapesConfig(num_train_images=6, num_val_images=3, num_test_images=3,
                       nlvr2_pairs=(4, 2, 2))
    man, created = ensure_shapes(tmp_path, cfg)
    assert created and man["complete"]
    stamp = os.path.getmtime(tmp_path / "scenes.json")
    man2, created = ensure_shapes(tmp_path, cfg)
    assert not created and man2 == man and os.path.getmtime(tmp_path / "scenes.json") == stamp
    os.remove(tmp_path / "manifest.json")  # as if interrupted before the manifest was written
    assert ensure_shapes(tmp_path, cfg)[1]
    os.remove(tmp_path / "images" / "val" / "000007.png")  # an image went missing
    assert ensure_shapes(tmp_path, cfg)[1]
    smaller = ShapesConfig(num_train_images=4, num_val_images=3, num_test_images=3,
                           nlvr2_pairs=(4, 2, 2))
    man3, created = ensure_shapes(tmp_path, smaller)  # different config: regenerated
    assert created and man3["config"]["num_train_images"] == 4
    assert sorted(os.listdir(tmp_path / "images" / "train")) == [f"{i:06d}.png" for i in range(4)]
    assert ensure_shapes(tmp_path, smaller, force=True)[1]


def test_interrupted_generation_is_detected(tmp_path, monkeypatch):
    cfg = ShapesConfig(num_train_images=6, num_val_images=3, num_test_images=3,
                       nlvr2_pairs=(4, 2, 2))
    ensure_shapes(tmp_path, cfg)
    real, calls = write.render_job, []

    def crashing(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(job)

    monkeypatch.setattr(write, "render_job", crashing)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes(tmp_path, cfg, force=True)
    monkeypatch.setattr(write, "render_job", real)
    assert not os.path.exists(tmp_path / "manifest.json")
    assert record.is_complete(tmp_path, cfg) is None
    man, created = ensure_shapes(tmp_path, cfg)
    assert created and record.is_complete(tmp_path, cfg) == man


def test_cli_writes_and_then_reports_up_to_date(tmp_path, capsys):
    out = str(tmp_path / "w")
    args = ["--out", out, "--seed", "3", "--num-train-images", "8", "--num-val-images", "2",
            "--num-test-images", "2", "--nlvr2-pairs", "4", "2", "2", "--partial-caption-prob",
            "0.7", "--no-use-positions", "--workers", "1"]
    assert shapes_cli(args) == 0
    text = capsys.readouterr().out
    assert "wrote the shapes world" in text and "pretrain.json" in text and " s " in text
    man = load(out, "manifest.json")
    assert man["config"]["seed"] == 3 and man["config"]["partial_caption_prob"] == 0.7
    assert man["config"]["use_positions"] is False and man["config"]["nlvr2_pairs"] == [4, 2, 2]
    assert shapes_cli(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert shapes_cli(["--out", out, "--max-objects", "12"]) == 2


def test_use_positions_false_removes_position_words(tmp_path):
    cfg = ShapesConfig(**{**TINY, "use_positions": False, "partial_caption_prob": 0.6})
    generate_shapes(tmp_path, cfg)
    words = re.compile(r"\b(left|right|top|bottom|center|middle|above|below)\b")
    caps = [c for r in load(tmp_path, "pretrain.json") for c in r["caption"]]
    questions = [r["question"] for r in load(tmp_path, "vqa_train.json")]
    assert caps and questions
    assert [c for c in caps + questions if words.search(c.lower())] == []
    rng = np.random.default_rng(0)
    with_pos = ShapesConfig(**{**TINY, "partial_caption_prob": 0.6})
    texts = [c.text for i in range(50) for c in make_captions(sample_scene(rng, with_pos, i),
                                                               with_pos, rng)]
    assert any(words.search(t.lower()) for t in texts)


def test_config_validation():
    with pytest.raises(ValueError, match="max_objects"):
        ShapesConfig(max_objects=10)
    with pytest.raises(ValueError, match="image_format"):
        ShapesConfig(image_format="gif")
    with pytest.raises(ValueError, match="partial_caption_prob"):
        ShapesConfig(partial_caption_prob=1.5)
    assert ShapesConfig(image_format="JPEG").image_format == "jpg"
    assert ShapesConfig.from_dict(ShapesConfig().to_json()) == ShapesConfig()


def test_datasets_package_is_ours_not_hugging_face():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.dirname(os.path.abspath(datasets.__file__)) == os.path.join(here, "datasets")
    assert os.path.dirname(os.path.abspath(shapesworld.__file__)) == os.path.join(here, "shapesworld")


# -------------------------------------------------------------------------------- pinned output
# Two tiny worlds and the SHA-256 of every annotation file they consist of (and of the PNG world's
# pixels, which do not depend on the zlib version): a change to any generated byte fails here.
PINNED = {
    "png": (dict(seed=5, image_size=32, num_train_images=12, num_val_images=4, num_test_images=4,
                 captions_per_image=3, vqa_questions_per_image=2, nlvr2_pairs=(6, 2, 2)), {
        "answer_list.json": "2cd6a8db7ade20dcd13d2836b749777fbca510989808ac08d51f70953c712af7",
        "caption_test.json": "5fcce753b6b4abde9b3414b41e46db7da73e42b1e57af2906e25502f24aad1a0",
        "caption_test_gt.json": "293c5574ba25344863fc11e797cda6942c141702c8f862800acbd7fcac588082",
        "caption_train.json": "b615e6ee4da4ce4c0c96dd48ad9102150a053ef25009e42acd8e7c49a5076a15",
        "caption_val.json": "7eeaf21741236ffc514521fbd102db9ad0f905d03dbdb93f70d1f736bf680204",
        "caption_val_gt.json": "78673e590dab493357b023f68ca539922ccc05a8425c879492431c8134701bc8",
        "nlvr2_dev.json": "856786c524eb077edb0538b8402a94eb778db7725b97850c23edc802208b61cb",
        "nlvr2_test.json": "6ba60be6b55e187d6fd38b89c6cbd838b2fefcc8913a8fc3bd110e5af73053c4",
        "nlvr2_train.json": "509c8a8605ec988c25f116a8a0e9847469e5279e476a22acbd5fef6b1c70b35d",
        "pretrain.json": "925fd155b80bee8425f4b7b82f857a2f50ece992da299fd04347670dd07b016a",
        "retrieval_test.json": "2a3176a8855e386e0ffa909d6ea8f01c7fc67704fb8189edcdf7e78b08786b07",
        "retrieval_train.json": "b615e6ee4da4ce4c0c96dd48ad9102150a053ef25009e42acd8e7c49a5076a15",
        "retrieval_val.json": "ee3ba96bd03a458d3da1cec215733c59717409e2f0ca07d76d6922ea7f134832",
        "scenes.json": "ca911cb79159bf1029e9651f787c7a2420b3427b08278484d24d6d967c76442d",
        "vqa_test.json": "66778f25162084b982eb46bb9aa623f126fcbda9549bb4efe6fc9ff9f5b50b65",
        "vqa_test_gt.json": "ed28b84198fbcaea931306d9f11872314e528ec9231d6845c493f36419a01379",
        "vqa_train.json": "35a27f5c25f5f45c3d4af3231ccf37d1fdc889e28cd87407443ba943adfbf163",
        "vqa_val.json": "75a999226fabd907a0e152f0640e4faa50406e1ef188cb66d6f451218f87aa41",
    }, "82e651a2501ebec270b4afa460b30b9d3b08af2f0382845950225a11b91972ef",
        "8bdfd23080171b22788171b7b018668126b5cb399418c5c57b0cbdc2a2f55cf6"),
    "jpg_nopos": (dict(seed=1, image_size=40, num_train_images=8, num_val_images=3, num_test_images=3,
                       captions_per_image=2, vqa_questions_per_image=2, nlvr2_pairs=(4, 2, 2), image_format="jpg",
                       use_positions=False, partial_caption_prob=0.7, textured_background_prob=0.6,
                       max_objects=5), {
        "answer_list.json": "29d4a0b63d0acdf3449200a93a3c91c68897b2fa39a35d51cb1efd4d1a223f06",
        "caption_test.json": "cd160924c968c43dda45e005d466e7aee683efe93fa491cd5369bb576a9ef842",
        "caption_test_gt.json": "295caa4db66ed0998fe35e6b1558c4f599461df05461f730dfb23e68e1c5a545",
        "caption_train.json": "5e78369ae6a3e940f8d51339f3dabfc3faaca8ed6443ea64c2c623bed32ced54",
        "caption_val.json": "eec06fc5298c3c41dbb2e8bae50ad0aeb33f97d3d584e6341122262092c3529c",
        "caption_val_gt.json": "db634aa5776797876e6001cb328d79a642f0fa41a543b484d5532a55b7a9534f",
        "nlvr2_dev.json": "e19bdb15c2df76a57486f78aac73d97c6036f1931e706c16171b7d78cb8fc6e4",
        "nlvr2_test.json": "bebbc46f50c2ade7887b811eed58a02321bd685f5b2de3cd7699035f3ac5419f",
        "nlvr2_train.json": "c3941140e214f8c1538589a71083416bd0ac3c987f52bdedf905f8da80844c7f",
        "pretrain.json": "31bd848019732b11883e454488d7815220b1dd92bd4a51bd930cc878760c9fa9",
        "retrieval_test.json": "b56a3284745134f47ca02f8241009a7b47218fbb5e34ef1510b771942e5c0cea",
        "retrieval_train.json": "5e78369ae6a3e940f8d51339f3dabfc3faaca8ed6443ea64c2c623bed32ced54",
        "retrieval_val.json": "8b3943b1a3960f3febabd2b0d843187d055cfdfba725cfb83230b1845d10c64a",
        "scenes.json": "c0c665e61057837e2f4858e11a5baa4e7437139f4d86e36ac920032b6ca6dff5",
        "vqa_test.json": "83e3f15397c7483de5ae68ff280ec4e89915ea2315d70afe31e2bf899e21f433",
        "vqa_test_gt.json": "954dc18cf5030d7b8ecad892300677e5502f143aca252a41d28f55b811e7b166",
        "vqa_train.json": "2bc0dd530d7bc14f521bbb6e051600ae2f4e0308f314ca1f93d355d7032b132c",
        "vqa_val.json": "9892912408463efa3a066c4e7ed967122f9bea3cbcac7f30ede98b58ba5f5a53",
    }, "693c6d7784c0feeae0795beb3a3600cce95188b404cb7aad0d877821968d3ee4", None),
}


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_generated_bytes_are_pinned(name, tmp_path):
    options, digests, first_manifest, pixels = PINNED[name]
    generate_shapes(tmp_path, ShapesConfig(**options))
    assert sorted(digests) == sorted(record.ANNOTATION_FILES)
    assert {f: sha256(tmp_path / f) for f in digests} == digests
    # the manifest, with the generator name of the first release (its version is the current one: 1.1 added the
    # objects' boxes to scenes.json)
    manifest = (tmp_path / "manifest.json").read_bytes()
    assert json.loads(manifest)["generator"] == GENERATOR
    first = manifest.replace(f'"generator": "{GENERATOR}"'.encode(), f'"generator": "{record.FIRST_GENERATOR}"'.encode())
    assert hashlib.sha256(first).hexdigest() == first_manifest
    if pixels is not None:
        h = hashlib.sha256()
        for rel in sorted(load(tmp_path, "scenes.json")):
            h.update(rel.encode())
            h.update(np.asarray(Image.open(tmp_path / rel).convert("RGB")).tobytes())
        assert h.hexdigest() == pixels


def test_cleaning_is_the_datasets_albef_cleaning(world_dir):
    scenes = load(world_dir, "scenes.json")
    texts = [c for sc in scenes.values() for c in sc["captions"]]
    assert texts and all(len(clean(c).split()) <= 30 for c in texts)
    for c in texts:  # the words the parser reads are the words the models see
        assert clean(c) == pre_caption(c, style="albef") == pre_caption(c, max_words=None, style="albef")
    for r in load(world_dir, "nlvr2_train.json") + load(world_dir, "vqa_train.json"):
        text = r.get("sentence") or r["question"]
        assert clean(text) == pre_caption(text, max_words=None, style="albef")
    for raw, cleaned in {
            "A small red circle at the top-left, and a large blue square.":
                "a small red circle at the top left and a large blue square",
            "  Two  shapes: a Cross/star <person>!\n": "two shapes a cross star person",
            'Is there a "red" (small) diamond?': "is there a red small diamond"}.items():
        assert clean(raw) == cleaned
    long = " ".join(["a red circle and"] * 10) + " a blue star"
    assert len(clean(long).split()) == 43 and len(pre_caption(long).split()) == 30  # no word limit of its own


# ------------------------------------------------------------------ the presets' x-synthetic section
def _fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f.type
        hint = typing.get_type_hints(cls)[f.name]
        for t in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(t):
                yield from _fields(t, f"{prefix}{f.name}.")


def test_no_run_config_and_no_product_module_has_a_synthetic_setting():
    entries, _ = discover()
    assert len(entries) >= 5
    for e in entries:
        for key, _ in _fields(e.cls):
            assert not re.search(r"shapes|synthetic", key.split(".")[-1]), (e.cls.__name__, key)
    here = Path(__file__).resolve().parents[1]
    for package in ("tasks", "datasets", "engine", "models"):
        for path in (here / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert "x-synthetic" not in text, path
            imports = re.findall(r"^\s*(?:from|import) (shapesworld[\w.]*)", text, re.M)
            assert set(imports) <= {"shapesworld.truth"}, (path, imports)  # only the truth oracle


def test_demo_presets_ask_for_the_world_in_its_own_folder():
    here = Path(__file__).resolve().parents[1]
    presets = {"configs/demo/pretrain.yaml": "tasks.pretrain", "configs/demo/pretrain_minilm.yaml": "tasks.pretrain",
               **{config: module for module, config in TASKS.values() if config.startswith("configs/demo/")}}
    assert sorted(presets) == sorted(str(p.relative_to(here)) for p in (here / "configs/demo").glob("*.yaml"))
    for config, module in presets.items():
        raw = read_config(here / config)  # with its includes, as the entry points read it
        assert raw["x-synthetic"] == {"root": "data/shapes"}, config
        paths = [v for v in strings_in(raw["data"]) if "/" in v]
        assert paths and all(p.startswith("data/shapes/") or p == "data/shapes" for p in paths), config
        schema = (find_config_class(importlib.import_module(module))[0] if module != "tasks.pretrain"
                  else importlib.import_module(module).PretrainConfig)
        load_config(schema, here / config)  # the schema skips the section
        with pytest.raises(ConfigError, match="synthetic"):  # a key of its own is still an error
            load_config(schema, here / config, ["synthetic.root=x"])


def _tiny_preset(tmp_path, root) -> tuple[Path, list[str]]:
    config = tmp_path / "preset.yaml"
    config.write_text("x-synthetic:\n  root: %s\ndata:\n  train_files: [%s/pretrain.json]\n  image_root: %s\n"
                      % (root, root, root))
    return config, [f"x-synthetic.{k}={v}" for k, v in {"seed": 3, "image_size": 24, "num_train_images": 6,
                                                           "num_val_images": 2, "num_test_images": 2,
                                                           "nlvr2_pairs": "[2, 1, 1]"}.items()]


def _prepare_in_child(config, overrides, queue):
    queue.put(prepare(config, overrides)["config"])


def test_prepare_generates_the_world_once_whatever_the_number_of_processes(tmp_path, capfd):
    root = tmp_path / "w"
    config, sets = _tiny_preset(tmp_path, root)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(config, sets, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    configs = [queue.get(timeout=5) for _ in procs]
    assert all(c == configs[0] for c in configs) and configs[0]["num_train_images"] == 6
    assert capfd.readouterr().out.count("created the synthetic shapes data") == 1  # the others found it complete
    stamp = os.path.getmtime(root / "scenes.json")
    assert prepare(config, sets)["complete"] and os.path.getmtime(root / "scenes.json") == stamp
    assert prepare(config, [*sets, "x-synthetic=null"]) is None
    assert prepare(config, [*sets, f"data.train_files=[{tmp_path / 'mine.json'}]", f"data.image_root={tmp_path}"]) is None


def test_prepare_errors_name_the_section_and_write_nothing(tmp_path):
    root = tmp_path / "w"
    config, sets = _tiny_preset(tmp_path, root)
    for bad, words in (("x-synthetic.sed=3", "sed"), ("x-synthetic=5", "mapping"),
                       ("x-synthetic.image_size=big", "image_size")):
        with pytest.raises(ConfigError, match=f"x-synthetic.*{words}"):
            prepare(config, [*sets, bad])
    with pytest.raises(ConfigError, match="train.batchsize"):  # the run config is checked first
        prepare(config, [*sets, "train.batchsize=8"], schema=PretrainConfig)
    assert not root.exists()
    root.mkdir()
    (root / "pretrain.json").write_text("[mine]")
    with pytest.raises(ConfigError, match="pretrain.json") as err:
        prepare(config, sets)
    assert "\n" not in str(err.value) and (root / "pretrain.json").read_text() == "[mine]"


def test_run_finetune_on_a_demo_task_generates_its_world_in_one_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo's data/shapes is tmp_path/data/shapes
    model = [o for o in tiny_overrides(tmp_path, tmp_path) if o.startswith(("model.vision.", "model.text.",
                                                                            "model.embed_dim", "model.queue_size"))]
    tiny = "{seed: 3, image_size: 32, num_train_images: 16, num_val_images: 4, num_test_images: 4, nlvr2_pairs: [2, 1, 1]}"
    config = Path(__file__).resolve().parents[1] / "configs/demo/retrieval.yaml"
    rc = run_finetune.main(["--task", "retrieval_shapes", "--config", str(config), "--set", *model, f"x-synthetic={tiny}",
                            f"train.output_dir={tmp_path / 'out'}", "data.num_workers=0", "train.batch_size=8",
                            "train.max_steps=1", "train.num_threads=1", "train.progress=false", "eval.k_test=4",
                            "eval.progress=false"])
    assert rc == 0
    assert "created the synthetic shapes data in data/shapes" in capsys.readouterr().out
    assert record.is_complete(tmp_path / "data/shapes", ShapesConfig.from_dict(json.loads(
        (tmp_path / "data/shapes/manifest.json").read_text())["config"]))
    assert list((tmp_path / "out").glob("results_*test*.json"))


def test_python_m_shapesworld(tmp_path):
    out = tmp_path / "w"
    res = subprocess.run([sys.executable, "-m", "shapesworld", "--out", str(out), "--image-size", "24",
                          "--num-train-images", "3", "--num-val-images", "1", "--num-test-images", "1",
                          "--nlvr2-pairs", "1", "1", "1", "--workers", "1"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "wrote the shapes world" in res.stdout and load(out, "manifest.json")["complete"]
