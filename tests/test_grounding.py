"""Grounding by Grad-CAM (tasks/grounding.py, shapesworld/grounding.py, benchmarks/grounding_shapes.py):
the IoU and box rules against hand-worked cases, the objects' boxes against the rendered pixels, and
the whole evaluation end to end on a tiny world."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shapesworld.config import ShapesConfig
from shapesworld.grounding import grounding_items
from shapesworld.scene import COLORS, Scene, SceneObject, render_scene, sample_scene
from tasks.grounding import (GroundingConfig, baselines, box_iou, heat_box, largest_region, rank_boxes,
                             score_heats)
from tests.pretrain_helpers import one_thread, pretrained, world  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)
    assert box_iou((0, 0, 2, 2), (2, 2, 4, 4)) == 0.0  # touching corners
    assert box_iou(None, (0, 0, 1, 1)) == 0.0 and box_iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0


def test_heat_box_threshold_and_largest_region():
    heat = torch.zeros(20, 30)
    heat[2:6, 3:9] = 1.0        # a large region (24 px) at full heat
    heat[12:14, 20:22] = 0.9    # a small one (4 px) above the threshold
    heat[15:19, 0:2] = 0.2      # below it
    cfg = GroundingConfig(threshold=0.5)
    assert heat_box(heat, cfg) == (3.0, 2.0, 9.0, 6.0)
    assert heat_box(heat, GroundingConfig(threshold=0.5, region="all")) == (3.0, 2.0, 22.0, 14.0)
    assert heat_box(heat, GroundingConfig(threshold=0.1, region="all")) == (0.0, 2.0, 22.0, 19.0)
    assert heat_box(torch.zeros(5, 5), cfg) is None and heat_box(-torch.ones(5, 5), cfg) is None
    diagonal = np.eye(4, dtype=bool)
    assert largest_region(diagonal, 4).sum() == 1 and largest_region(diagonal, 8).sum() == 4
    with pytest.raises(ValueError, match="grounding.threshold"):
        GroundingConfig(threshold=0.0).validate()
    with pytest.raises(ValueError, match="grounding.connectivity"):
        GroundingConfig(connectivity=6).validate()


def test_rank_boxes_is_heat_per_area_power():
    heat = torch.zeros(10, 10)
    heat[0:2, 0:2] = 1.0                              # 4 units in a 4 px box
    boxes = [(0, 0, 2, 2), (0, 0, 10, 10)]            # the big box holds the same 4 units in 100 px
    assert rank_boxes(heat, boxes, 0.5) == 0          # 4 / 2 > 4 / 10
    assert rank_boxes(heat, boxes, 0.0) == 0          # a tie on the sum: the first
    heat[5:10, 5:10] = 0.5                            # the big box now holds 16.5
    assert rank_boxes(heat, boxes, 0.0) == 1 and rank_boxes(heat, boxes, 1.0) == 0


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "diamond", "star", "cross"])
def test_object_box_is_the_box_of_its_rendered_pixels(shape):
    for radius, x, y in ((5, 20, 24), (13, 47, 50), (8, 83, 16)):
        obj = SceneObject(shape, "red", "large", "center", "middle", x, y, radius)
        img = np.asarray(render_scene(Scene(0, "test", (obj,), "plain", (200, 200, 200)), 96))
        ys, xs = np.nonzero((img != (200, 200, 200)).any(-1))
        assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert (img[ys, xs] == COLORS["red"]).all()


def test_grounding_items_name_one_object_each(world):
    items = grounding_items(str(world), "test")
    scenes = json.loads((world / "scenes.json").read_text())
    test = {p: s for p, s in scenes.items() if s["split"] == "test"}
    assert len(items) == sum(len(s["objects"]) for s in test.values())
    for it in items:
        o = test[it["image"]]["objects"][it["object"]]
        assert it["phrase"] == f"{o['color']} {o['shape']}" and it["box"] == o["box"]
        assert it["boxes"][it["object"]] == it["box"]
    with pytest.raises(ValueError, match="names several objects"):
        grounding_items(str(world), "test", "{size} shape")
    with pytest.raises(ValueError, match="unknown field 'colour'"):
        grounding_items(str(world), "test", "{colour} {shape}")


def test_a_world_without_boxes_is_a_one_line_error(tmp_path):
    scene = sample_scene(np.random.default_rng(0), ShapesConfig(), 0, "test").to_dict()
    for o in scene["objects"]:
        del o["box"]
    (tmp_path / "scenes.json").write_text(json.dumps({"images/test/000000.png": scene}))
    with pytest.raises(ValueError, match="objects without a box: the world was written before shapes-1.1"):
        grounding_items(str(tmp_path), "test")


def test_scores_of_perfect_and_wrong_heat_maps_and_the_baselines(world):
    items = grounding_items(str(world), "test")
    perfect, wrong = [], []
    for it in items:
        h = torch.zeros(32, 32)
        x0, y0, x1, y1 = it["box"]
        h[y0:y1, x0:x1] = 1.0
        perfect.append(h)
        wrong.append(torch.roll(h, shifts=(16, 16), dims=(0, 1)))  # the same box, half the image away
    cfg = GroundingConfig()
    assert score_heats(perfect, items, cfg) == {"n": len(items), "heat_box_acc": 1.0, "heat_box_mean_iou": 1.0,
                                                "rank_acc": 1.0}
    assert score_heats(wrong, items, cfg)["heat_box_acc"] == 0.0
    chance = baselines(items, [(32, 32)] * len(items), cfg)
    expected = np.mean([np.mean([box_iou(b, it["box"]) >= 0.5 for b in it["boxes"]]) for it in items])
    assert chance["random_candidate_acc"] == pytest.approx(expected)
    assert 0.0 <= chance["random_box_acc"] < 0.5 and chance["centre_box_acc"] in {k / len(items) for k in range(len(items) + 1)}


def test_pipeline_gradcam_words_and_the_benchmark_end_to_end(world, pretrained, tmp_path):
    from inference import load_model_and_preprocess

    spec = importlib.util.spec_from_file_location("grounding_shapes", ROOT / "benchmarks/grounding_shapes.py")
    grounding_shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grounding_shapes)

    pipe = load_model_and_preprocess(pretrained)
    image = sorted((world / "images/test").glob("*.png"))[0]
    cam = pipe.gradcam(image, "A red, circle!")
    assert cam.text == "a red circle" and cam.words == ["a", "red", "circle"]
    assert cam.tokens[0] == "[CLS]" and cam.tokens[-1] == "[SEP]" and cam.token_maps.shape == (len(cam.tokens), 4, 4)
    torch.testing.assert_close(cam.phrase_map, cam.token_maps.mean(0))
    assert (cam.token_maps >= 0).all() and cam.at_size(cam.phrase_map, (32, 32)).shape == (32, 32)
    out = tmp_path / "grounding.json"
    assert grounding_shapes.main(["--checkpoint", str(pretrained), "--data", str(world), "--thresholds", "0.5",
                                  "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    items = grounding_items(str(world), "test")
    assert report["phrases"] == len(items) and [r["layer"] for r in report["results"]] == [0]
    heats = grounding_shapes_heats(pipe, items, world)
    assert report["results"][0]["heat_box_acc"] == score_heats(heats, items, GroundingConfig())["heat_box_acc"]
    assert set(report["baselines"]) >= {"centre_box_acc", "random_box_acc", "random_candidate_acc", "multi_object"}
    assert report["command"].startswith("python benchmarks/grounding_shapes.py --checkpoint") and report["date"]
    with pytest.raises(SystemExit):
        grounding_shapes.main(["--checkpoint", str(pretrained), "--region", "biggest"])
    assert grounding_shapes.main(["--checkpoint", str(pretrained), "--data", str(world), "--layers", "3",
                                  "--out", str(out)]) == 2


def grounding_shapes_heats(pipe, items, world):
    """The phrase maps at the image size, re-computed from ``Pipeline.gradcam`` directly."""
    from PIL import Image
    out = []
    for it in items:
        img = Image.open(world / it["image"]).convert("RGB")
        cam = pipe.gradcam(img, it["phrase"])
        out.append(cam.at_size(cam.phrase_map, (img.height, img.width)))
    return out
