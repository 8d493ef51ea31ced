"""Captioning: data readers, the training collator, the scoring wrapper against pycocoevalcap's
scorers called directly, model initialisation from a pre-training checkpoint, and an end-to-end
run (train a few steps, generate, score, files written, --evaluate and --predict)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from datasets.caption_data import (CaptionTrainCollator, coco_image_id, load_coco_references, prompt_length,
                                   read_caption_split, split_image_ids)
from datasets.text import tokenizer_state, train_wordpiece_tokenizer
from engine import distributed as D
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError, load_config, to_dict
from engine.trainer import checkpoint_sections
from models.vlp import VLPModel
from objectives.pretrain import PretrainLossConfig, PretrainObjective
from tasks.caption import CaptionConfig, build_model, main, run
from tasks.finetune_config import with_vocab
from tasks.spec import Run
from tasks.caption_eval import SPICE_JARS, predictions_to_results, score_captions, spice_command
from tasks.caption_generate import references_for
from tests.pretrain_helpers import TINY_MODEL
from tests.pretrain_helpers import world  # noqa: F401 (module fixture: the tiny shapes world)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/demo/caption.yaml"

REFS = {1: ["A red circle on the left.", "there is a red circle", "a circle that is red"],
        2: ["Two blue squares.", "an image with two squares", "two small blue squares next to each other"],
        3: ["a green star", "A large green star in the center!", "one star"]}
CANDS = [{"image_id": 1, "caption": "a red circle"}, {"image_id": 2, "caption": "two blue squares next to a circle"},
         {"image_id": 3, "caption": "a large star"}]


# ----------------------------------------------------------------------------- scoring
def test_scores_equal_pycocoevalcap_scorers_called_directly(monkeypatch):
    import pycocoevalcap.meteor.meteor as meteor_mod
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in REFS.items()})
    res = tok.tokenize({p["image_id"]: [{"caption": p["caption"]}] for p in CANDS})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, cider_per = Cider().compute_score(gts, res)
    # METEOR starts a JVM that loads its tables (seconds): one process serves both the direct call and the
    # wrapper's (the wrapper creates its scorer through the patched class and closes it afterwards)
    meteor_scorer = meteor_mod.Meteor()
    meteor, _ = meteor_scorer.compute_score(gts, res)
    monkeypatch.setattr(meteor_mod, "Meteor", lambda: meteor_scorer)
    ours = score_captions(CANDS + [{"image_id": 99, "caption": "not scored"}], REFS,
                          ["bleu", "meteor", "rouge", "cider", "spice"])
    assert meteor_scorer.meteor_p.poll() is not None  # the wrapper stopped the METEOR process
    expected = {"Bleu_1": bleu[0], "Bleu_2": bleu[1], "Bleu_3": bleu[2], "Bleu_4": bleu[3], "METEOR": meteor,
                "ROUGE_L": rouge, "CIDEr": cider}
    assert ours.scores == pytest.approx(expected, rel=1e-9)
    assert [ours.per_image[i]["CIDEr"] for i in (1, 2, 3)] == pytest.approx(list(cider_per))
    assert "SPICE" not in ours.scores and "never downloads" in ours.skipped["SPICE"]
    assert ours.num_images == 3
    assert ours.to_json()["metrics_x100"]["CIDEr"] == pytest.approx(100 * cider)


def test_scoring_errors_and_spice_needs_local_jars(tmp_path):
    with pytest.raises(ValueError, match="no generated caption"):
        score_captions(CANDS[:2], REFS, ["bleu"])
    with pytest.raises(ValueError, match="unknown caption metric"):
        score_captions(CANDS, REFS, ["bleurt"])
    with pytest.raises(ValueError, match="more than once"):
        score_captions(CANDS + CANDS[:1], REFS, ["bleu"])
    # a configured directory without the CoreNLP jars: a clear error, and Java is never started
    with pytest.raises(FileNotFoundError, match="stanford-corenlp-3.6.0"):
        score_captions(CANDS, REFS, ["spice"], spice_models_dir=str(tmp_path))
    cmd = spice_command("/pkg/spice", "/models", "in.json", "out.json", "cache")
    cp = cmd[cmd.index("-cp") + 1].split(":")
    assert [f"/models/{j}" for j in SPICE_JARS] == cp[1:3] and cp[0] == "/pkg/spice/spice-1.0.jar"
    assert "edu.anu.spice.SpiceScorer" in cmd


# ----------------------------------------------------------------------------- data
def test_image_ids_references_and_errors(tmp_path):
    assert coco_image_id({"image": "val2014/COCO_val2014_000000391895.jpg"}) == 391895
    assert coco_image_id({"image": "x.jpg", "image_id": "17"}) == 17
    with pytest.raises(ValueError, match="image id"):
        coco_image_id({"image": "photo.jpg"}, "f.json", 3)
    (tmp_path / "a.png").write_bytes(b"")
    split_file = tmp_path / "val.json"
    split_file.write_text(json.dumps([{"image": "a.png", "caption": ["x", "y"], "image_id": 5}]))
    split = read_caption_split(split_file, tmp_path)
    assert split.image_ids == [5] and split.references == {5: ["x", "y"]}
    split_file.write_text(json.dumps([{"image": "b.png", "caption": ["x"], "image_id": 5}]))
    with pytest.raises(FileNotFoundError, match="record 0: image 'b.png' not found"):
        read_caption_split(split_file, tmp_path)
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 5}, {"id": 6}], "annotations": [{"image_id": 5, "caption": "x"}]}))
    with pytest.raises(ValueError, match="id 6.*no caption"):
        load_coco_references(gt)
    gt.write_text(json.dumps({"annotations": [{"image_id": 5, "caption": "x"}, {"image_id": 5, "caption": "z"}]}))
    assert load_coco_references(gt) == {5: ["x", "z"]}


def test_image_ids_of_a_split_without_integer_ids_follow_the_record_order(tmp_path):
    # a folder of one's own photos: no image_id, file names without numbers -> 0, 1, 2 by record order
    own = [{"image": "photos/cat.jpg", "caption": ["a cat"]}, {"image": "photos/dog.jpg", "caption": ["a dog", "dog"]},
           {"image": "photos/sky.jpg", "caption": "a blue sky", "image_id": "sky"}]
    assert split_image_ids(own, "own.json") == [0, 1, 2]
    # BLIP's file-name rule when every name ends in a distinct number; the order when two names share one
    coco = [{"image": "val2014/COCO_val2014_000000391895.jpg"}, {"image": "val2014/COCO_val2014_000000000042.jpg"}]
    assert split_image_ids(coco) == [391895, 42]
    assert split_image_ids([{"image": "a/img1.jpg"}, {"image": "b/img1.jpg"}]) == [0, 1]
    assert split_image_ids([{"image": "x.jpg", "image_id": 7}, {"image": "y.jpg", "image_id": "8"}]) == [7, 8]
    with pytest.raises(ValueError, match=r"'f.json' record 1: no integer 'image_id' .* while record 0 has one"):
        split_image_ids([{"image": "x.jpg", "image_id": 7}, {"image": "y.jpg"}], "f.json")
    # read: the references are the records' own captions under those ids; the results name the images
    (tmp_path / "photos").mkdir()
    for r in own:
        (tmp_path / r["image"]).write_bytes(b"")
    path = tmp_path / "own.json"
    path.write_text(json.dumps(own))
    split = read_caption_split(path, tmp_path)
    assert split.image_ids == [0, 1, 2] and split.image_names == [r["image"] for r in own]
    assert references_for(split, None) == {0: ["a cat"], 1: ["a dog", "dog"], 2: ["a blue sky"]}
    assert predictions_to_results(split.image_ids[::-1], ["s", "d", "c"], split.image_names[::-1]) == [
        {"image_id": 0, "caption": "c", "image": "photos/cat.jpg"}, {"image_id": 1, "caption": "d", "image": "photos/dog.jpg"},
        {"image_id": 2, "caption": "s", "image": "photos/sky.jpg"}]


def test_collator_excludes_prompt_and_padding_from_the_loss():
    tok = train_wordpiece_tokenizer(["a picture of a red circle", "a small blue square on the left"], 200)
    col = CaptionTrainCollator(tok, "a picture of ", max_length=12)
    samples = [{"image": torch.zeros(3, 4, 4), "caption": "a red circle", "index": 0},
               {"image": torch.zeros(3, 4, 4), "caption": "a small blue square on the left", "index": 1}]
    b = col(samples)
    P = prompt_length(tok, "a picture of ")
    assert P == 4  # [CLS] a picture of
    assert (b["labels"][:, :P] == -100).all()
    for i in range(2):
        n = int(b["attention_mask"][i].sum())
        assert b["labels"][i, P:n].tolist() == b["input_ids"][i, P:n].tolist()
        assert (b["labels"][i, n:] == -100).all()
        assert int(b["input_ids"][i, n - 1]) == tok.sep_token_id  # the end token is learned
    assert tok.decode(b["input_ids"][0, P:int(b["attention_mask"][0].sum())], skip_special_tokens=True) == "a red circle"


# ----------------------------------------------------------------------------- model + end to end
def tiny_caption_overrides(world: Path, out: Path, **extra) -> list[str]:
    o = {
        **TINY_MODEL,
        "tokenizer.vocab_size": 120,
        "data.train_files": f"[{world / 'caption_train.json'}]", "data.image_root": str(world),
        "data.val_file": str(world / "caption_val.json"), "data.test_file": str(world / "caption_test.json"),
        "data.val_gt_file": str(world / "caption_val_gt.json"), "data.test_gt_file": str(world / "caption_test_gt.json"),
        "x-synthetic": "null", "data.num_workers": 0, "data.eval_batch_size": 5,
        "eval.test_metrics": "[bleu, rouge, cider, spice]",
        "generation.max_length": 8, "generation.min_length": 2,
        "train.output_dir": str(out), "train.batch_size": 16, "train.epochs": 1, "train.max_steps": 3,
        "train.log_every": 1, "train.progress": "false", "schedule.warmup_steps": 1,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def test_pretraining_checkpoint_initialises_encoder_and_decoder(world, tmp_path):
    cfg = load_config(CaptionConfig, DEMO, tiny_caption_overrides(world, tmp_path))
    tok = train_wordpiece_tokenizer(["a picture of a red circle"], 60)
    cfg = with_vocab(cfg, tok)
    torch.manual_seed(0)
    base = VLPModel(cfg.model)
    objective = PretrainObjective(base, PretrainLossConfig(queue_size=8))  # a pre-training checkpoint holds both
    ckpt = {**checkpoint_sections(objective, objective.state_dict()), "config": {"model": to_dict(cfg.model)},
            "tokenizer": tokenizer_state(tok)}
    model = build_model(Run(cfg, D.DistInfo(), checkpoint="pretrain.pth"), ckpt)
    assert torch.equal(model.visual.pos_embed, base.visual.pos_embed)
    fusion = base.text.encoder.layer[1]  # one text layer, then the fusion layer
    assert torch.equal(model.decoder.text.encoder.layer[0].crossattention.self.key.weight,
                       fusion.crossattention.self.key.weight)
    assert torch.equal(model.decoder.lm_head.bias, base.mlm_head.bias)
    assert not any(k.startswith(("text.", "itm_head", "vision_proj")) for k in model.state_dict())


@pytest.mark.slow
def test_end_to_end_train_generate_score_evaluate_predict(world, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config(CaptionConfig, DEMO, tiny_caption_overrides(world, out))
    metrics = run(cfg)
    for split in ("val", "test"):
        caps = json.loads((out / f"captions_{split}.json").read_text())
        gt = json.loads((world / f"caption_{split}_gt.json").read_text())
        assert sorted(c["image_id"] for c in caps) == sorted(i["id"] for i in gt["images"])
        assert all(isinstance(c["caption"], str) and c["caption"] for c in caps)
        assert set(metrics[split]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    res = json.loads((out / "results.json").read_text())
    assert res["splits"]["test"]["metrics"] == pytest.approx(metrics["test"])
    assert "SPICE" in res["splits"]["test"]["skipped"] and res["generation"]["num_beams"] == 3
    assert res["selected_by"] == "val CIDEr" and (out / "checkpoint_best.pth").is_file()
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]

    # --evaluate (test only) re-generates the same test captions from the selected checkpoint
    ev = tmp_path / "ev"
    ev_set = tiny_caption_overrides(world, ev, **{"data.val_file": "null", "data.val_gt_file": "null"})
    ns = argparse.Namespace(config=str(DEMO), set=ev_set, checkpoint=str(out / "checkpoint_best.pth"),
                            evaluate=True, zero_shot=False, resume=None, predict=None)
    assert main(ns) == 0
    assert json.loads((ev / "captions_test.json").read_text()) == json.loads((out / "captions_test.json").read_text())

    # --predict prints one caption per image
    imgs = [str(world / "images/test" / p) for p in sorted(p.name for p in (world / "images/test").iterdir())[:2]]
    capsys.readouterr()
    ns.evaluate, ns.predict = False, imgs
    assert main(ns) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["image"] for r in rows] == imgs and all(r["caption"] for r in rows)
    test_caps = {c["image_id"]: c["caption"] for c in json.loads((out / "captions_test.json").read_text())}
    first_id = int(Path(imgs[0]).stem)
    assert rows[0]["caption"] == test_caps[first_id]

    # --predict with a pre-training checkpoint is refused with a clear message
    torch.save({"model": VLPModel(with_vocab(cfg, _tok(out)).model).state_dict()}, tmp_path / "p.pth")
    ns.checkpoint = str(tmp_path / "p.pth")
    with pytest.raises(ConfigError, match="no caption decoder"):
        main(ns)


def _tok(out: Path):
    from datasets.text import tokenizer_from_state
    return tokenizer_from_state(load_checkpoint(out / "checkpoint_best.pth")["tokenizer"])
