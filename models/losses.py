"""Contrastive losses for vision-language pre-training: SRCL and InfoNCE, plus helpers.

Pure functions on tensors (no module state). See README.md ("SRCL in a few lines") and the
``models/losses.py`` contract in ``docs/ARCHITECTURE.md``.

SRCL (similarity-regulated contrastive learning, arXiv 2305.04474) weights each negative of an
anchor ``i`` by ``w_ij`` and leaves the positive unweighted::

    f(a, b)  = exp(sim(a, b) / t)
    L(i)     = -log  f(i, pos) / ( f(i, pos) + sum_{j neg} w_ij f(i, j) )

which is ordinary cross-entropy on ``logits + log(w)``. The weights are::

    s_ij = alpha * exp(sim_helper(i, j)) + (1 - alpha) * exp(sim_model(i, j))
    w_ij = s_ij^(-delta) / mean_{k neg of i}( s_ik^(-delta) )

so the weights fall as the similarity rises (Condition 1) and average 1 over each anchor's
negatives (Condition 2). ``delta = 0`` gives ``w = 1``, i.e. exactly InfoNCE.

Shapes: ``B`` anchors, ``K`` candidate columns (in-batch items, optionally followed by queue
entries). Boolean masks are ``(B, K)``.

Functions:
    regulation_evidence     the similarity the weights are computed from (cross-modal, intra-modal,
                            both; optionally standardised per anchor)
    regulation_weights      the SRCL weights (no gradient)
    contrastive_loss        per-anchor SRCL / InfoNCE loss with several positives and soft targets
    srcl_loss               convenience: weights + loss for one direction
    sample_hard_negatives   ALBEF ITM hard negatives (softmax over the non-positive columns)
    regulation_summary      logging statistics of the weights
    roc_auc                 rank-based ROC AUC (ties count one half)
    false_negative_auc      how well low weights identify true false negatives (diagnostics)
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
import torch.nn.functional as F

__all__ = [
    "regulation_evidence",
    "regulation_weights",
    "contrastive_loss",
    "srcl_loss",
    "sample_hard_negatives",
    "regulation_summary",
    "roc_auc",
    "false_negative_auc",
    "mean_offdiag_cosine",
]


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------
def _check_2d(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, K), got shape {tuple(t.shape)}")


def _check_mask(name: str, mask: Tensor, shape: torch.Size) -> None:
    _check_2d(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")


def _check_same_shape(name: str, t: Tensor, shape: torch.Size) -> None:
    _check_2d(name, t)
    if t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _float_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (half, bfloat16, float32) is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# SRCL weights
# ----------------------------------------------------------------------------------------------
EVIDENCE_SOURCES = ("cross", "intra", "cross+intra")


def regulation_evidence(
    sim_cross: Tensor,
    neg_mask: Tensor,
    source: str = "cross",
    sim_intra: Tensor | None = None,
    intra_weight: float = 1.0,
    standardise: bool = False,
    generality_weight: float = 0.0,
    pair_sim: Tensor | None = None,
    pair_weight: float = 0.0,
    candidate_length: Tensor | None = None,
    length_weight: float = 0.0,
) -> Tensor:
    """The similarity ``e_ij`` from which the SRCL weights of anchor ``i``'s negatives are computed
    (``regulation_weights(e, ...)``): the higher, the more likely negative ``j`` is a false one.

    ::

        source "cross":        e_ij = sim_cross_ij                        (the paper's form)
        source "intra":        e_ij = sim_intra_ij
        source "cross+intra":  e_ij = sim_cross_ij + intra_weight * sim_intra_ij
        generality:            e_ij <- e_ij + generality_weight * g_j,
                               g_j = mean_{k : neg_mask_kj} sim_cross_kj   (0 without such k)
        pair:                  e_ij <- e_ij - pair_weight * pair_sim_j
        standardise:           e_ij <- (e_ij - mean_i) / std_i   over anchor i's negatives
                               (population std; a row whose std is 0 becomes 0)
        length (after standardise): e_ij <- e_ij - length_weight * z_j,
                               z_j = (len_j - mean) / std over the candidates that are a negative
                               of some anchor (population std; all 0 if it is 0)

    ``g_j`` is how similar candidate ``j`` is to all the anchors it is a negative of: a caption
    that describes little ("there is a circle") is close to many images and is true of many of
    them, so it is a likely false negative of every anchor. ``pair_sim_j`` is candidate ``j``'s
    similarity to its own pair (a candidate caption's own image, a candidate image's own caption):
    an anchor that matches the candidate about as well as the candidate's own pair does is likely
    one it is true of; subtracting it removes how high the candidate's similarities run in general
    (a caption that says little never matches any image as closely as a full description does).
    ``len_j`` is a candidate caption's length in tokens: a short caption describes little and is
    true of many images, a prior the image anchors' evidence can take without any similarity (it is
    added after ``standardise``, so ``length_weight`` is in units of the anchor's spread there).

    ``sim_cross`` is the anchor's similarity to the candidate (image-text); ``sim_intra`` the
    similarity of the candidate to the anchor's own item of the candidate's modality (an image
    anchor: its caption vs the candidate caption; a caption anchor: its image vs the candidate
    image). Centring alone would not change the weights (they are normalised per anchor); dividing
    by the anchor's spread gives every anchor the same sharpness ``delta``, now in units of its
    standard deviation.

    Args:
        sim_cross: (B, K) cosine similarities.
        neg_mask: (B, K) bool, the anchor's negatives (the statistics of ``standardise`` are taken
            over them; other entries are carried along and ignored by ``regulation_weights``).
        source: one of ``EVIDENCE_SOURCES``.
        sim_intra: (B, K) cosine similarities; required unless ``source == "cross"``.
        intra_weight: factor of ``sim_intra`` in ``"cross+intra"``.
        standardise: per-anchor standardisation.
        generality_weight: factor of the candidate's mean similarity to the anchors (0 = off).
        pair_sim: (K,) each candidate's similarity to its own pair; required when ``pair_weight`` != 0.
        pair_weight: factor of ``pair_sim`` subtracted from each column (0 = off).
        candidate_length: (K,) each candidate caption's length; required when ``length_weight`` != 0.
        length_weight: factor of the standardised ``candidate_length`` subtracted from each column
            (0 = off).

    Returns:
        (B, K) evidence without gradient, float32 (float64 for float64 input).
    """
    _check_2d("sim_cross", sim_cross)
    _check_mask("neg_mask", neg_mask, sim_cross.shape)
    if source not in EVIDENCE_SOURCES:
        raise ValueError(f"source must be one of {EVIDENCE_SOURCES}, got {source!r}")
    if source != "cross":
        if sim_intra is None:
            raise ValueError(f"source {source!r} needs sim_intra (the similarity to the anchor's own item)")
        _check_same_shape("sim_intra", sim_intra, sim_cross.shape)
    for name, value in (("intra_weight", intra_weight), ("generality_weight", generality_weight),
                        ("pair_weight", pair_weight), ("length_weight", length_weight)):
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be finite, got {value}")
    if pair_weight != 0.0:
        if pair_sim is None:
            raise ValueError(f"pair_weight={pair_weight} needs pair_sim (each candidate's similarity to its own pair)")
        if pair_sim.shape != sim_cross.shape[1:]:
            raise ValueError(f"pair_sim must have shape ({sim_cross.shape[1]},), got {tuple(pair_sim.shape)}")
    if length_weight != 0.0:
        if candidate_length is None:
            raise ValueError(f"length_weight={length_weight} needs candidate_length (each candidate caption's length)")
        if candidate_length.shape != sim_cross.shape[1:]:
            raise ValueError(f"candidate_length must have shape ({sim_cross.shape[1]},), got {tuple(candidate_length.shape)}")
    dtype = _float_dtype(sim_cross)
    with torch.no_grad():
        if source == "cross":
            e = sim_cross.detach().to(dtype)
        elif source == "intra":
            e = sim_intra.detach().to(dtype)  # type: ignore[union-attr]
        else:
            e = sim_cross.detach().to(dtype) + float(intra_weight) * sim_intra.detach().to(dtype)  # type: ignore[union-attr]
        zero = torch.zeros((), dtype=dtype, device=e.device)
        if generality_weight != 0.0:
            n_col = neg_mask.sum(dim=0, keepdim=True).clamp_min(1).to(dtype)
            g = torch.where(neg_mask, sim_cross.detach().to(dtype), zero).sum(dim=0, keepdim=True) / n_col
            e = e + float(generality_weight) * g
        if pair_weight != 0.0:
            e = e - float(pair_weight) * pair_sim.detach().to(dtype)[None, :]  # type: ignore[union-attr]
        if standardise:
            n = neg_mask.sum(dim=1, keepdim=True).clamp_min(1).to(dtype)
            ez = torch.where(neg_mask, e, zero)  # garbage outside the negatives must not enter the statistics
            mean = ez.sum(dim=1, keepdim=True) / n
            var = torch.where(neg_mask, (ez - mean) ** 2, zero).sum(dim=1, keepdim=True) / n
            std = var.sqrt()
            e = torch.where(std > 0, (e - mean) / std.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(e))
        if length_weight != 0.0:
            cols = neg_mask.any(dim=0)
            length = candidate_length.detach().to(dtype=dtype, device=e.device)  # type: ignore[union-attr]
            n = cols.sum().clamp_min(1).to(dtype)
            mean = torch.where(cols, length, zero).sum() / n
            std = (torch.where(cols, (length - mean) ** 2, zero).sum() / n).sqrt()
            z = torch.where(std > 0, (length - mean) / std.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(length))
            e = e - float(length_weight) * z[None, :]
    return e


def regulation_weights(
    sim_model: Tensor,
    neg_mask: Tensor,
    delta: float,
    sim_helper: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """SRCL regulation weights of each anchor's negatives (paper Eqs. 6-9, power form).

    ::

        s_ij = alpha * exp(sim_helper_ij) + (1 - alpha) * exp(sim_model_ij)
        w_ij = s_ij^(-delta) / mean_{k : neg_mask_ik}( s_ik^(-delta) )     where neg_mask_ij
        w_ij = 1                                                            elsewhere

    Computed in log space for stability::

        log s_ij = logaddexp(log(alpha) + sim_helper_ij, log(1 - alpha) + sim_model_ij)
        log w_ij = -delta * log s_ij - logmeanexp_{k neg}(-delta * log s_ik)

    Args:
        sim_model: (B, K) cosine similarities from the model being trained (momentum or detached
            online model). NOT divided by the temperature.
        neg_mask: (B, K) bool, True at the anchor's real negatives (valid and not a positive).
            Values of the similarities outside the mask are ignored (may be garbage or NaN).
        delta: exponent >= 0. ``delta = 0`` returns exactly 1 everywhere (InfoNCE);
            ``delta = 1`` is the paper's ``Norm(1/s)``.
        sim_helper: (B, K) cosine similarities from the frozen helper model; required when
            ``alpha > 0``.
        alpha: mixing coefficient in [0, 1] (1 = helper only, 0 = model only).

    Returns:
        (B, K) weights without gradient, float32 (float64 for float64 input). Each row's weights
        average 1 over its negatives; rows without negatives are all 1.

    Raises:
        ValueError: alpha outside [0, 1], alpha > 0 without ``sim_helper``, delta negative or
            not finite, or mismatched shapes.
    """
    _check_2d("sim_model", sim_model)
    _check_mask("neg_mask", neg_mask, sim_model.shape)
    alpha = float(alpha)
    delta = float(delta)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha > 0.0 and sim_helper is None:
        raise ValueError(
            f"alpha={alpha} > 0 mixes in the helper similarity, but sim_helper is None; "
            "pass sim_helper or use alpha=0"
        )
    if not math.isfinite(delta) or delta < 0.0:
        raise ValueError(f"delta must be a finite number >= 0, got {delta}")
    if sim_helper is not None:
        _check_same_shape("sim_helper", sim_helper, sim_model.shape)

    dtype = _float_dtype(sim_model)
    with torch.no_grad():
        if delta == 0.0:
            return torch.ones(sim_model.shape, dtype=dtype, device=sim_model.device)

        sm = sim_model.detach().to(dtype)
        if alpha == 0.0:
            log_s = sm
        else:
            sh = sim_helper.detach().to(dtype)  # type: ignore[union-attr]
            if alpha == 1.0:
                log_s = sh
            else:
                log_s = torch.logaddexp(math.log(alpha) + sh, math.log1p(-alpha) + sm)

        # log of the unnormalised weights, -inf outside the negatives (garbage there is dropped)
        log_raw = (-delta * log_s).masked_fill(~neg_mask, float("-inf"))
        n_neg = neg_mask.sum(dim=1, keepdim=True)
        has_neg = n_neg > 0
        log_mean = torch.logsumexp(log_raw, dim=1, keepdim=True) - torch.log(
            n_neg.clamp_min(1).to(dtype)
        )
        log_mean = torch.where(has_neg, log_mean, torch.zeros_like(log_mean))
        log_w = log_raw - log_mean
        w = torch.where(neg_mask, log_w.exp(), torch.ones_like(log_w))
    return w


# ----------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------
def contrastive_loss(
    logits: Tensor,
    pos_mask: Tensor,
    valid_mask: Tensor | None = None,
    weights: Tensor | None = None,
    soft_targets: Tensor | None = None,
) -> Tensor:
    """Per-anchor SRCL loss (InfoNCE when ``weights`` is None).

    With ``P_i`` the positives, ``N_i`` the negatives (valid and not positive) of anchor ``i``::

        z_ij = logits_ij + log(w_ij)   for j in N_i
        z_ij = logits_ij               for j in P_i           (positives are never weighted)
        z_ij = -inf                    for invalid j          (excluded entirely)
        q_ij = 1 / |P_i| for j in P_i, else 0                 (or soft_targets_ij)
        L(i) = -sum_j q_ij * log_softmax(z_i)_j

    For one positive ``p`` this is exactly
    ``-log f(i,p) / (f(i,p) + sum_{j in N_i} w_ij f(i,j))`` with ``f = exp(logits)``.

    Args:
        logits: (B, K) similarities already divided by the temperature.
        pos_mask: (B, K) bool, True at the anchor's positives (e.g. every item sharing the
            anchor's image id). Every row needs at least one valid positive.
        valid_mask: (B, K) bool, True at real candidates; False columns (e.g. unfilled queue
            slots) are excluded entirely, whatever their logits. None = all valid.
        weights: (B, K) non-negative weights from :func:`regulation_weights`; only the
            negatives' entries are used, and they are detached. None = InfoNCE.
        soft_targets: (B, K) target distribution replacing the even spread over positives (used
            for momentum distillation). Must be zero at invalid columns.

    Returns:
        (B,) loss per anchor, float32 (float64 for float64 logits).

    Raises:
        ValueError: a row without a (valid) positive, negative weights, soft-target mass on
            invalid columns, or mismatched shapes.
    """
    _check_2d("logits", logits)
    shape = logits.shape
    _check_mask("pos_mask", pos_mask, shape)
    if valid_mask is None:
        valid = torch.ones(shape, dtype=torch.bool, device=logits.device)
    else:
        _check_mask("valid_mask", valid_mask, shape)
        valid = valid_mask
    pos = pos_mask & valid
    n_pos = pos.sum(dim=1)
    if bool((n_pos == 0).any()):
        rows = torch.nonzero(n_pos == 0).flatten().tolist()
        raise ValueError(
            f"every anchor needs at least one valid positive; rows without one: {rows[:10]}"
            + (" ..." if len(rows) > 10 else "")
        )
    neg = valid & ~pos

    dtype = _float_dtype(logits)
    z = logits.to(dtype)
    if weights is not None:
        _check_same_shape("weights", weights, shape)
        w = weights.detach().to(dtype)
        if bool((w[neg] < 0).any()):
            raise ValueError("weights must be non-negative at the negatives")
        # log(0) = -inf removes a negative; positives and invalid columns keep their logits here
        log_w = torch.where(neg, torch.log(w), torch.zeros_like(w))
        z = z + log_w
    z = z.masked_fill(~valid, float("-inf"))
    log_p = torch.log_softmax(z, dim=1)

    if soft_targets is None:
        q = pos.to(dtype) / n_pos.unsqueeze(1).to(dtype)
    else:
        _check_same_shape("soft_targets", soft_targets, shape)
        q = soft_targets.detach().to(dtype)
        if bool((q[~valid] != 0).any()):
            raise ValueError("soft_targets must be zero at invalid columns (valid_mask False)")
    # 0 * (-inf) would be NaN at invalid columns: take the product only where valid
    terms = torch.where(valid, q * log_p, torch.zeros_like(log_p))
    return -terms.sum(dim=1)


def srcl_loss(
    logits: Tensor,
    sim_model: Tensor,
    pos_mask: Tensor,
    delta: float,
    valid_mask: Tensor | None = None,
    sim_helper: Tensor | None = None,
    alpha: float = 0.0,
    soft_targets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One direction of SRCL: weights from the similarities, then the per-anchor loss.

    ``neg_mask = valid_mask & ~pos_mask``; ``w = regulation_weights(sim_model, neg_mask, delta,
    sim_helper, alpha)``; ``loss = contrastive_loss(logits, pos_mask, valid_mask, w,
    soft_targets)``. Returns ``(loss (B,), weights (B, K))`` so the caller can log the weights.
    """
    _check_2d("logits", logits)
    _check_mask("pos_mask", pos_mask, logits.shape)
    if valid_mask is not None:
        _check_mask("valid_mask", valid_mask, logits.shape)
        neg_mask = valid_mask & ~pos_mask
    else:
        neg_mask = ~pos_mask
    w = regulation_weights(sim_model, neg_mask, delta, sim_helper=sim_helper, alpha=alpha)
    loss = contrastive_loss(logits, pos_mask, valid_mask, weights=w, soft_targets=soft_targets)
    return loss, w


# ----------------------------------------------------------------------------------------------
# ITM hard negatives
# ----------------------------------------------------------------------------------------------
def sample_hard_negatives(
    sim: Tensor, pos_mask: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Sample one hard negative column per row (ALBEF ITM).

    ``P(j | i) = exp(sim_ij) / sum_{k not positive} exp(sim_ik)`` over the columns that are not
    positives, i.e. softmax(sim) restricted to the non-positive columns. Positives are never
    sampled; columns whose ``sim`` is ``-inf`` or NaN are never sampled either (a way to exclude
    columns). No gradient.

    Args:
        sim: (B, K) similarities (ALBEF uses the ITC logits).
        pos_mask: (B, K) bool, True at columns that must never be picked (positives, same image).
        generator: optional ``torch.Generator`` for ``torch.multinomial``.

    Returns:
        (B,) long column indices.

    Raises:
        ValueError: a row with no samplable column.
    """
    _check_2d("sim", sim)
    _check_mask("pos_mask", pos_mask, sim.shape)
    with torch.no_grad():
        s = sim.detach().to(_float_dtype(sim))
        allowed = ~pos_mask & (s > float("-inf"))  # NaN compares False: excluded too
        ok = allowed.any(dim=1)
        if not bool(ok.all()):
            rows = torch.nonzero(~ok).flatten().tolist()
            raise ValueError(
                "sample_hard_negatives: rows with no non-positive (finite) column to sample: "
                f"{rows[:10]}" + (" ..." if len(rows) > 10 else "")
            )
        probs = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=1)
        probs = probs.masked_fill(~allowed, 0.0)
        idx = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return idx


# ----------------------------------------------------------------------------------------------
# diagnostics
# ----------------------------------------------------------------------------------------------
def mean_offdiag_cosine(feat: Tensor) -> Tensor:
    """Mean cosine similarity between different rows of ``feat`` (N, D), detached; NaN for N < 2.

    A collapse detector: a model whose features no longer depend on the input (e.g. text [CLS]
    features of a randomly initialised post-LN BERT) gives values near 1."""
    _check_2d("feat", feat)
    with torch.no_grad():
        n = feat.shape[0]
        if n < 2:
            return torch.tensor(float("nan"))
        f = F.normalize(feat.detach().float(), dim=-1)
        total = f.sum(0)
        return ((total @ total - (f * f).sum()) / (n * (n - 1))).detach()


def regulation_summary(weights: Tensor, neg_mask: Tensor, sim: Tensor) -> dict[str, float]:
    """Statistics of the SRCL weights for logging.

    Returns a dict of floats (NaN where undefined, e.g. no negatives at all):
        ``w_top1``: mean over anchors (with >= 1 negative) of the weight of the anchor's most
            similar negative (argmax of ``sim`` over its negatives); below 1 when regulating.
        ``w_mean``, ``w_std`` (population), ``w_min``, ``w_max``: over all negative entries.
    """
    _check_2d("weights", weights)
    _check_mask("neg_mask", neg_mask, weights.shape)
    _check_same_shape("sim", sim, weights.shape)
    nan = float("nan")
    with torch.no_grad():
        w = weights.detach().double()
        wn = w[neg_mask]
        if wn.numel() == 0:
            return {"w_top1": nan, "w_mean": nan, "w_std": nan, "w_min": nan, "w_max": nan}
        has = neg_mask.any(dim=1)
        s = sim.detach().double().masked_fill(~neg_mask, float("-inf"))
        top = s.argmax(dim=1)
        w_top = w.gather(1, top.unsqueeze(1)).squeeze(1)[has]
        return {
            "w_top1": float(w_top.mean()),
            "w_mean": float(wn.mean()),
            "w_std": float(wn.std(correction=0)),
            "w_min": float(wn.min()),
            "w_max": float(wn.max()),
        }


def roc_auc(scores: Any, labels: Any) -> float:
    """ROC AUC: probability that a random positive scores higher than a random negative.

    Ties count one half. Mann-Whitney form with average ranks (O(n log n), float64)::

        AUC = (sum_{i pos} rank_i - n_pos (n_pos + 1) / 2) / (n_pos * n_neg)

    Args:
        scores: 1-D scores (tensor or array-like), higher = more likely positive.
        labels: 1-D labels of the same length (bool or 0/1); True / nonzero = positive.

    Returns:
        The AUC as a Python float; NaN if only one class is present (or no data).

    Raises:
        ValueError: mismatched lengths or NaN scores.
    """
    s = torch.as_tensor(scores).detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    y = torch.as_tensor(labels).detach().reshape(-1).to(device="cpu")
    if s.numel() != y.numel():
        raise ValueError(f"roc_auc: {s.numel()} scores but {y.numel()} labels")
    if bool(torch.isnan(s).any()):
        raise ValueError("roc_auc: scores contain NaN")
    y = y != 0
    n_pos = int(y.sum())
    n_neg = int(y.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_s, order = torch.sort(s)
    _, counts = torch.unique_consecutive(sorted_s, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of each group's last item
    avg = ends - (counts.to(torch.float64) - 1.0) / 2.0  # average 1-based rank of the group
    ranks_sorted = torch.repeat_interleave(avg, counts)
    ranks = torch.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    rank_sum = float(ranks[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def false_negative_auc(weights: Tensor, neg_mask: Tensor, truth: Tensor) -> dict[str, float]:
    """How well a LOW weight identifies true false negatives, among the negatives.

    Args:
        weights: (B, K) SRCL weights.
        neg_mask: (B, K) bool, the entries treated as negatives by the loss.
        truth: (B, K) bool, True where the "negative" actually matches the anchor (a true false
            negative, e.g. from the synthetic world's oracle).

    Returns:
        ``auc``: ``roc_auc(-w, truth)`` over the negatives (1 = every false negative has a lower
        weight than every true negative; 0.5 = no better than chance; NaN if one class only);
        ``w_false_neg`` / ``w_true_neg``: mean weight of the true false negatives / true
        negatives (NaN if none); ``n_false_neg`` / ``n_true_neg``: their counts.
    """
    _check_2d("weights", weights)
    _check_mask("neg_mask", neg_mask, weights.shape)
    _check_mask("truth", truth, weights.shape)
    w = weights.detach().to(device="cpu", dtype=torch.float64)[neg_mask.cpu()]
    t = truth.cpu()[neg_mask.cpu()]
    n_fn = int(t.sum())
    n_tn = int(t.numel()) - n_fn
    nan = float("nan")
    return {
        "auc": roc_auc(-w, t),
        "w_false_neg": float(w[t].mean()) if n_fn else nan,
        "w_true_neg": float(w[~t].mean()) if n_tn else nan,
        "n_false_neg": float(n_fn),
        "n_true_neg": float(n_tn),
    }
