"""Tests for models/losses.py against plain float64 loop re-computations of the formulas in README.md ("SRCL in a few lines")."""
from __future__ import annotations

import math
import random

import pytest
import torch

from models.losses import (
    mean_offdiag_cosine,
    contrastive_loss,
    false_negative_auc,
    regulation_evidence,
    regulation_summary,
    regulation_weights,
    roc_auc,
    sample_hard_negatives,
    srcl_loss,
)

TEMP = 0.07


# ----------------------------------------------------------------------------------------------
# independent references (plain Python floats, loops over i, j, following the README formulas)
# ----------------------------------------------------------------------------------------------
def ref_weights(sim_model, neg, delta, sim_helper=None, alpha=0.0):
    """w_ij = s_ij^-delta / mean_{k neg}(s_ik^-delta), s = alpha e^h + (1 - alpha) e^m; 1 elsewhere."""
    B, K = len(sim_model), len(sim_model[0])
    out = [[1.0] * K for _ in range(B)]
    for i in range(B):
        raw = {}
        for j in range(K):
            if neg[i][j]:
                s = (1.0 - alpha) * math.exp(sim_model[i][j])
                if alpha > 0:
                    s += alpha * math.exp(sim_helper[i][j])
                raw[j] = s ** (-delta)
        if raw:
            mean = sum(raw.values()) / len(raw)
            for j, r in raw.items():
                out[i][j] = r / mean
    return out


def ref_loss(logits, pos, valid, w=None):
    """L(i) = -(1/|P|) sum_{p in P} log f_p / (sum_{q in P} f_q + sum_{j neg} w_ij f_j)."""
    B, K = len(logits), len(logits[0])
    out = []
    for i in range(B):
        denom = 0.0
        for j in range(K):
            if not valid[i][j]:
                continue
            f = math.exp(logits[i][j])
            if pos[i][j]:
                denom += f
            else:
                denom += (1.0 if w is None else w[i][j]) * f
        ps = [j for j in range(K) if valid[i][j] and pos[i][j]]
        out.append(-sum(logits[i][p] - math.log(denom) for p in ps) / len(ps))
    return out


def ref_soft_ce(logits, valid, w, q):
    """-sum_j q_ij log softmax_j(logits_ij + log w_ij) over the valid columns."""
    B, K = len(logits), len(logits[0])
    out = []
    for i in range(B):
        zs = {j: logits[i][j] + math.log(w[i][j]) for j in range(K) if valid[i][j]}
        lse = math.log(sum(math.exp(z) for z in zs.values()))
        out.append(-sum(q[i][j] * (z - lse) for j, z in zs.items()))
    return out


def tl(t):
    return t.double().tolist()


def make_batch(B=6, Q=0, n_invalid=0, seed=0, dim=16):
    """Normalised features; in-batch diagonal positives, Q queue columns, the last n_invalid invalid."""
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(B, dim, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(B + Q, dim, generator=g), dim=1)
    b[:B] = torch.nn.functional.normalize(b[:B] + 1.5 * a, dim=1)  # positives are similar
    sim = a @ b.t()
    K = B + Q
    pos = torch.zeros(B, K, dtype=torch.bool)
    pos[torch.arange(B), torch.arange(B)] = True
    valid = torch.ones(B, K, dtype=torch.bool)
    if n_invalid:
        valid[:, K - n_invalid:] = False
    return sim, pos, valid


# ----------------------------------------------------------------------------------------------
# delta = 0 is InfoNCE
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Q,n_invalid", [(0, 0), (10, 0), (10, 4)])
def test_delta_zero_equals_infonce(Q, n_invalid):
    sim, pos, valid = make_batch(B=6, Q=Q, n_invalid=n_invalid, seed=1)
    logits = sim / TEMP
    if n_invalid:
        # garbage in unfilled queue slots must not matter at all
        logits[:, -n_invalid:] = 1e4
        logits[0, -1] = float("nan")
    neg = valid & ~pos
    w = regulation_weights(sim, neg, delta=0.0)
    assert torch.equal(w, torch.ones_like(w))
    l_srcl = contrastive_loss(logits, pos, valid, weights=w)
    l_info = contrastive_loss(logits, pos, valid)
    assert torch.isfinite(l_srcl).all()
    torch.testing.assert_close(l_srcl, l_info, rtol=0, atol=0)
    ref = ref_loss(tl(logits), pos.tolist(), valid.tolist())
    torch.testing.assert_close(l_info.double(), torch.tensor(ref, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    if n_invalid == 0:  # plain cross-entropy on the diagonal
        ce = torch.nn.functional.cross_entropy(logits, torch.arange(6), reduction="none")
        torch.testing.assert_close(l_info, ce, rtol=1e-6, atol=1e-6)


def test_srcl_convenience_delta_zero_matches_infonce():
    sim, pos, valid = make_batch(B=5, Q=7, n_invalid=2, seed=2)
    loss, w = srcl_loss(sim / TEMP, sim, pos, delta=0.0, valid_mask=valid)
    torch.testing.assert_close(loss, contrastive_loss(sim / TEMP, pos, valid))
    assert torch.equal(w, torch.ones_like(w))


# ----------------------------------------------------------------------------------------------
# delta > 0 against the loop re-computation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("delta", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("Q,n_invalid", [(0, 0), (9, 3)])
def test_srcl_matches_loop_reference(alpha, delta, Q, n_invalid):
    sim, pos, valid = make_batch(B=5, Q=Q, n_invalid=n_invalid, seed=3)
    g = torch.Generator().manual_seed(4)
    helper = (sim + 0.3 * torch.randn(sim.shape, generator=g)).clamp(-1, 1)
    sim_model = (sim + 0.1 * torch.randn(sim.shape, generator=g)).clamp(-1, 1)
    neg = valid & ~pos
    use_helper = alpha > 0
    w = regulation_weights(sim_model, neg, delta, sim_helper=helper if use_helper else None,
                           alpha=alpha)
    w_ref = ref_weights(tl(sim_model), neg.tolist(), delta, tl(helper), alpha)
    torch.testing.assert_close(w.double(), torch.tensor(w_ref, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    logits = sim / TEMP
    loss = contrastive_loss(logits, pos, valid, weights=w)
    ref = ref_loss(tl(logits), pos.tolist(), valid.tolist(), w_ref)
    torch.testing.assert_close(loss.double(), torch.tensor(ref, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    # and it differs from InfoNCE
    assert not torch.allclose(loss, contrastive_loss(logits, pos, valid), atol=1e-4)


def test_helper_given_but_alpha_zero_ignores_helper():
    sim, pos, valid = make_batch(B=4, Q=3, seed=5)
    neg = valid & ~pos
    w0 = regulation_weights(sim, neg, 1.0)
    w1 = regulation_weights(sim, neg, 1.0, sim_helper=torch.randn(sim.shape), alpha=0.0)
    torch.testing.assert_close(w0, w1)


def test_float64_input_and_one_positive_closed_form():
    # one row, one positive: L = -log f_p / (f_p + sum_j w_j f_j), directly
    sim = torch.tensor([[0.9, 0.5, 0.1, -0.3]], dtype=torch.float64)
    pos = torch.tensor([[True, False, False, False]])
    w = regulation_weights(sim, ~pos, 1.0)
    assert w.dtype == torch.float64
    loss = contrastive_loss(sim / TEMP, pos, weights=w)
    s = [math.exp(x) for x in [0.5, 0.1, -0.3]]
    raw = [x ** -1.0 for x in s]
    ws = [r / (sum(raw) / 3) for r in raw]
    f = [math.exp(x / TEMP) for x in [0.9, 0.5, 0.1, -0.3]]
    expect = -math.log(f[0] / (f[0] + sum(wj * fj for wj, fj in zip(ws, f[1:]))))
    assert loss.item() == pytest.approx(expect, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# weights: conditions 1 and 2, masks, stability
# ----------------------------------------------------------------------------------------------
def test_more_similar_negative_gets_smaller_weight_and_smaller_push():
    sim_model = torch.tensor([[0.9, 0.8, 0.1, -0.2]])
    pos = torch.tensor([[True, False, False, False]])
    w = regulation_weights(sim_model, ~pos, delta=1.0)
    assert w[0, 1] < w[0, 2] < w[0, 3]  # Condition 1: weight falls as similarity rises
    assert w[0, 1] < 1.0 < w[0, 3]

    # (a) equal logits for the negatives, different regulating similarity: the more similar
    # negative is pushed less (d loss / d logit_j = softmax_j, which carries w_j)
    logits = torch.tensor([[5.0, 2.0, 2.0, 2.0]], requires_grad=True)
    contrastive_loss(logits, pos, weights=w).sum().backward()
    grad = logits.grad[0]
    assert grad[1] > 0 and grad[2] > 0
    assert grad[1] < grad[2] < grad[3]

    # (b) realistic logits = sim / t: relative to InfoNCE, the more similar negative's push shrinks more
    l1 = (sim_model / TEMP).clone().requires_grad_(True)
    contrastive_loss(l1, pos, weights=w).sum().backward()
    l0 = (sim_model / TEMP).clone().requires_grad_(True)
    contrastive_loss(l0, pos).sum().backward()
    ratio = l1.grad[0, 1:] / l0.grad[0, 1:]
    assert ratio[0] < ratio[1] < ratio[2]
    assert ratio[0] < 1.0


def test_weights_average_one_positives_one_invalid_excluded():
    sim, pos, valid = make_batch(B=6, Q=12, n_invalid=5, seed=6)
    pos[0, 3] = True  # a second positive in row 0
    neg = valid & ~pos
    w = regulation_weights(sim, neg, delta=2.0)
    for i in range(6):
        row = [w[i, j].item() for j in range(w.shape[1]) if neg[i, j]]
        assert sum(row) / len(row) == pytest.approx(1.0, abs=1e-5)
    assert torch.all(w[~neg] == 1.0)
    assert torch.all(w[pos] == 1.0)
    assert torch.all(w[~valid] == 1.0)
    # garbage (even NaN / inf) similarities at invalid columns change nothing
    sim2 = sim.clone()
    sim2[:, -5:] = float("nan")
    sim2[0, -1] = float("inf")
    w2 = regulation_weights(sim2, neg, delta=2.0)
    torch.testing.assert_close(w2, w)


def test_rows_without_negatives_are_all_one():
    sim = torch.randn(3, 4)
    neg = torch.tensor([[False, True, True, False],
                        [False, False, False, False],
                        [False, False, True, False]])
    w = regulation_weights(sim, neg, delta=1.5)
    assert torch.all(w[1] == 1.0)
    assert w[2, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert torch.isfinite(w).all()


def test_weights_numerically_stable_for_large_delta():
    sim = torch.tensor([[1.0, -1.0, 0.999, -0.999, 0.0]])
    neg = torch.ones_like(sim, dtype=torch.bool)
    w = regulation_weights(sim, neg, delta=400.0)  # s^-delta spans e^800: overflows naively
    assert torch.isfinite(w).all()
    assert w.mean().item() == pytest.approx(1.0, abs=1e-4)
    assert w[0, 1] > w[0, 3] > 1.0  # the two least similar share the mass ...
    order = torch.argsort(sim[0])
    assert (w[0, order].diff() <= 0).all()  # ... and the weights never rise with similarity
    assert (w >= 0).all()


def test_summary_reports_top1_and_spread():
    sim = torch.tensor([[0.9, 0.7, 0.1, -0.5],
                        [0.2, 0.95, 0.6, 0.0]])
    pos = torch.tensor([[True, False, False, False],
                        [False, True, False, False]])
    neg = ~pos
    w = regulation_weights(sim, neg, delta=1.0)
    summ = regulation_summary(w, neg, sim)
    # row 0: most similar negative is column 1; row 1: column 2
    expect_top = (w[0, 1].item() + w[1, 2].item()) / 2
    assert summ["w_top1"] == pytest.approx(expect_top, rel=1e-6)
    assert summ["w_top1"] < 1.0
    vals = [w[i, j].item() for i in range(2) for j in range(4) if neg[i, j]]
    m = sum(vals) / len(vals)
    assert summ["w_mean"] == pytest.approx(m, rel=1e-6)
    assert summ["w_std"] == pytest.approx(math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals)),
                                          rel=1e-5)
    assert summ["w_min"] == pytest.approx(min(vals)) and summ["w_max"] == pytest.approx(max(vals))
    assert all(isinstance(v, float) for v in summ.values())


# ----------------------------------------------------------------------------------------------
# several positives per row (captions sharing an image id)
# ----------------------------------------------------------------------------------------------
def test_multiple_positives_are_never_negatives():
    g = torch.Generator().manual_seed(7)
    B, Q = 6, 8
    image_ids = torch.tensor([0, 0, 1, 2, 2, 2])
    queue_ids = torch.tensor([0, 1, 3, 2, 4, 5, -1, -1])  # -1: unfilled slots
    col_ids = torch.cat([image_ids, queue_ids])
    pos = image_ids[:, None] == col_ids[None, :]
    valid = torch.ones(B, B + Q, dtype=torch.bool)
    valid[:, -2:] = False
    sim = torch.rand(B, B + Q, generator=g) * 2 - 1
    logits = sim / TEMP
    neg = valid & ~pos
    assert (pos.sum(1) >= 2).all()

    w = regulation_weights(sim, neg, delta=1.0)
    assert torch.all(w[pos] == 1.0)
    # positives are never weighted: garbage at positive entries of the weights changes nothing
    w_bad = w.clone()
    w_bad[pos] = 123.0
    loss = contrastive_loss(logits, pos, valid, weights=w)
    torch.testing.assert_close(contrastive_loss(logits, pos, valid, weights=w_bad), loss)

    q = [[(1.0 / pos[i].sum().item()) if pos[i, j] else 0.0 for j in range(B + Q)]
         for i in range(B)]
    ref = ref_soft_ce(tl(logits), valid.tolist(), tl(w), q)
    torch.testing.assert_close(loss.double(), torch.tensor(ref, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    ref2 = ref_loss(tl(logits), pos.tolist(), valid.tolist(), tl(w))
    torch.testing.assert_close(loss.double(), torch.tensor(ref2, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)

    # positives' gradients are all negative (pulled), negatives' all positive (pushed)
    lg = logits.clone().requires_grad_(True)
    contrastive_loss(lg, pos, valid, weights=w).sum().backward()
    # (a single positive may be pushed when it already holds more than its 1/|P| share,
    # but the positives together are pulled)
    assert (lg.grad.masked_fill(~pos, 0).sum(1) < 0).all()
    assert (lg.grad[neg] > 0).all()
    assert (lg.grad[~valid] == 0).all()


def test_soft_targets_replace_targets():
    g = torch.Generator().manual_seed(8)
    B, K = 4, 7
    sim = torch.rand(B, K, generator=g) * 2 - 1
    pos = torch.zeros(B, K, dtype=torch.bool)
    pos[torch.arange(B), torch.arange(B)] = True
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[:, -1] = False
    neg = valid & ~pos
    w = regulation_weights(sim, neg, delta=1.0)
    # ALBEF distillation: 0.4 * softmax(momentum logits) + 0.6 * one-hot, zero at invalid columns
    sm = torch.softmax((sim / TEMP).masked_fill(~valid, float("-inf")), dim=1)
    q = 0.4 * sm + 0.6 * pos.float()
    loss = contrastive_loss(sim / TEMP, pos, valid, weights=w, soft_targets=q)
    ref = ref_soft_ce(tl(sim / TEMP), valid.tolist(), tl(w), tl(q))
    torch.testing.assert_close(loss.double(), torch.tensor(ref, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="invalid"):
        contrastive_loss(sim / TEMP, pos, valid, weights=w, soft_targets=torch.full((B, K), 1 / K))


# ----------------------------------------------------------------------------------------------
# no gradient through the weights
# ----------------------------------------------------------------------------------------------
def test_no_gradient_through_weights():
    sim, pos, valid = make_batch(B=5, Q=4, seed=9)
    sim_model = sim.clone().requires_grad_(True)
    helper = sim.clone().requires_grad_(True)
    w = regulation_weights(sim_model, valid & ~pos, 1.0, sim_helper=helper, alpha=0.3)
    assert not w.requires_grad and w.grad_fn is None
    logits = (sim / TEMP).clone().requires_grad_(True)
    contrastive_loss(logits, pos, valid, weights=w).sum().backward()
    assert sim_model.grad is None and helper.grad is None
    assert logits.grad is not None and logits.grad.abs().sum() > 0

    # even weights that do carry a graph are detached inside the loss
    wsrc = torch.ones(5, 9, requires_grad=True)
    w2 = wsrc * 1.5
    logits2 = (sim / TEMP).clone().requires_grad_(True)
    contrastive_loss(logits2, pos, valid, weights=w2).sum().backward()
    assert wsrc.grad is None


def test_srcl_logits_from_same_sim_only_grad_via_logits():
    # when the same tensor feeds logits and weights, the gradient equals the fixed-weight gradient
    sim, pos, valid = make_batch(B=4, Q=2, seed=10)
    s1 = sim.clone().requires_grad_(True)
    loss, w = srcl_loss(s1 / TEMP, s1, pos, delta=1.0, valid_mask=valid)
    loss.sum().backward()
    s2 = sim.clone().requires_grad_(True)
    contrastive_loss(s2 / TEMP, pos, valid, weights=w.clone()).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


# ----------------------------------------------------------------------------------------------
# ITM hard negatives
# ----------------------------------------------------------------------------------------------
def test_sample_hard_negatives_never_positive_and_follows_softmax():
    sim = torch.tensor([[2.0, 1.5, 0.0, -1.0, 1.0, 0.5],
                        [0.3, 3.0, 3.0, 0.0, -2.0, 1.0],
                        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                        [0.0, -0.5, 2.5, 0.7, 0.7, 4.0]])
    pos = torch.tensor([[True, True, False, False, False, False],
                        [False, True, True, False, False, True],
                        [True, False, True, False, True, False],
                        [False, False, False, False, False, True]])
    reps = 5000
    big_sim = sim.repeat(reps, 1)
    big_pos = pos.repeat(reps, 1)
    gen = torch.Generator().manual_seed(1234)
    idx = sample_hard_negatives(big_sim, big_pos, generator=gen)
    assert idx.dtype == torch.long and idx.shape == (4 * reps,)
    assert not big_pos[torch.arange(4 * reps), idx].any()
    idx = idx.view(reps, 4)
    for i in range(4):
        expz = {j: math.exp(sim[i, j].item()) for j in range(6) if not pos[i, j]}
        z = sum(expz.values())
        for j in range(6):
            freq = (idx[:, i] == j).float().mean().item()
            expect = expz.get(j, 0.0) / z
            assert freq == pytest.approx(expect, abs=0.025), (i, j, freq, expect)

    # reproducible with the same seed
    a = sample_hard_negatives(sim, pos, generator=torch.Generator().manual_seed(5))
    b = sample_hard_negatives(sim, pos, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_sample_hard_negatives_errors_and_minus_inf():
    sim = torch.randn(2, 3)
    pos = torch.tensor([[True, False, False], [True, True, True]])
    with pytest.raises(ValueError, match="rows"):
        sample_hard_negatives(sim, pos)
    sim = torch.tensor([[0.0, float("-inf"), 1.0]])
    pos = torch.tensor([[False, False, True]])
    for _ in range(20):
        assert sample_hard_negatives(sim, pos).item() == 0


# ----------------------------------------------------------------------------------------------
# ROC AUC
# ----------------------------------------------------------------------------------------------
def pairwise_auc(scores, labels):
    p = [s for s, y in zip(scores, labels) if y]
    n = [s for s, y in zip(scores, labels) if not y]
    tot = 0.0
    for a in p:
        for b in n:
            tot += 1.0 if a > b else (0.5 if a == b else 0.0)
    return tot / (len(p) * len(n))


def test_roc_auc_basic_cases():
    labels = torch.tensor([0, 0, 1, 1, 0, 1], dtype=torch.bool)
    scores = torch.tensor([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert roc_auc(scores, labels) == 1.0
    assert roc_auc(-scores, labels) == 0.0
    assert roc_auc(torch.ones(6), labels) == 0.5
    assert math.isnan(roc_auc(scores, torch.ones(6, dtype=torch.bool)))
    assert math.isnan(roc_auc(scores, torch.zeros(6)))
    assert roc_auc([0.5, 0.2, 0.9], [1, 0, 0]) == 0.5


def test_roc_auc_random_and_pairwise():
    g = torch.Generator().manual_seed(11)
    s = torch.rand(20000, generator=g)
    y = torch.rand(20000, generator=g) < 0.3
    assert roc_auc(s, y) == pytest.approx(0.5, abs=0.02)
    rng = random.Random(12)
    for _ in range(5):
        n = 300
        scores = [round(rng.gauss(0, 1), 1) for _ in range(n)]  # rounding: many ties
        labels = [rng.random() < 0.4 for _ in range(n)]
        scores = [x + (0.3 if lab else 0.0) for x, lab in zip(scores, labels)]
        assert roc_auc(torch.tensor(scores, dtype=torch.float64), labels) == pytest.approx(
            pairwise_auc(scores, labels), abs=1e-12)


def test_false_negative_auc():
    w = torch.tensor([[1.0, 0.2, 1.5, 0.4],
                      [1.0, 1.0, 0.1, 1.9]])
    neg = torch.tensor([[False, True, True, True],
                        [True, False, True, True]])
    truth = torch.tensor([[False, True, False, True],   # false negatives: low weights 0.2, 0.4
                          [True, False, False, False]])  # (1,0) FN with weight 1.0
    out = false_negative_auc(w, neg, truth)
    # among negatives: FN weights {0.2, 0.4, 1.0}, TN weights {1.5, 0.1, 1.9}
    ws = [0.2, 1.5, 0.4, 1.0, 0.1, 1.9]
    ts = [True, False, True, True, False, False]
    assert out["auc"] == pytest.approx(pairwise_auc([-x for x in ws], ts))
    assert out["w_false_neg"] == pytest.approx((0.2 + 0.4 + 1.0) / 3)
    assert out["w_true_neg"] == pytest.approx((1.5 + 0.1 + 1.9) / 3)
    assert out["n_false_neg"] == 3 and out["n_true_neg"] == 3


# ----------------------------------------------------------------------------------------------
# clear errors
# ----------------------------------------------------------------------------------------------
def test_errors():
    logits = torch.randn(2, 4)
    pos = torch.tensor([[True, False, False, False], [False, False, False, False]])
    with pytest.raises(ValueError, match="positive"):
        contrastive_loss(logits, pos)
    # a positive that is not valid does not count
    pos = torch.tensor([[True, False, False, False], [False, False, False, True]])
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    with pytest.raises(ValueError, match="positive"):
        contrastive_loss(logits, pos, valid)
    sim = torch.randn(2, 4)
    neg = ~pos
    with pytest.raises(ValueError, match="sim_helper"):
        regulation_weights(sim, neg, 1.0, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        regulation_weights(sim, neg, 1.0, sim_helper=sim, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        regulation_weights(sim, neg, 1.0, sim_helper=sim, alpha=-0.1)
    with pytest.raises(ValueError, match="delta"):
        regulation_weights(sim, neg, -1.0)
    with pytest.raises(ValueError, match="shape"):
        regulation_weights(sim, neg[:, :3], 1.0)
    with pytest.raises(TypeError, match="bool"):
        contrastive_loss(logits, pos.long())
    with pytest.raises(ValueError, match="non-negative"):
        contrastive_loss(logits, pos, weights=-torch.ones(2, 4))


# ---------------------------------------------------------------------- collapse detector
def test_mean_offdiag_cosine_matches_a_plain_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, generator=g)
    rows = [[float(v) for v in r] for r in x.double()]
    total, count = 0.0, 0
    for i in range(7):
        for j in range(7):
            if i != j:
                a, b = rows[i], rows[j]
                dot = sum(p * q for p, q in zip(a, b))
                total += dot / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))
                count += 1
    assert float(mean_offdiag_cosine(x)) == pytest.approx(total / count, abs=1e-6)


def test_mean_offdiag_cosine_is_one_for_collapsed_features_and_nan_for_one_row():
    same = torch.tensor([[1.0, 2.0, 3.0]]).repeat(4, 1) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    assert float(mean_offdiag_cosine(same)) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(float(mean_offdiag_cosine(torch.ones(1, 3))))
    with pytest.raises(ValueError):
        mean_offdiag_cosine(torch.ones(3))


# ----------------------------------------------------------------------------------------------
# the regulating evidence
# ----------------------------------------------------------------------------------------------
def ref_evidence(cross, neg, source, intra, intra_weight, standardise, generality_weight=0.0, pair=None, pair_weight=0.0,
                 length=None, length_weight=0.0):
    """Plain loops: cross / intra / cross + w * intra, plus the generality term (the column's mean
    cross similarity over the rows it is a negative of), minus pair_weight x the column's similarity
    to its own pair, then (e - mean) / std over each row's negatives, then minus length_weight x the
    column's length standardised over the columns that are some row's negative."""
    e = _ref_evidence(cross, neg, source, intra, intra_weight, standardise, generality_weight, pair, pair_weight)
    if not length_weight:
        return e
    cols = [j for j in range(len(cross[0])) if any(row[j] for row in neg)]
    mean = sum(length[j] for j in cols) / len(cols)
    std = math.sqrt(sum((length[j] - mean) ** 2 for j in cols) / len(cols))
    return [[v - length_weight * ((length[j] - mean) / std if std > 0 else 0.0) for j, v in enumerate(row)] for row in e]


def _ref_evidence(cross, neg, source, intra, intra_weight, standardise, generality_weight, pair, pair_weight):
    B, K = len(cross), len(cross[0])
    e = [[cross[i][j] if source == "cross" else intra[i][j] if source == "intra"
          else cross[i][j] + intra_weight * intra[i][j] for j in range(K)] for i in range(B)]
    for j in range(K):
        rows = [cross[k][j] for k in range(B) if neg[k][j]]
        g = sum(rows) / len(rows) if rows else 0.0
        for i in range(B):
            e[i][j] += generality_weight * g - (pair_weight * pair[j] if pair_weight else 0.0)
    if not standardise:
        return e
    out = []
    for i in range(B):
        vals = [e[i][j] for j in range(K) if neg[i][j]]
        mean = sum(vals) / len(vals) if vals else 0.0
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)) if vals else 0.0
        out.append([(e[i][j] - mean) / std if std > 0 else 0.0 for j in range(K)])
    return out


@pytest.mark.parametrize("source", ["cross", "intra", "cross+intra"])
@pytest.mark.parametrize("standardise", [False, True])
@pytest.mark.parametrize("generality", [0.0, 1.5])
@pytest.mark.parametrize("pair_weight", [0.0, 0.8])
@pytest.mark.parametrize("length_weight", [0.0, 0.6])
def test_regulation_evidence_matches_loop_reference(source, standardise, generality, pair_weight, length_weight):
    sim, pos, valid = make_batch(B=5, Q=6, n_invalid=2, seed=11)
    neg = valid & ~pos
    g = torch.Generator().manual_seed(12)
    intra = torch.rand(sim.shape, generator=g, dtype=torch.float64) * 2 - 1
    pair = torch.rand(sim.shape[1], generator=g, dtype=torch.float64) * 2 - 1
    length = torch.randint(3, 30, (sim.shape[1],), generator=g)
    length[~neg.any(0)] = 1000  # a column that is nobody's negative (an empty queue slot) must not enter the statistics
    assert bool((~neg.any(0)).any())
    cross = sim.double().masked_fill(~valid, float("nan"))  # garbage outside the negatives is ignored
    cross = torch.where(neg, cross, torch.full_like(cross, float("nan")))  # only the negatives' entries may count
    e = regulation_evidence(cross, neg, source, intra, 0.7, standardise, generality, pair, pair_weight, length, length_weight)
    ref = torch.tensor(ref_evidence(tl(cross), neg.tolist(), source, tl(intra), 0.7, standardise, generality,
                                    pair.tolist(), pair_weight, length.tolist(), length_weight), dtype=torch.float64)
    assert e.dtype == torch.float64
    torch.testing.assert_close(e[neg], ref[neg], rtol=1e-12, atol=1e-12)
    if standardise:  # delta now acts per anchor in units of its spread: the weights differ from the raw ones
        w = regulation_weights(e, neg, 1.0)
        assert not torch.allclose(w[neg], regulation_weights(regulation_evidence(cross, neg, source, intra, 0.7), neg, 1.0)[neg])


def test_regulation_evidence_errors_and_constant_rows():
    sim, pos, valid = make_batch(B=3, Q=0, seed=13)
    neg = valid & ~pos
    with pytest.raises(ValueError, match="needs sim_intra"):
        regulation_evidence(sim, neg, "intra")
    with pytest.raises(ValueError, match="source must be one of"):
        regulation_evidence(sim, neg, "both")
    with pytest.raises(ValueError, match="needs candidate_length"):
        regulation_evidence(sim, neg, length_weight=1.0)
    with pytest.raises(ValueError, match="candidate_length must have shape"):
        regulation_evidence(sim, neg, candidate_length=torch.ones(sim.shape[1] + 1), length_weight=1.0)
    with pytest.raises(ValueError, match="length_weight must be finite"):
        regulation_evidence(sim, neg, candidate_length=torch.ones(sim.shape[1]), length_weight=float("inf"))
    # captions of one length carry no length evidence
    torch.testing.assert_close(regulation_evidence(sim, neg, candidate_length=torch.full((sim.shape[1],), 7), length_weight=2.0),
                               regulation_evidence(sim, neg))
    with pytest.raises(ValueError, match="needs pair_sim"):
        regulation_evidence(sim, neg, pair_weight=1.0)
    with pytest.raises(ValueError, match="pair_sim must have shape"):
        regulation_evidence(sim, neg, pair_sim=torch.zeros(sim.shape[1] + 1), pair_weight=1.0)
    flat = torch.full(sim.shape, 0.3)
    assert torch.equal(regulation_evidence(flat, neg, standardise=True)[neg], torch.zeros(int(neg.sum())))
