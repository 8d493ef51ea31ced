"""Retrieval evaluation pieces: Recall@K against independent re-computations, ITM re-ranking,
the batched evaluator against per-pair scores, the data readers' errors, and the configs."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from datasets.formats import load_image
from datasets.retrieval_data import RetrievalTrainDataset, read_eval_split, tokenize_texts
from datasets.text import train_wordpiece_tokenizer
from datasets.transforms import build_transform
from engine.config import ConfigError, load_config, read_yaml
from models.text import TextConfig
from models.vision import VisionConfig
from models.vlp import VLPConfig, VLPModel
from tasks import retrieval_eval
from models.loading import load_checkpoint_into
from tasks.finetune_config import model_from_checkpoint
from tasks.retrieval import RetrievalConfig
from tasks.retrieval_eval import RetrievalEvalConfig, RetrievalEvaluator
from tasks.retrieval_ranking import (by_construction, chance_note, chance_recall, chance_recall_pairs, final_ranks,
                                    itc_candidates, query_ranks, ranks_from_score_matrix, recall_metrics, rerank)
from tests.pretrain_helpers import ROOT, make_world
from tests.pretrain_helpers import one_thread  # noqa: F401 (autouse fixture: one thread per test)


# ------------------------------------------------------------------------------ independent references
def ref_order(scores: list[float]) -> list[int]:
    """Descending, ties by the lower index: written with plain Python sorting."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


def ref_recalls(score: list[list[float]], txt2img: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    n_i, n_t = len(score), len(score[0])
    out = {}
    i2t_hits = {k: 0 for k in ks}
    for i in range(n_i):
        order = ref_order(score[i])
        best = min(order.index(t) for t in range(n_t) if txt2img[t] == i)  # any of its captions
        for k in ks:
            i2t_hits[k] += best < k
    t2i_hits = {k: 0 for k in ks}
    for t in range(n_t):
        order = ref_order([score[i][t] for i in range(n_i)])
        for k in ks:
            t2i_hits[k] += order.index(txt2img[t]) < k
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * i2t_hits[k] / n_i
        out[f"img_r{k}"] = 100.0 * t2i_hits[k] / n_t
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


# 3 images with 3, 2 and 2 captions; ties on purpose
TXT2IMG = [0, 0, 0, 1, 1, 2, 2]
SCORES = [
    [0.1, 0.9, 0.2, 0.9, 0.5, 0.0, 0.3],   # image 0: its caption 1 ties with caption 3 (3 loses: higher index)
    [0.8, 0.1, 0.1, 0.2, 0.7, 0.8, 0.1],   # image 1: best own caption (4) at rank 2
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],   # image 2: all tied -> its first caption (5) at rank 5
]


def test_recall_matches_independent_computation_with_ties_and_any_caption_rule():
    i2t, t2i = ranks_from_score_matrix(torch.tensor(SCORES), TXT2IMG)
    assert i2t.tolist() == [0, 2, 5]
    got = recall_metrics(i2t, t2i, (1, 2, 3, 5, 10))
    want = ref_recalls(SCORES, TXT2IMG, (1, 2, 3, 5, 10))
    assert got == pytest.approx(want)
    # by hand: image->text R@1 = 1/3 (image 0 hits through its second caption), R@3 = 2/3
    assert got["txt_r1"] == pytest.approx(100 / 3) and got["txt_r3"] == pytest.approx(200 / 3)
    # text->image per caption: caption 0 ranks image 1 first (0.8 > 0.5 > 0.1) -> miss at R@1
    assert t2i[0].item() == 2


def test_recall_random_matrices_against_reference():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        txt2img = torch.randint(0, 4, (13,), generator=g).tolist()
        txt2img[:4] = [0, 1, 2, 3]  # every image has a caption
        s = torch.randint(0, 5, (4, 13), generator=g).float()  # small integers: many ties
        i2t, t2i = ranks_from_score_matrix(s, txt2img)
        assert recall_metrics(i2t, t2i) == pytest.approx(ref_recalls(s.tolist(), txt2img))


def test_chance_recall_is_the_exact_expectation():
    rel = torch.tensor([[True, False, False, False, False],
                        [True, True, False, False, False],
                        [False, False, True, True, True]])
    got = chance_recall(rel, ks=(1, 2))
    for k in (1, 2):
        for key, r in ((f"txt_r{k}", rel), (f"img_r{k}", rel.T)):
            n_items = r.shape[1]
            expect = 0.0
            for row in r.tolist():  # average over every top-k set: all orders are equally likely
                sets = list(itertools.combinations(range(n_items), k))
                expect += sum(any(row[j] for j in top) for top in sets) / len(sets)
            assert got[key] == pytest.approx(100.0 * expect / r.shape[0])


def test_chance_recall_of_a_split_against_every_ranking_and_a_simulation():
    # 4 images with 1, 2, 3 and 1 captions (7 captions)
    txt2img = [0, 1, 1, 2, 2, 2, 3]
    ks = (1, 2, 3, 5, 10)
    got = chance_recall_pairs(txt2img, 4, ks)
    # enumeration: the mean recall over every ranking of the 7 captions (image->text) and of the 4 images
    want = {}
    for k in ks:
        hits = [min(order.index(t) for t in range(7) if txt2img[t] == i) < k
                for order in itertools.permutations(range(7)) for i in range(4)]
        want[f"txt_r{k}"] = 100.0 * sum(hits) / len(hits)
        hits = [order.index(txt2img[t]) < k for order in itertools.permutations(range(4)) for t in range(7)]
        want[f"img_r{k}"] = 100.0 * sum(hits) / len(hits)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    # the closed forms: text->image K / N; image->text 1 - C(T - c, K) / C(T, K)
    assert got["img_r1"] == pytest.approx(25.0) and got["img_r5"] == 100.0
    assert got["txt_r2"] == pytest.approx(100 * sum(1 - math.comb(7 - c, 2) / math.comb(7, 2) for c in (1, 2, 3, 1)) / 4)
    assert got["r_mean"] == pytest.approx((got["txt_r_mean"] + got["img_r_mean"]) / 2)
    # simulation: random score matrices through the evaluation's own ranking and recall code
    g = torch.Generator().manual_seed(0)
    sims = [recall_metrics(*ranks_from_score_matrix(torch.rand(4, 7, generator=g), txt2img), ks) for _ in range(3000)]
    for key in want:
        assert sum(s[key] for s in sims) / len(sims) == pytest.approx(got[key], abs=2.0), key


def test_chance_note_names_the_recalls_that_are_100_by_construction():
    chance = chance_recall_pairs([i // 3 for i in range(18)], 6)  # 6 images x 3 captions
    assert chance["img_r10"] == 100.0 and chance["img_r5"] == pytest.approx(500 / 6)
    assert by_construction(chance) == ["img_r10"]
    note = chance_note(chance, 6, 18)
    assert "text->image R@10" in note and "6 images" in note and "image->text" not in note
    assert chance_note(chance_recall_pairs([i // 5 for i in range(1000)], 200), 200, 1000) == ""


def test_rerank_keeps_exactly_k_and_can_change_the_order():
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    txt = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.3], [1.0, 0.6], [0.1, 1.0], [0.3, 1.0]]), dim=1)
    txt2img = torch.tensor([0, 0, 1, 0, 1])  # caption 3 of image 0 is outside its top 3
    sim, idx, pos = itc_candidates(img, txt, 3, txt2img, torch.arange(5), chunk=1)
    assert idx.tolist() == [[0, 1, 2], [3, 4, 2]] and idx.shape == (2, 3)
    # ITM prefers the ITC-last candidate of each list
    itm = torch.tensor([[0.0, 1.0, 5.0], [0.0, 2.0, 1.0]])
    ranked, score = rerank(idx, sim, itm, "albef")
    assert ranked.tolist() == [[2, 1, 0], [4, 2, 3]]
    assert torch.equal(score, itm.gather(1, torch.tensor([[2, 1, 0], [1, 2, 0]])))
    for q in range(2):  # same candidates, exactly k of them
        assert sorted(ranked[q].tolist()) == sorted(idx[q].tolist())
    blip_ranked, blip_score = rerank(idx, sim, itm, "blip")
    assert torch.allclose(blip_score, (itm + sim).gather(1, stable_perm(itm + sim)))
    # ITM ties keep the ITC order
    tied, _ = rerank(idx, sim, torch.zeros(2, 3), "albef")
    assert torch.equal(tied, idx)
    # a ground truth outside the top k keeps its ITC position; inside it takes its new position
    ranks = final_ranks(ranked, txt2img, torch.arange(5), pos)
    assert ranks.tolist() == [2, 1, 1, 4, 0]
    with pytest.raises(ValueError, match="score rule"):
        rerank(idx, sim, itm, "clip")


def stable_perm(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([ref_order(row) for row in x.tolist()])


@pytest.mark.parametrize("rule", ["albef", "blip"])
def test_pipeline_ranks_match_full_matrix_reference(rule):
    g = torch.Generator().manual_seed(1)
    n_i, k = 6, 4
    txt2img = [0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5, 5, 2]
    n_t = len(txt2img)
    img = torch.nn.functional.normalize(torch.randn(n_i, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(n_t, 8, generator=g), dim=1)
    itm = torch.randn(n_i, n_t, generator=g)
    sim = (img @ txt.T).tolist()
    t = torch.tensor(txt2img)
    ar = torch.arange(n_t)
    # pipeline
    s1, i1, p1 = itc_candidates(img, txt, k, t, ar, chunk=4)
    r1, _ = rerank(i1, s1, itm.gather(1, i1), rule)
    i2t = query_ranks(final_ranks(r1, t, ar, p1), t, n_i)
    s2, i2, p2 = itc_candidates(txt, img, k, ar, t, chunk=5)
    r2, _ = rerank(i2, s2, itm.T.gather(1, i2), rule)
    t2i = final_ranks(r2, ar, t, p2)

    # reference: plain Python, one query at a time
    def ranked(itc_row, itm_row):
        order = ref_order(itc_row)
        top = order[:k]
        rs = [itm_row[j] + (itc_row[j] if rule == "blip" else 0.0) for j in top]
        top = [top[p] for p in sorted(range(k), key=lambda p: (-rs[p], p))]
        return top + order[k:]

    for i in range(n_i):
        full = ranked(sim[i], itm[i].tolist())
        assert i2t[i].item() == min(full.index(c) for c in range(n_t) if txt2img[c] == i)
        assert r1[i].tolist() == full[:k]
    for c in range(n_t):
        full = ranked([sim[i][c] for i in range(n_i)], itm[:, c].tolist())
        assert t2i[c].item() == full.index(txt2img[c])
        assert r2[c].tolist() == full[:k]


# ------------------------------------------------------------------------------ the evaluator
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("shapes_rt"))


def tiny_model(vocab: int) -> VLPModel:
    torch.manual_seed(0)
    cfg = VLPConfig(vision=VisionConfig(img_size=32, patch_size=8, width=32, depth=1, num_heads=2),
                    text=TextConfig(vocab_size=vocab, hidden_size=32, num_text_layers=1, num_fusion_layers=1,
                                    num_heads=2, intermediate_size=64, max_position_embeddings=64),
                    embed_dim=16)
    return VLPModel(cfg)


def test_evaluator_matches_per_pair_scores_and_is_cache_independent(world):
    data = read_eval_split(world / "retrieval_test.json", world)
    tok = train_wordpiece_tokenizer(data.texts, 80)
    model = tiny_model(len(tok))
    tf = build_transform(32, False)
    base = RetrievalEvalConfig(k_test=5, batch_size=3, itm_batch_size=7, itc_chunk=4, progress=False)

    def evaluate(**kw):
        return RetrievalEvaluator(data, tok, dataclasses.replace(base, **kw), tf, 30, torch.device("cpu")).run(model)

    res = evaluate()
    assert res.i2t_ranked.shape == (data.num_images, 5) and res.t2i_ranked.shape == (data.num_texts, 5)
    assert model.training  # restored
    # independent: every pair on its own (batch of one), then the ALBEF score = ITM logit of "match"
    model.eval()
    ids, mask = tokenize_texts(tok, data.texts, 30)
    images = torch.stack([tf(load_image(f)) for f in data.image_files])
    with torch.no_grad():
        tokens = [model.encode_image(images[i:i + 1]) for i in range(data.num_images)]
        states = [model.encode_text(ids[t:t + 1], mask[t:t + 1]) for t in range(data.num_texts)]

        def itm(i, t):
            return model.itm_logits(model.fuse(states[t], mask[t:t + 1], tokens[i]))[0, 1].item()

        for i in range(data.num_images):
            want = [itm(i, t) for t in res.i2t_ranked[i].tolist()]
            assert res.i2t_scores[i].tolist() == pytest.approx(want, abs=1e-5)
            assert all(a >= b for a, b in zip(want, want[1:]))
        for t in range(data.num_texts):
            want = [itm(i, t) for i in res.t2i_ranked[t].tolist()]
            assert res.t2i_scores[t].tolist() == pytest.approx(want, abs=1e-5)
        # ITC candidates: the top 5 by cosine
        img_feat = torch.cat([model.image_feat(x) for x in tokens])
        txt_feat = torch.cat([model.text_feat(s) for s in states])
        sims = img_feat @ txt_feat.T
        for i in range(data.num_images):
            assert set(res.i2t_ranked[i].tolist()) == set(sims[i].topk(5).indices.tolist())
    model.train()
    # the image-token cache gives identical numbers; recomputed text states agree closely
    cached = evaluate(cache_image_tokens=True)
    assert torch.equal(cached.i2t_scores, res.i2t_scores) and torch.equal(cached.t2i_ranked, res.t2i_ranked)
    other = evaluate(cache_text_states=False, itm_batch_size=64, batch_size=8)
    assert torch.allclose(other.i2t_scores, res.i2t_scores, atol=1e-5)
    assert other.metrics == res.metrics
    blip = evaluate(score_rule="blip")
    assert blip.score_rule == "blip" and blip.itc_metrics == res.itc_metrics


def test_reranking_projects_image_keys_values_once_per_image_with_the_per_pair_scores(world, monkeypatch):
    """The evaluator's fusion reads each image's cross-attention keys/values once per fusion call
    (``fuse(..., image_index=...)``), not once per pair: the scores agree with fusing the image tokens
    gathered per pair (the reference path) to 1e-5 and the rankings are identical, in both
    directions, while the key projections see ``images`` rows instead of ``pairs``."""
    data = read_eval_split(world / "retrieval_test.json", world)
    tok = train_wordpiece_tokenizer(data.texts, 80)
    torch.manual_seed(1)
    cfg = VLPConfig(vision=VisionConfig(img_size=32, patch_size=8, width=32, depth=1, num_heads=2),
                    text=TextConfig(vocab_size=len(tok), hidden_size=32, num_text_layers=1, num_fusion_layers=2,
                                    num_heads=2, intermediate_size=64, max_position_embeddings=64),
                    embed_dim=16)
    model = VLPModel(cfg)
    tf = build_transform(32, False)
    fusion = model.text.encoder.layer[1:]
    rows: list[int] = []  # image rows each fusion layer's key projection saw, summed over calls
    hooks = [layer.crossattention.self.key.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
             for layer in fusion]

    def evaluate(**kw):
        rows.clear()
        ecfg = RetrievalEvalConfig(k_test=5, batch_size=4, progress=False, **kw)
        res = RetrievalEvaluator(data, tok, ecfg, tf, 30, torch.device("cpu")).run(model)
        return res, sum(rows) // len(fusion)

    def gathered_scores(model, states, mask, tokens, img):
        """The reference path: image tokens gathered per pair, keys/values projected per pair."""
        return model.itm_logits(model.fuse(states, mask, tokens[img]))[:, 1].float()

    for itm_batch in (10_000, 7):
        new, projected = evaluate(itm_batch_size=itm_batch)
        with monkeypatch.context() as mp:
            mp.setattr(retrieval_eval, "itm_match_scores", gathered_scores, raising=False)
            ref, projected_ref = evaluate(itm_batch_size=itm_batch)
        assert projected_ref == ref.num_pairs == new.num_pairs > 2 * data.num_images
        per_chunk = _pairs_per_chunk(new, data, 4)
        assert sum(per_chunk) == new.num_pairs
        if itm_batch == 10_000:  # all pairs of an image chunk in one fusion call: each image projected once
            assert projected == data.num_images
        else:  # an image is projected once in each fusion call that holds pairs of it
            calls = sum(-(-n // itm_batch) for n in per_chunk)
            assert data.num_images <= projected <= data.num_images + calls - 1 < new.num_pairs
        for got, want in ((new.i2t_scores, ref.i2t_scores), (new.t2i_scores, ref.t2i_scores)):
            assert torch.allclose(got, want, atol=1e-5, rtol=0)
        assert torch.equal(new.i2t_ranked, ref.i2t_ranked) and torch.equal(new.t2i_ranked, ref.t2i_ranked)
        assert new.metrics == ref.metrics
    for h in hooks:
        h.remove()


def _pairs_per_chunk(res, data, chunk: int) -> list[int]:
    """Unique re-ranked (image, caption) pairs of each image chunk, from the ranked lists."""
    pairs = {(i, t) for i in range(data.num_images) for t in res.i2t_ranked[i].tolist()}
    pairs |= {(i, t) for t in range(data.num_texts) for i in res.t2i_ranked[t].tolist()}
    return [sum(1 for i, _ in pairs if i // chunk == c) for c in range(-(-data.num_images // chunk))]


# ------------------------------------------------------------------------------ data readers
def test_eval_split_missing_image_and_missing_captions_name_the_record(world, tmp_path):
    records = json.loads((world / "retrieval_test.json").read_text())
    bad = [dict(r) for r in records]
    bad[3]["image"] = "images/test/nope.png"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(FileNotFoundError, match=r"record 3: image 'images/test/nope.png' not found"):
        read_eval_split(path, world)
    bad = [dict(r) for r in records]
    bad[5]["caption"] = []
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"record 5 .*no captions"):
        read_eval_split(path, world)
    bad = [dict(r) for r in records]
    del bad[2]["caption"]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"record 2: missing key 'caption'"):
        read_eval_split(path, world)
    bad = [dict(r) for r in records]
    bad[1]["caption"] = ["a red circle", 7]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"record 1 .*caption 1 must be a string"):
        read_eval_split(path, world)
    data = read_eval_split(world / "retrieval_test.json", world)
    assert data.num_texts == sum(len(r["caption"]) for r in records)
    assert all(data.txt2img[t] == i for i, ts in enumerate(data.img2txt) for t in ts)


def test_train_dataset_maps_image_ids_and_checks_images(world, tmp_path):
    records = json.loads((world / "retrieval_train.json").read_text())[:6]
    for r, iid in zip(records, ["a", "a", "b", 7, "a", 7]):
        r["image_id"] = iid
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    ds = RetrievalTrainDataset(path, world, build_transform(32, True), seed=1)
    assert [ds[i]["image_idx"] for i in range(6)] == [0, 0, 1, 2, 0, 2]
    assert ds[2]["caption"] == ds.all_captions()[2]
    records[4]["image"] = "images/train/missing.png"
    path.write_text(json.dumps(records))
    with pytest.raises(FileNotFoundError, match="record 4: image 'images/train/missing.png'"):
        RetrievalTrainDataset(path, world, build_transform(32, True))


# ------------------------------------------------------------------------------ configs
def test_configs_load_with_the_paper_settings():
    flickr = load_config(RetrievalConfig, ROOT / "configs/retrieval_flickr.yaml")
    coco = load_config(RetrievalConfig, ROOT / "configs/retrieval_coco.yaml")
    for cfg, k, epochs in ((flickr, 128, 10), (coco, 256, 5)):
        assert cfg.eval.k_test == k and cfg.train.epochs == epochs
        assert cfg.model.vision.img_size == 384 and cfg.optim.lr == cfg.optim.lr_vision == 1e-5
        assert cfg.train.batch_size == 256 and cfg.loss.queue_size == 65536 and cfg.optim.weight_decay == 0.02
        assert cfg.schedule.kind == "cosine" and cfg.eval.score_rule == "albef"
    demo = load_config(RetrievalConfig, ROOT / "configs/demo/retrieval.yaml")
    from tasks.pretrain import PretrainConfig
    pre = load_config(PretrainConfig, ROOT / "configs/demo/pretrain.yaml")
    # the demo fine-tunes the demo pre-training checkpoint: the same architecture (dropout is a
    # training setting and may differ)
    def arch(m):
        return dataclasses.replace(m, text=dataclasses.replace(m.text, hidden_dropout=0.0, attention_dropout=0.0))
    assert arch(demo.model) == arch(pre.model)
    assert read_yaml(ROOT / "configs/demo/retrieval.yaml")["x-synthetic"]["root"] == demo.data.image_root  # asks for the world
    with pytest.raises(ConfigError, match="helper"):
        load_config(RetrievalConfig, None, ["loss.contrastive.helper_checkpoint=x.pth"])
    with pytest.raises(ConfigError, match="score_rule"):
        load_config(RetrievalConfig, None, ["eval.score_rule=clip"])


def test_architecture_mismatch_is_a_clear_error():
    cfg = load_config(RetrievalConfig, ROOT / "configs/demo/retrieval.yaml")
    model = VLPModel(cfg.model)
    saved = {"model": {"vision": {"width": 256, "img_size": 32}, "text": {"hidden_size": 128}, "embed_dim": 64}}
    # the driver takes the model from the checkpoint and refuses a config that sets another architecture ...
    with pytest.raises(ConfigError, match=r"model.vision.width: checkpoint 256, config 128"):
        model_from_checkpoint(cfg.model, saved["model"], "ck.pth")
    # ... and loading a checkpoint compares its saved config with the model's
    with pytest.raises(ConfigError, match=r"ck.pth .*model.vision.width: checkpoint 256, config 128"):
        load_checkpoint_into(model, {"model": model.state_dict(), "config": saved}, source="ck.pth")
    saved["model"]["vision"]["width"] = 128  # image size may differ
    model_from_checkpoint(cfg.model, saved["model"], "ck.pth")
    load_checkpoint_into(model, {"model": model.state_dict(), "config": saved}, source="ck.pth")
