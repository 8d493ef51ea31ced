"""Tests for the synthetic shapes world (datasets/shapes.py): files, formats, oracle, rendering."""
import json
import os
import re
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import datasets
from datasets import shapes as S
from datasets.shapes import (COLORS, Claim, ObjectSpec, ShapesConfig, ShapesWorld, albef_clean,
                             answer_question, claim_is_true, ensure_shapes, generate_shapes,
                             make_captions, parse_caption, parse_statement, sample_scene)

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
    for name in S.ANNOTATION_FILES + ("manifest.json",):
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
        assert r["dataset"] == "vqa" and r["answer_type"] in S.ANSWER_TYPES
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
        cleaned = albef_clean(cap)
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
            assert parse_caption(albef_clean(cap.text)) == cap.claim, cap
            assert parse_caption(albef_clean(cap.text).upper() + "!") == cap.claim
            assert claim_is_true(cap.claim, scene), cap
    assert set(kinds) == set(S.CAPTION_KINDS)


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
            assert int(o["x"] // cell) == S.COLS.index(o["col"])
            assert int(o["y"] // cell) == S.ROWS.index(o["row"])
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
    assert set(types) == set(S.ANSWER_TYPES)
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
    real, calls = S._render_job, []

    def crashing(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(job)

    monkeypatch.setattr(S, "_render_job", crashing)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes(tmp_path, cfg, force=True)
    monkeypatch.setattr(S, "_render_job", real)
    assert not os.path.exists(tmp_path / "manifest.json")
    assert S.is_complete(tmp_path, cfg) is None
    man, created = ensure_shapes(tmp_path, cfg)
    assert created and S.is_complete(tmp_path, cfg) == man


def test_cli_writes_and_then_reports_up_to_date(tmp_path, capsys):
    out = str(tmp_path / "w")
    args = ["--out", out, "--seed", "3", "--num-train-images", "8", "--num-val-images", "2",
            "--num-test-images", "2", "--nlvr2-pairs", "4", "2", "2", "--partial-caption-prob",
            "0.7", "--no-use-positions", "--workers", "1"]
    assert S.main(args) == 0
    text = capsys.readouterr().out
    assert "wrote the shapes world" in text and "pretrain.json" in text and " s " in text
    man = load(out, "manifest.json")
    assert man["config"]["seed"] == 3 and man["config"]["partial_caption_prob"] == 0.7
    assert man["config"]["use_positions"] is False and man["config"]["nlvr2_pairs"] == [4, 2, 2]
    assert S.main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert S.main(["--out", out, "--max-objects", "12"]) == 2


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
    assert os.path.abspath(S.__file__).startswith(os.path.join(here, "datasets"))
