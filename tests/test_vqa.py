"""Generative VQA: ALBEF's answer weights and loss, answer ranking against a direct likelihood
computation, vocabulary extension, readers, and an end-to-end run (train a few steps, answer,
score, files written, --evaluate with ranking and with open generation)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from datasets.text import tokenizer_state, train_wordpiece_tokenizer
from datasets.vqa_data import answer_targets, extend_tokenizer, read_vqa, tokenize_answers
from engine.checkpoint import load_checkpoint
from engine.config import load_config, to_dict
from models.decoder import DecoderConfig
from engine.trainer import checkpoint_sections
from models.vlp import VLPConfig, VLPModel
from objectives.pretrain import PretrainLossConfig, PretrainObjective
from models.vision import VisionConfig
from models.text import TextConfig
from models.vqa import VQAModel, pad_vocab_rows
from tasks.vqa import VQAConfig, main, run
from tasks.vqa_metrics import evaluate_vqa
from tests.pretrain_helpers import TINY_MODEL
from tests.pretrain_helpers import world  # noqa: F401 (module fixture: the tiny shapes world)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/demo/vqa.yaml"
ANSWERS = ["yes", "no", "red", "blue square", "two", "a big red circle", "green", "one"]


def tiny_vlp(vocab: int) -> VLPConfig:
    return VLPConfig(vision=VisionConfig(img_size=16, patch_size=8, width=16, depth=1, num_heads=2),
                     text=TextConfig(vocab_size=vocab, hidden_size=16, num_text_layers=1, num_fusion_layers=1,
                                     num_heads=2, intermediate_size=32, max_position_embeddings=32,
                                     hidden_dropout=0.0, attention_dropout=0.0),
                     embed_dim=8)


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece_tokenizer(["is there a red circle", "what color is the square"] + ANSWERS, 80)


def tiny_model(tok, seed: int = 0) -> VQAModel:
    torch.manual_seed(seed)
    model = VQAModel(tiny_vlp(len(tok)), DecoderConfig())
    model.init_decoder_from_base()
    with torch.no_grad():  # a decoder whose answer likelihoods differ clearly
        model.decoder.text.embeddings.word_embeddings.weight.mul_(10)
    return model.eval()


def inputs(tok, B: int = 3):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(B, 3, 16, 16, generator=g)
    q = tok(["is there a red circle", "what color is the square", "is there a square"][:B], padding="longest",
            return_tensors="pt")
    return image, q["input_ids"], q["attention_mask"]


def answer_loglik64(model, fused_row, qmask_row, ids_row, mask_row) -> float:
    """log P(answer tokens after [CLS] | question), float64, one full forward pass."""
    n = int(mask_row.sum())
    ids = ids_row[:n][None]
    with torch.no_grad():
        logits = model.decoder(ids, None, fused_row[None], qmask_row[None])[0].double()
    logp = F.log_softmax(logits, -1)
    return sum(float(logp[t - 1, ids[0, t]]) for t in range(1, n))


def test_answer_targets_follow_albef():
    assert answer_targets(["a", "b", "a", "a"]) == (["a", "b"], [0.75, 0.25])
    assert answer_targets(["a"], "vg", 0.5) == (["a"], [0.5])
    a, w = answer_targets(["x"] * 3 + ["y"] * 7, "vqa")
    assert a == ["x", "y"] and w == pytest.approx([0.3, 0.7])


def test_answer_weighted_loss_matches_a_direct_computation(tok):
    model = tiny_model(tok)
    image, qids, qmask = inputs(tok, 2)
    answers = ["red", "blue square", "two"]  # question 0 has two answers, question 1 one
    a_ids, a_mask = tokenize_answers(tok, answers, 10)
    weights = torch.tensor([0.7, 0.3, 1.0])
    n = torch.tensor([2, 1])
    with torch.no_grad():
        loss = model(image, qids, qmask, a_ids, a_mask, weights, n)
        fused = model.encode(image, qids, qmask)
    owner = [0, 0, 1]
    ref = sum(-float(weights[j]) * answer_loglik64(model, fused[owner[j]], qmask[owner[j]], a_ids[j], a_mask[j])
              for j in range(3)) / 2
    assert float(loss) == pytest.approx(ref, rel=1e-5)


def test_rank_answers_returns_list_answers_ordered_by_likelihood(tok):
    model = tiny_model(tok, seed=1)
    image, qids, qmask = inputs(tok)
    a_ids, a_mask = tokenize_answers(tok, ANSWERS, 10)
    with torch.no_grad():
        fused = model.encode(image, qids, qmask)
        idx_all, ll_all = model.rank_answers(fused, qmask, a_ids, a_mask, k=100, chunk=5)  # k > A: all answers
        idx3, ll3 = model.rank_answers(fused, qmask, a_ids, a_mask, k=3)
        first = F.log_softmax(model.decoder(a_ids[:1, :1].expand(3, 1), None, fused, qmask)[:, 0].double(), -1)
    assert idx_all.shape == (3, len(ANSWERS)) and idx3.shape == (3, 3)
    for b in range(3):
        direct = [answer_loglik64(model, fused[b], qmask[b], a_ids[j], a_mask[j]) for j in range(len(ANSWERS))]
        order = sorted(range(len(ANSWERS)), key=lambda j: -direct[j])
        assert idx_all[b].tolist() == order  # every answer once, in likelihood order
        assert ll_all[b].tolist() == pytest.approx([direct[j] for j in order], abs=1e-4)
        # k = 3: the three answers with the most probable first token, ordered by full likelihood
        first_tok = first[b, a_ids[:, 1]]
        top3 = set(first_tok.topk(3).indices.tolist())
        assert set(idx3[b].tolist()) == top3
        assert idx3[b].tolist() == sorted(top3, key=lambda j: -direct[j])


def test_extend_tokenizer_and_pad_vocab_rows():
    tok = train_wordpiece_tokenizer(["two red circles", "one blue square"], 60)
    assert tok.unk_token_id in tok("3")["input_ids"]
    ext, added = extend_tokenizer(tok, ["3", "how many 12 shapes"])
    assert "3" in added and "1" in added and "##2" in added
    for text in ("3", "12", "how many 12 shapes", "two red circles"):
        assert ext.unk_token_id not in ext(text)["input_ids"], text
    assert ext("two red circles")["input_ids"] == tok("two red circles")["input_ids"]  # old ids unchanged
    same, none = extend_tokenizer(ext, ["3 12"])
    assert none == [] and same is ext

    model = VLPModel(tiny_vlp(len(tok)))
    state = model.state_dict()
    old_emb = state["text.embeddings.word_embeddings.weight"].clone()
    keys = pad_vocab_rows(state, len(ext))
    assert set(keys) == {"text.embeddings.word_embeddings.weight", "mlm_head.decoder.weight", "mlm_head.bias"}
    emb = state["text.embeddings.word_embeddings.weight"]
    assert emb.shape[0] == len(ext) and torch.equal(emb[:len(tok)], old_emb)
    assert state["mlm_head.decoder.weight"] is emb  # tied tensors stay one tensor
    assert (state["mlm_head.bias"][len(tok):] == 0).all() and 0 < float(emb[len(tok):].std()) < 0.05


def test_reader_errors(tmp_path):
    f = tmp_path / "q.json"
    f.write_text(json.dumps([{"question_id": 1, "question": "q?", "image": "a.png"}]))
    with pytest.raises(ValueError, match="record 0 .*no answers"):
        read_vqa(f, require_answers=True)
    assert read_vqa(f, require_answers=False)[0]["dataset"] == "vqa"
    f.write_text(json.dumps([{"question_id": 1, "question": "q?", "image": "a.png", "answer": "yes", "dataset": "coco"}]))
    with pytest.raises(ValueError, match="'dataset' must be"):
        read_vqa(f, require_answers=True)
    f.write_text(json.dumps([{"question_id": 1, "question": "q?", "image": "a.png", "answer": "yes", "dataset": "vg"}]))
    assert read_vqa(f, require_answers=True)[0]["answer"] == ["yes"]


# ----------------------------------------------------------------------------- end to end
def tiny_vqa_overrides(world: Path, out: Path, **extra) -> list[str]:
    o = {
        **TINY_MODEL,
        "data.train_files": f"[{world / 'vqa_train.json'}]", "data.image_root": str(world),
        "data.val_file": str(world / "vqa_val.json"), "data.test_file": str(world / "vqa_test.json"),
        "data.test_gt_file": str(world / "vqa_test_gt.json"), "data.answer_list": str(world / "answer_list.json"),
        "x-synthetic": "null", "data.num_workers": 0, "data.eval_batch_size": 5,
        "train.output_dir": str(out), "train.batch_size": 16, "train.epochs": 1, "train.max_steps": 3,
        "train.log_every": 1, "train.progress": "false", "schedule.warmup_steps": 1,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.mark.slow
def test_end_to_end_from_a_pretraining_checkpoint(world, tmp_path):
    # a pre-training checkpoint whose tokenizer never saw digits (as the demo's): the number answers
    # need the vocabulary extension
    captions = [c for r in json.loads((world / "pretrain.json").read_text()) for c in r["caption"]]
    ptok = train_wordpiece_tokenizer([c for c in captions if not any(ch.isdigit() for ch in c)], 120)
    cfg = load_config(VQAConfig, DEMO, tiny_vqa_overrides(world, tmp_path / "unused"))
    mcfg = to_dict(cfg.model)
    mcfg["text"]["vocab_size"] = len(ptok)
    from engine.config import from_dict
    base = VLPModel(from_dict(VLPConfig, mcfg))
    objective = PretrainObjective(base, PretrainLossConfig(queue_size=8))  # a pre-training checkpoint holds both
    ckpt_path = tmp_path / "pretrain.pth"
    torch.save({**checkpoint_sections(objective, objective.state_dict()), "config": {"model": mcfg},
                "tokenizer": tokenizer_state(ptok)}, ckpt_path)

    out = tmp_path / "run"
    results = run(load_config(VQAConfig, DEMO, tiny_vqa_overrides(world, out)), checkpoint=str(ckpt_path))
    saved = load_checkpoint(out / "checkpoint_best.pth")
    assert len(saved["tokenizer"]["vocab"]) > len(ptok)  # extended and saved with the model
    answer_list = json.loads((world / "answer_list.json").read_text())
    for split, gt_file in (("val", "vqa_val.json"), ("test", "vqa_test_gt.json")):
        preds = json.loads((out / f"vqa_{split}_result.json").read_text())
        gt = json.loads((world / gt_file).read_text())
        assert sorted(p["question_id"] for p in preds) == sorted(r["question_id"] for r in gt)
        assert all(p["answer"] in answer_list for p in preds)
        acc = evaluate_vqa(preds, gt)
        assert results["splits"][split]["accuracy"] == pytest.approx(acc["overall"])
        assert results["splits"][split]["per_answer_type"] == pytest.approx(acc["per_answer_type"])
    res = json.loads((out / "results.json").read_text())
    assert res["selected_by"] == "val accuracy" and res["inference"] == "rank"

    # --evaluate with the fine-tuned checkpoint reproduces the test answers; open generation also runs
    ev = tmp_path / "ev"
    ns = argparse.Namespace(config=str(DEMO), set=tiny_vqa_overrides(world, ev), checkpoint=str(out / "checkpoint_best.pth"),
                            evaluate=True, zero_shot=False, resume=None, predict=None)
    assert main(ns) == 0
    assert json.loads((ev / "vqa_test_result.json").read_text()) == json.loads((out / "vqa_test_result.json").read_text())
    gen = tmp_path / "gen"
    ns.set = tiny_vqa_overrides(world, gen, **{"eval.inference": "generate", "generation.max_length": 4})
    assert main(ns) == 0
    preds = json.loads((gen / "vqa_test_result.json").read_text())
    assert len(preds) == 8 and all(isinstance(p["answer"], str) for p in preds)
    assert json.loads((gen / "results.json").read_text())["inference"] == "generate"
