"""SRCL diagnostics (tasks/srcl_diagnostics.py, tasks/srcl_measures.py), the zero-shot retrieval metrics (tasks/zero_shot.py)
and the diagnostics logged by pre-training, against independent re-computations: brute-force
pairwise AUCs in float64, the shapes world's reference (pure Python) truth oracle, and a queue
reconstructed from the batch history."""
from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.config import load_config
from models import losses as L
from models.vlp import VLPModel
from objectives.pretrain import PretrainObjective, checkpoint_states
from shapesworld.grammar import parse_caption
from shapesworld.truth import ShapesWorld, claim_is_true
from tasks import pretrain as P
from tasks.srcl_diagnostics import diagnose_checkpoint, main as diag_main
from tasks.srcl_measures import QueueTexts, batch_diagnostics
from tasks.zero_shot import format_table, load_vlp_checkpoint, retrieval_metrics, zero_shot_retrieval
from tests.pretrain_helpers import DEMO, make_world, read_log, tiny_overrides

QUEUE = 16  # tiny queue: 2 batches of 8


# ----------------------------------------------------------------------------- references
def pairwise_auc(scores, labels) -> float:
    """P(score of a positive > score of a negative), ties 1/2: the O(n^2) definition."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    tot = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return tot / (len(pos) * len(neg))


def ref_block(neg, truth, sim, w=None) -> dict:
    """The diagnostics of one block with Python loops."""
    rows, cols = len(neg), len(neg[0])
    ws, ss, cs, ts = [], [], [], []
    for i in range(rows):
        js = [j for j in range(cols) if neg[i][j]]
        mean = sum(sim[i][j] for j in js) / len(js) if js else 0.0
        for j in js:
            ts.append(bool(truth[i][j]))
            ss.append(float(sim[i][j]))
            cs.append(float(sim[i][j]) - mean)
            if w is not None:
                ws.append(float(w[i][j]))
    out = {"sim_auc": pairwise_auc(ss, ts), "sim_centred_auc": pairwise_auc(cs, ts),
           "false_negative_rate": sum(ts) / len(ts) if ts else float("nan")}
    if w is not None:
        out["weight_auc"] = pairwise_auc([-x for x in ws], ts)
        fn = [x for x, t in zip(ws, ts) if t]
        tn = [x for x, t in zip(ws, ts) if not t]
        out["weight_w_false_neg"] = sum(fn) / len(fn) if fn else float("nan")
        out["weight_w_true_neg"] = sum(tn) / len(tn) if tn else float("nan")
    return out


def close(a: float, b: float, tol: float = 1e-6) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


# ------------------------------------------------------------------------ hand-made weights
def test_batch_diagnostics_perfect_inverted_random():
    truth = torch.tensor([[False, True, False, False],
                          [False, False, True, True],
                          [True, False, False, False]])
    neg = ~torch.eye(3, 4, dtype=torch.bool)
    sim = torch.where(truth, 0.9, 0.1) + 0.01 * torch.arange(12.0).reshape(3, 4)
    w = torch.where(truth, 0.2, 1.5)
    perfect = batch_diagnostics(neg, truth, sim, w)
    assert perfect["weight_auc"] == 1.0 and perfect["sim_auc"] == 1.0 and perfect["sim_centred_auc"] == 1.0
    assert perfect["weight_w_false_neg"] == pytest.approx(0.2) and perfect["weight_w_true_neg"] == pytest.approx(1.5)
    inverted = batch_diagnostics(neg, truth, -sim, 1.0 / w)
    assert inverted["weight_auc"] == 0.0 and inverted["sim_auc"] == 0.0
    ties = batch_diagnostics(neg, truth, torch.zeros(3, 4), torch.ones(3, 4))
    assert ties["weight_auc"] == 0.5 and ties["sim_auc"] == 0.5
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(200, 200, generator=g) < 0.1
    rnd = batch_diagnostics(torch.ones(200, 200, dtype=torch.bool), truth, torch.rand(200, 200, generator=g),
                            torch.rand(200, 200, generator=g))
    assert rnd["weight_auc"] == pytest.approx(0.5, abs=0.02) and rnd["sim_auc"] == pytest.approx(0.5, abs=0.02)
    assert rnd["false_negative_rate"] == pytest.approx(float(truth.double().mean()))
    # no false negatives at all: AUC undefined, mean weight of false negatives undefined
    none = batch_diagnostics(neg, torch.zeros(3, 4, dtype=torch.bool), sim, w, prefix="queue_")
    assert math.isnan(none["queue_weight_auc"]) and math.isnan(none["queue_weight_w_false_neg"])
    assert none["queue_false_negative_rate"] == 0.0


def test_batch_diagnostics_matches_loops_and_centring_explains_the_weights():
    """Row offsets hide the false negatives from the pooled raw similarity; the weights (normalised
    per anchor) and the anchor-centred similarity see them; all match loop re-computations."""
    rng = random.Random(3)
    rows, cols = 12, 10
    truth = [[rng.random() < 0.25 for _ in range(cols)] for _ in range(rows)]
    offset = [rng.uniform(-0.6, 0.6) for _ in range(rows)]
    sim = [[offset[i] + (0.15 if truth[i][j] else 0.0) + rng.gauss(0, 0.05) for j in range(cols)]
           for i in range(rows)]
    neg = [[(i + j) % 7 != 0 for j in range(cols)] for i in range(rows)]
    t_neg, t_truth, t_sim = torch.tensor(neg), torch.tensor(truth), torch.tensor(sim, dtype=torch.float64)
    w = L.regulation_weights(t_sim, t_neg, delta=1e-3)
    got = batch_diagnostics(t_neg, t_truth, t_sim, w)
    ref = ref_block(neg, truth, sim, w.tolist())
    for key, value in ref.items():
        assert close(got[key], value, 1e-9), key
    assert got["weight_auc"] == pytest.approx(got["sim_centred_auc"], abs=0.02)
    assert got["sim_centred_auc"] > 0.9 > 0.75 > got["sim_auc"]


def test_false_negative_auc_ignores_entries_outside_the_negatives():
    neg = torch.tensor([[False, True, True], [True, False, True]])
    truth = torch.tensor([[True, True, False], [False, True, True]])  # (0,0), (1,1) are positives
    w = torch.tensor([[99.0, 0.5, 1.5], [1.2, -7.0, 0.8]])
    got = batch_diagnostics(neg, truth, torch.zeros(2, 3), w)
    assert got["weight_auc"] == pairwise_auc([-0.5, -1.5, -1.2, -0.8], [True, False, False, True])
    assert got["weight_n_false_neg"] == 2 and got["weight_n_true_neg"] == 2


# ------------------------------------------------------------------------------- queue texts
def test_queue_texts_mirror_the_model_queue():
    """QueueTexts written like the task writes it holds, slot for slot, the items that
    PretrainObjective.enqueue put in the queue (also wrapping around and with more items than slots)."""
    run_cfg = load_config(P.PretrainConfig, DEMO, tiny_overrides(Path("."), Path("."), **{"loss.queue_size": 10}))
    cfg = run_cfg.model
    model = PretrainObjective(VLPModel(cfg), run_cfg.loss)
    texts = QueueTexts(10)
    counter = itertools.count()
    for n in (4, 4, 4, 13, 3, 10):
        ids = torch.tensor([next(counter) for _ in range(n)])
        ptr = int(model.queue_ptr)
        feats = torch.zeros(n, cfg.embed_dim)
        model.enqueue(feats, feats, ids)
        texts.write(ptr, [f"caption {int(i)}" for i in ids])
        for slot in range(10):
            idx = int(model.idx_queue[slot])
            assert texts.texts[slot] == (None if idx < 0 else f"caption {idx}")
    assert bool(texts.known().all())
    QueueTexts(0).write(3, ["a"])  # no queue: nothing to mirror


# ----------------------------------------------------------------------- retrieval metrics
def test_retrieval_metrics_against_brute_force():
    g = torch.Generator().manual_seed(1)
    sim = torch.randn(7, 15, generator=g)
    rel = torch.rand(7, 15, generator=g) < 0.2
    rel[0] = False  # an image nothing is relevant to: never a hit
    got = retrieval_metrics(sim, rel, ks=(1, 3), with_map=True)

    def recall(s, r, k):
        hits = 0
        for i in range(s.shape[0]):
            top = sorted(range(s.shape[1]), key=lambda j: -float(s[i, j]))[:k]
            hits += any(bool(r[i, j]) for j in top)
        return 100.0 * hits / s.shape[0]

    def mean_ap(s, r):
        aps = []
        for i in range(s.shape[0]):
            order = sorted(range(s.shape[1]), key=lambda j: -float(s[i, j]))
            hits, total = 0, 0.0
            for rank, j in enumerate(order, 1):
                if r[i, j]:
                    hits += 1
                    total += hits / rank
            if hits:
                aps.append(total / hits)
        return 100.0 * sum(aps) / len(aps)

    for k in (1, 3):
        assert got[f"txt_r{k}"] == pytest.approx(recall(sim, rel, k))
        assert got[f"img_r{k}"] == pytest.approx(recall(sim.T, rel.T, k))
    assert got["txt_map"] == pytest.approx(mean_ap(sim, rel))
    assert got["img_map"] == pytest.approx(mean_ap(sim.T, rel.T))
    assert got["r_mean"] == pytest.approx(sum(got[f"{d}_r{k}"] for d in ("txt", "img") for k in (1, 3)) / 4)


# ------------------------------------------------------------------ a tiny pre-training run
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("shapes_diag"))


@pytest.fixture(scope="module")
def tiny_run(world, tmp_path_factory):
    """One epoch of SRCL with diagnostics at every step; captures what each diagnostics call saw."""
    out = tmp_path_factory.mktemp("diag_run")
    captured = []
    original = P.PretrainTask.diagnostics

    def spy(self, batch, out_, helper_feats=None):
        res = original(self, batch, out_, helper_feats)
        captured.append({"captions": list(batch["captions"]),
                         "images": [self.dataset.image_path(int(i)) for i in batch["index"]],
                         "neg": out_["neg_mask"].clone(), "sim": out_["sim_i2t_model"].clone(),
                         "w": out_["weights_i2t"].clone(), "result": res})
        return res

    P.PretrainTask.diagnostics = spy
    try:
        cfg = load_config(P.PretrainConfig, DEMO, tiny_overrides(
            world, out, **{"diagnostics.every": 1, "loss.queue_size": QUEUE, "train.epochs": 1, "loss.mlm": 0}))
        P.run(cfg)
    finally:
        P.PretrainTask.diagnostics = original
    return out, captured


def test_logged_diagnostics_match_a_recomputation(tiny_run, world):
    """log.jsonl (diagnostics every step, one step a line) against truth from the reference oracle,
    brute-force AUCs, and the queue's captions rebuilt from the batch history."""
    out, captured = tiny_run
    scenes = ShapesWorld.load(world)
    log = [r for r in read_log(out) if "loss" in r]
    assert len(log) == len(captured) == 6
    history: list[str] = []
    for step, (rec, cap) in enumerate(zip(log, captured)):
        b = len(cap["captions"])
        truth = [[claim_is_true(parse_caption(c), scenes.scene(img)) for c in cap["captions"]]
                 for img in cap["images"]]
        neg, sim, w = cap["neg"].tolist(), cap["sim"].tolist(), cap["w"].tolist()
        ref = ref_block([r[:b] for r in neg], truth, [r[:b] for r in sim], [r[:b] for r in w])
        for key, value in ref.items():
            assert close(rec[f"diag/{key}"], value), (step, key)
        # the queue (read before this step's enqueue): slot k holds the newest earlier caption
        # whose running number is k modulo the queue size
        queue = [None] * QUEUE
        for n, caption in enumerate(history):
            queue[n % QUEUE] = caption
        if step == 0:
            assert not any(k.startswith("diag/queue_") for k in rec)
        else:
            q_truth = [[queue[k] is not None and claim_is_true(parse_caption(queue[k]), scenes.scene(img))
                        for k in range(QUEUE)] for img in cap["images"]]
            q_neg = [[r[b + k] and queue[k] is not None for k in range(QUEUE)] for r in neg]
            ref_q = ref_block(q_neg, q_truth, [r[b:] for r in sim], [r[b:] for r in w])
            for key, value in ref_q.items():
                assert close(rec[f"diag/queue_{key}"], value), (step, key)
        history += cap["captions"]
    # at least one step had false negatives in the queue, so the comparison had content
    assert any(r.get("diag/queue_false_negative_rate", 0) > 0 for r in log)


def test_init_from_and_helper_diagnostics(tiny_run, world, tmp_path):
    """A run initialised from the tiny checkpoint (weights copied, queues empty) with that
    checkpoint as helper logs the helper's AUC, equal to a recomputation from its features."""
    first, _ = tiny_run
    ckpt = str(first / "checkpoint_last.pth")
    cfg = load_config(P.PretrainConfig, DEMO, tiny_overrides(world, tmp_path, **{
        "diagnostics.every": 1, "loss.queue_size": QUEUE, "train.max_steps": 2, "loss.mlm": 0, "loss.itm": 0,
        "loss.contrastive.helper_checkpoint": ckpt}))
    # the initialisation alone: every weight of the checkpoint, empty queues
    first_cfg = load_config(P.PretrainConfig, first / "config.yaml")
    model = PretrainObjective(VLPModel(first_cfg.model), first_cfg.loss)
    saved = load_checkpoint(ckpt)
    P.init_from_checkpoint(model, saved, ckpt)
    empty = PretrainObjective(VLPModel(first_cfg.model), first_cfg.loss).state_dict()
    saved_model, saved_objective = checkpoint_states(saved)
    for key, value in model.state_dict().items():
        if key in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
            assert torch.equal(value, empty[key]), key  # the queues start empty
        else:
            assert torch.equal(value, saved_model[key[len("model."):]] if key.startswith("model.")
                               else saved_objective[key]), key
    assert not torch.equal(saved_objective["idx_queue"], empty["idx_queue"])
    captured = []
    original = P.PretrainTask.diagnostics

    def spy(self, batch, out_, helper_feats=None):
        res = original(self, batch, out_, helper_feats)
        captured.append((batch["captions"], [self.dataset.image_path(int(i)) for i in batch["index"]],
                         out_["neg_mask"].clone(), helper_feats, res))
        return res

    P.PretrainTask.diagnostics = spy
    try:
        P.run(cfg, init_from=ckpt)
    finally:
        P.PretrainTask.diagnostics = original
    scenes = ShapesWorld.load(world)
    log = [r for r in read_log(tmp_path) if "loss" in r]
    assert len(log) == len(captured) == 2 and log[0]["alpha"] == 1.0
    for rec, (captions, images, neg, (fi, ft), _) in zip(log, captured):
        b = len(captions)
        sim_h = (fi.double() @ ft.double().T).tolist()
        truth = [[claim_is_true(parse_caption(c), scenes.scene(img)) for c in captions] for img in images]
        negs = [[bool(neg[i, j]) for j in range(b)] for i in range(b)]
        assert close(rec["diag/helper_sim_auc"], ref_block(negs, truth, sim_h)["sim_auc"])


# --------------------------------------------------------------------- diagnose_checkpoint
def test_diagnose_checkpoint_on_a_tiny_checkpoint(tiny_run, world, tmp_path):
    ckpt = str(tiny_run[0] / "checkpoint_last.pth")
    res = diagnose_checkpoint(ckpt, str(world), split="train", batch_size=1000, progress=False)
    # one batch holds every pair: count its negatives and false negatives with the reference oracle
    scenes = ShapesWorld.load(world)
    pairs = [(p, c) for p in scenes.images("train") for c in scenes.captions[p]]
    n_fn = n_tn = 0
    for (p, _), (q, c) in itertools.product(pairs, pairs):
        if p != q:
            if claim_is_true(parse_caption(c), scenes.scene(p)):
                n_fn += 1
            else:
                n_tn += 1
    assert res["n_batches"] == 1 and res["n_pairs"] == len(pairs)
    assert res["weight_n_false_neg"] == n_fn and res["weight_n_true_neg"] == n_tn > 0 and n_fn > 0
    assert res["false_negative_rate"] == pytest.approx(n_fn / (n_fn + n_tn))
    for key in ("weight_auc", "sim_auc", "sim_centred_auc"):
        assert 0.0 <= res[key] <= 1.0
    assert res["delta"] == 1.0 and res["alpha"] == 0.0 and res["similarity_source"] == "momentum"
    # delta = 0 is InfoNCE: all weights 1, the weight cannot tell anything
    flat = diagnose_checkpoint(ckpt, str(world), split="test", batch_size=8, delta=0.0, progress=False)
    assert flat["weight_auc"] == 0.5 or math.isnan(flat["weight_auc"])
    assert flat["weight_w_true_neg"] == 1.0 and flat["w_top1"] == 1.0
    # the checkpoint as its own helper, both on the online encoders: helper similarity = model similarity
    same = diagnose_checkpoint(ckpt, str(world), split="train", batch_size=16, helper=ckpt,
                               similarity_source="online", progress=False)
    assert same["alpha"] == 1.0 and same["helper_sim_auc"] == pytest.approx(same["sim_auc"], abs=1e-9)
    # the CLI writes the same numbers
    path = tmp_path / "diag.json"
    assert diag_main([ckpt, "--data", str(world), "--split", "train", "--batch-size", "1000", "--json", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert saved["weight_auc"] == pytest.approx(res["weight_auc"]) and saved["sim_auc"] == pytest.approx(res["sim_auc"])
    with pytest.raises(ValueError, match="helper"):
        diagnose_checkpoint(ckpt, str(world), alpha=0.5, progress=False)


def test_diagnose_checkpoint_under_another_regulation(tiny_run, world):
    """``regulation=`` recomputes the weights with other loss.contrastive settings: the first batch's
    weights against a plain re-computation from the checkpoint's momentum text features (an image
    anchor's intra-modal evidence: its own caption's similarity to the batch's captions)."""
    from tasks.srcl_diagnostics import _pairs
    from tasks.zero_shot import itc_features, load_vlp_checkpoint
    from tests.test_losses import ref_evidence, ref_weights
    ckpt = str(tiny_run[0] / "checkpoint_last.pth")
    # (not standardised: the tiny model's caption features lie close together, and dividing by their
    # spread would magnify float32 rounding; the standardisation is checked in tests/test_losses.py)
    reg = {"evidence": "cross+intra", "intra_weight": 3.0, "delta": 20.0}
    res = diagnose_checkpoint(ckpt, str(world), split="train", batch_size=8, progress=False, keep_batch=True,
                              regulation=reg)
    assert (res["evidence"], res["intra_weight"], res["delta"]) == ("cross+intra", 3.0, 20.0)
    model, tok, cfg = load_vlp_checkpoint(ckpt, objective=True)
    pairs = _pairs(ShapesWorld.load(world), "train", cfg.data.max_words, cfg.data.clean_style, 0)
    captions = sorted({c for _, c in pairs})  # encoded as diagnose_checkpoint encodes them (same padding)
    _, txt = itc_features(model, tok, [], captions, cfg.model.vision.img_size, 8, cfg.tokenizer.max_length,
                          momentum=True, progress=False, transform_cfg=cfg.data.transform)
    txt = txt.double()[[captions.index(c) for _, c in pairs[:8]]]
    neg = res["batch"]["neg"]
    ref = ref_weights(ref_evidence(res["batch"]["sim"], neg, "cross+intra", (txt @ txt.T).tolist(), 3.0, False), neg, 20.0)
    assert torch.allclose(torch.tensor(res["batch"]["weights"], dtype=torch.float64),
                          torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    paper = diagnose_checkpoint(ckpt, str(world), split="train", batch_size=8, progress=False, keep_batch=True)
    assert not torch.allclose(torch.tensor(paper["batch"]["weights"]), torch.tensor(res["batch"]["weights"]), atol=1e-3)
    # relative to the pair: caption j's own image is row j, so its pair similarity is the diagonal
    rel = diagnose_checkpoint(ckpt, str(world), split="train", batch_size=8, progress=False, keep_batch=True,
                              regulation={"pair_weight": 0.7, "delta": 20.0})
    sim = rel["batch"]["sim"]
    ref = ref_weights(ref_evidence(sim, neg, "cross", None, 0.0, False, 0.0, [sim[j][j] for j in range(8)], 0.7), neg, 20.0)
    assert rel["pair_weight"] == 0.7
    assert torch.allclose(torch.tensor(rel["batch"]["weights"], dtype=torch.float64),
                          torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(torch.tensor(paper["batch"]["weights"]), torch.tensor(rel["batch"]["weights"]), atol=1e-3)
    # the captions' lengths: each caption's token count, tokenised on its own
    short = diagnose_checkpoint(ckpt, str(world), split="train", batch_size=8, progress=False, keep_batch=True,
                                regulation={"length_weight": 0.05, "delta": 20.0})
    length = [int(tok([c], truncation=True, max_length=cfg.tokenizer.max_length, return_tensors="pt")["attention_mask"].sum())
              for _, c in pairs[:8]]
    assert len(set(length)) > 1 and short["length_weight"] == 0.05
    ref = ref_weights(ref_evidence(sim, neg, "cross", None, 0.0, False, length=length, length_weight=0.05), neg, 20.0)
    assert torch.allclose(torch.tensor(short["batch"]["weights"], dtype=torch.float64),
                          torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(torch.tensor(paper["batch"]["weights"]), torch.tensor(short["batch"]["weights"]), atol=1e-3)
    # an InfoNCE run's checkpoint (its training reads no lengths) judged under the length regulation
    as_infonce = diagnose_checkpoint(ckpt, str(world), split="train", batch_size=8, progress=False, keep_batch=True,
                                     regulation={"kind": "infonce", "length_weight": 0.05, "delta": 20.0})
    assert as_infonce["batch"]["weights"] == short["batch"]["weights"]


def test_zero_shot_retrieval_semantic_counts_every_true_item(tiny_run, world):
    model, tok, cfg = load_vlp_checkpoint(str(tiny_run[0] / "checkpoint_last.pth"))
    res = zero_shot_retrieval(model, tok, str(world), "test", transform_cfg=cfg.data.transform, progress=False)
    recs = json.loads((world / "retrieval_test.json").read_text())
    assert res["n_images"] == len(recs) and res["n_captions"] == sum(len(r["caption"]) for r in recs)
    std, sem, chance = res["standard"], res["semantic"], res["semantic_chance"]
    for k in ("txt_r1", "txt_r5", "img_r1", "img_r5"):
        assert 0.0 <= std[k] <= sem[k] <= 100.0  # a paired item is also a true item
    assert std["img_r10"] == 100.0  # 8 test images: the own image is always in the top 10
    assert 0.0 < chance["img_r1"] <= 100.0 and res["semantic_relevant_per_caption"] >= 1.0
    # the chance level of the standard recalls: K / 8 images text->image, so R@10 is 100 by construction
    assert res["standard_chance"]["img_r1"] == pytest.approx(100 / 8) and res["standard_chance"]["img_r10"] == 100.0
    table = format_table(res)
    assert "standard, random ranking text->image" in table and "100 by construction" in table
    assert "text->image R@10" in table.splitlines()[-1]


def test_judge_checkpoint_scores_and_aucs(tiny_run, world):
    """tasks.srcl_judge: the ITM scores against one fusion pass per pair with the image tokens given
    per row (no shared keys/values), the mean per-image / per-caption AUCs and the pooled AUC against
    brute-force pair counting over the truth from the reference oracle."""
    from datasets.formats import load_image
    from datasets.transforms import build_transform
    from tasks.srcl_diagnostics import _pairs
    from tasks.srcl_judge import itm_scores, judge_checkpoint, mean_auc
    from tasks.zero_shot import itc_features
    ckpt = str(tiny_run[0] / "checkpoint_last.pth")
    obj, tok, cfg = load_vlp_checkpoint(ckpt, objective=True)
    scenes = ShapesWorld.load(world)
    pairs = _pairs(scenes, "train", cfg.data.max_words, cfg.data.clean_style, 0)
    images, captions = sorted({p for p, _ in pairs})[:3], sorted({c for _, c in pairs})[:5]
    paths = [str(world / p) for p in images]
    scores = itm_scores(obj.model, tok, paths, captions, cfg.model.vision.img_size, cfg.tokenizer.max_length,
                        cfg.data.transform, batch_size=2)
    model = obj.model.eval()
    tf = build_transform(cfg.model.vision.img_size, False, cfg.data.transform)
    with torch.no_grad():
        for i, path in enumerate(paths):
            tokens = model.encode_image(tf(load_image(path))[None])
            for j, caption in enumerate(captions):
                enc = tok([caption], return_tensors="pt")
                logits = model.itm_logits(model.fuse(model.encode_text(enc["input_ids"], enc["attention_mask"]),
                                                     enc["attention_mask"], tokens))[0]
                assert math.isclose(float(scores[i, j]), float(logits[1] - logits[0]), rel_tol=1e-4, abs_tol=1e-4)

    res = judge_checkpoint(ckpt, str(world), split="train", batch_size=8, rejudge_k=(2,))
    assert res["itm_trained"] and set(res["judges"]) == {"itc", "itm"}
    assert set(res["weight_auc"]) == {"cross z", "itm z", "cross z + itm z", "cross z, top 2 re-judged by itm"}
    all_images = sorted({p for p, _ in pairs})
    all_captions = sorted({c for _, c in pairs})
    img, txt = itc_features(obj, tok, [str(world / p) for p in all_images], all_captions, cfg.model.vision.img_size, 8,
                            cfg.tokenizer.max_length, momentum=True, progress=False, transform_cfg=cfg.data.transform)
    sim = (img @ txt.T).tolist()
    truth = [[claim_is_true(parse_caption(c), scenes.scene(p)) for c in all_captions] for p in all_images]
    flat = [(s, t) for rs, rt in zip(sim, truth) for s, t in zip(rs, rt)]
    pooled = pairwise_auc([s for s, _ in flat], [t for _, t in flat])
    assert math.isclose(res["judges"]["itc"]["pooled_auc"], pooled, abs_tol=1e-3)
    rows = [pairwise_auc(rs, rt) for rs, rt in zip(sim, truth) if 0 < sum(rt) < len(rt)]
    assert math.isclose(res["judges"]["itc"]["row_auc"], sum(rows) / len(rows), abs_tol=1e-3)
    cols = [pairwise_auc([r[j] for r in sim], [r[j] for r in truth]) for j in range(len(all_captions))
            if 0 < sum(r[j] for r in truth) < len(all_images)]
    assert math.isclose(res["judges"]["itc"]["col_auc"], sum(cols) / len(cols), abs_tol=1e-3)
    assert math.isclose(mean_auc(torch.tensor(sim).T, torch.tensor(truth).T, 0), sum(cols) / len(cols), abs_tol=1e-6)


def _logit_shares(shapes, pairs):
    """Each caption's share of the pairs' images it is true of, as a logit (clamped as the ceilings)."""
    images = sorted({p for p, _ in pairs})
    share = {}
    for c in {c for _, c in pairs}:
        n = sum(shapes.is_true(c, p) for p in images) / len(images)
        n = min(max(n, 1e-3), 1 - 1e-3)
        share[c] = math.log(n / (1 - n))
    return share


def _plain_weight_auc(shapes, pairs, batch_size, evidence, tie_rtol=1e-9):
    """The diagnostics' weight AUC with plain loops: ``evidence(img, negs)`` gives an image anchor's
    evidence for its negative captions; weights exp(-e) / row mean over the negatives; pooled
    Mann-Whitney AUC over all batches' negatives, ties counted half. Returns (auc, slack, mean w of
    the false negatives), the slack bounding what rounding can move among near-ties (weights within
    ``tie_rtol`` of each other)."""
    fn, tn = [], []
    for lo in range(0, len(pairs) - 1, batch_size):
        chunk = pairs[lo:lo + batch_size]
        for img, _ in chunk:
            negs = [c for other, c in chunk if other != img]
            if not negs:
                continue
            e = evidence(img, negs)
            mean = sum(math.exp(-v) for v in e) / len(e)
            for c, v in zip(negs, e):
                (fn if shapes.is_true(c, img) else tn).append(math.exp(-v) / mean)
    assert fn and tn
    close = lambda a, b: abs(a - b) <= tie_rtol * max(a, b)  # noqa: E731  (ties up to rounding)
    auc = sum(0.5 if close(a, b) else float(a < b) for a in fn for b in tn) / (len(fn) * len(tn))
    # equal evidence ties in exact arithmetic; rounding may order such a pair either way, moving
    # the AUC by at most half a pair each
    slack = 0.5 * sum(close(a, b) for a in fn for b in tn) / (len(fn) * len(tn))
    return auc, slack, sum(fn) / len(fn)


def test_evidence_ceiling_rows_against_a_plain_recomputation(tiny_run, world):
    """benchmarks/srcl_evidence.py's ceiling rows: the truth's logit share of images per caption as
    the evidence; the weight AUC re-computed with plain loops (weights exp(-e) / row mean over the
    negatives, pooled Mann-Whitney AUC over all batches' negatives, ties counted half)."""
    from tasks.srcl_diagnostics import _pairs
    from tests.pretrain_helpers import load_benchmark
    ckpt = str(tiny_run[0] / "checkpoint_last.pth")
    res = load_benchmark("srcl_evidence").ceiling_aucs(ckpt, str(world), split="train", batch_size=8)
    _, _, cfg = load_vlp_checkpoint(ckpt)
    shapes = ShapesWorld.load(world)
    pairs = _pairs(shapes, "train", cfg.data.max_words, cfg.data.clean_style, 0)
    share = _logit_shares(shapes, pairs)
    auc, slack, w_fn = _plain_weight_auc(shapes, pairs, 8, lambda img, negs: [share[c] for c in negs])
    row = res["ceiling: the truth's share of images per caption (oracle prior)"]
    assert abs(row["weight_auc"] - auc) <= slack + 1e-9 and slack < 0.05
    assert row["w_false_neg"] == pytest.approx(w_fn, rel=1e-9)


def test_evidence_helper_ceiling_against_a_plain_recomputation(tiny_run, world):
    """The helper ceiling (``--helpers``): the truth's logit share plus the helper's standardised
    cross similarity from its *online* features (as the helper rows judge), re-computed with plain
    loops; it differs from the same ceiling on the momentum features."""
    import os

    from tasks.srcl_diagnostics import _pairs
    from tasks.zero_shot import itc_features
    from tests.pretrain_helpers import load_benchmark
    bench = load_benchmark("srcl_evidence")
    ckpt = str(tiny_run[0] / "checkpoint_last.pth")
    res = bench.ceiling_aucs(ckpt, str(world), split="train", batch_size=8, ceilings=bench.HELPER_CEILINGS,
                             momentum=False)
    assert set(res) == set(bench.HELPER_CEILINGS)
    model, tok, cfg = load_vlp_checkpoint(ckpt)
    shapes = ShapesWorld.load(world)
    pairs = _pairs(shapes, "train", cfg.data.max_words, cfg.data.clean_style, 0)
    images, captions = sorted({p for p, _ in pairs}), sorted({c for _, c in pairs})
    fi, ft = itc_features(model, tok, [os.path.join(world, p) for p in images], captions, cfg.model.vision.img_size,
                          8, cfg.tokenizer.max_length, progress=False, transform_cfg=cfg.data.transform)
    vi = {p: [float(x) for x in fi[i]] for i, p in enumerate(images)}
    vt = {c: [float(x) for x in ft[i]] for i, c in enumerate(captions)}
    share = _logit_shares(shapes, pairs)

    def evidence(img, negs, factor):
        e = [sum(x * y for x, y in zip(vi[img], vt[c])) for c in negs]
        mean = sum(e) / len(e)
        sd = math.sqrt(sum((x - mean) ** 2 for x in e) / len(e))
        return [share[c] + factor * ((x - mean) / sd if sd > 0 else 0.0) for c, x in zip(negs, e)]

    for name, (factor, _) in bench.HELPER_CEILINGS.items():
        # the run's similarities are float32 products (these loops take float64 ones) and the tiny run's
        # spread per anchor is small: weights within 1e-3 of each other may come out in either order
        auc, slack, w_fn = _plain_weight_auc(shapes, pairs, 8, lambda img, negs, f=factor: evidence(img, negs, f),
                                             tie_rtol=1e-3)
        assert abs(res[name]["weight_auc"] - auc) <= slack + 1e-9 and slack < 0.01
        assert res[name]["w_false_neg"] == pytest.approx(w_fn, rel=1e-4)  # (float32 products, as above)
    momentum = bench.ceiling_aucs(ckpt, str(world), split="train", batch_size=8, ceilings=bench.HELPER_CEILINGS)
    assert any(momentum[k]["w_false_neg"] != res[k]["w_false_neg"] for k in res)


def test_evidence_caption_set_rows_against_a_plain_recomputation(tiny_run, world):
    """benchmarks/srcl_evidence.py's caption-set row: each negative caption's highest cosine to any
    caption of the anchor's image in the split, standardised per anchor over its negatives
    (population std), weights exp(-e) / row mean; the pooled AUC and mean weights re-computed with
    plain loops from the checkpoint's momentum text features."""
    import os

    from tasks.srcl_diagnostics import _pairs
    from tasks.zero_shot import itc_features
    from tests.pretrain_helpers import load_benchmark
    ckpt = str(tiny_run[0] / "checkpoint_last.pth")
    bench = load_benchmark("srcl_evidence")
    res = bench.caption_set_aucs(ckpt, str(world), split="train", batch_size=8)
    model, tok, cfg = load_vlp_checkpoint(ckpt, objective=True)
    shapes = ShapesWorld.load(world)
    pairs = _pairs(shapes, "train", cfg.data.max_words, cfg.data.clean_style, 0)
    images, captions = sorted({p for p, _ in pairs}), sorted({c for _, c in pairs})
    _, ft = itc_features(model, tok, [os.path.join(world, p) for p in images], captions, cfg.model.vision.img_size,
                         8, cfg.tokenizer.max_length, momentum=True, progress=False, transform_cfg=cfg.data.transform)
    vec = {c: [float(x) for x in ft[i]] for i, c in enumerate(captions)}
    own: dict[str, set] = {}
    for img, c in pairs:
        own.setdefault(img, set()).add(c)
    fn, tn = [], []
    for lo in range(0, len(pairs) - 1, 8):
        chunk = pairs[lo:lo + 8]
        for img, _ in chunk:
            negs = [c for other, c in chunk if other != img]
            if not negs:
                continue
            e = [max(sum(x * y for x, y in zip(vec[k], vec[c])) for k in own[img]) for c in negs]
            mean = sum(e) / len(e)
            sd = math.sqrt(sum((x - mean) ** 2 for x in e) / len(e))
            z = [(x - mean) / sd if sd > 0 else 0.0 for x in e]
            norm = sum(math.exp(-v) for v in z) / len(z)
            for c, v in zip(negs, z):
                (fn if shapes.is_true(c, img) else tn).append(math.exp(-v) / norm)
    assert fn and tn
    auc = sum(0.5 if math.isclose(a, b, rel_tol=1e-6) else float(a < b) for a in fn for b in tn) / (len(fn) * len(tn))
    row = res["intra over all the image's captions (max), standardised"]
    assert row["weight_auc"] == pytest.approx(auc, abs=1e-6)
    assert row["w_false_neg"] == pytest.approx(sum(fn) / len(fn), rel=1e-5)
    assert row["w_true_neg"] == pytest.approx(sum(tn) / len(tn), rel=1e-5)
    assert set(res) == set(bench.CAPTION_SETS)


def test_evidence_helper_rows(tiny_run, world, tmp_path, monkeypatch, capsys):
    """benchmarks/srcl_evidence.py --helpers: one helper per run; its rows are the diagnostics with
    that helper alone (alpha 1) under each HELPER_SETTINGS entry; a count that does not match the
    runs is refused with one line before anything is written."""
    from tests.pretrain_helpers import load_benchmark
    bench = load_benchmark("srcl_evidence")
    ckpt = tiny_run[0] / "checkpoint_last.pth"
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint_last.pth").symlink_to(ckpt)
    (run / "spec.json").write_text(json.dumps({"evals": {"own": str(world)}}))
    monkeypatch.setattr(bench, "SETTINGS", dict(list(bench.SETTINGS.items())[:1]))  # keep the test short
    out = tmp_path / "e.json"
    assert bench.main(["--runs", str(run), "--helpers", str(run), str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--helpers" in err[0] and not out.exists()
    assert bench.main(["--runs", str(run), "--helpers", str(run), "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if "helper" in r]
    assert [r["setting"] for r in rows] == list(bench.HELPER_SETTINGS)
    for r in rows:
        reg = {"delta": 1.0, **bench.HELPER_SETTINGS[r["setting"]]}
        ref = diagnose_checkpoint(str(run / "checkpoint_last.pth"), str(world), "test", 64, progress=False,
                                  helper=r["helper"], alpha=1.0, regulation=reg)
        assert r["weight_auc"] == ref["weight_auc"] and r["w_false_neg"] == ref["weight_w_false_neg"]
    own = diagnose_checkpoint(str(ckpt), str(world), "test", 64, progress=False, regulation={"delta": 1.0})
    assert own["weight_w_false_neg"] != rows[0]["w_false_neg"]  # the helper (online features) judged, not the run
    table = (tmp_path / "e_table.md").read_text()
    assert "| helper: cross |" in table and all(f"| {name} |" in table for name in bench.HELPER_CEILINGS)


@pytest.mark.parametrize("script", ["srcl_judge", "srcl_evidence"])
def test_benchmarks_name_a_folder_that_is_not_a_study_run(script, tmp_path, capsys):
    from tests.pretrain_helpers import load_benchmark
    assert load_benchmark(script).main(["--runs", str(tmp_path), "--out", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}:") and not (tmp_path / "out.json").exists()
