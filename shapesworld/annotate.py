"""The annotations of a world: captions (whole-scene and partial), VQA questions with noisy
annotator answers, NLVR2 image pairs with statements, and the false-negative statistics of the
captions (how many other images each caption is also true of)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from shapesworld.config import ShapesConfig
from shapesworld.grammar import (DIRECTIONAL_RELATIONS, RELATIONS, SHAPE_PLURALS, Claim, ObjectSpec, Relation, clean,
                                 object_text, render_claim)
from shapesworld.scene import COLOR_NAMES, COLORS, SHAPES, SIZES, Scene, SceneObject, as_scene, pick
from shapesworld.statements import PairStatement, statement_text
from shapesworld.truth import ShapesWorld, relation_holds, statement_is_true

CAPTION_KINDS: Tuple[str, ...] = ("full", "object", "attribute", "relation", "count")
PARTIAL_KINDS: Tuple[str, ...] = ("object", "attribute", "relation", "count")
ANSWER_TYPES = ("yes/no", "number", "other")
# ALBEF's max_words for pre-training: captions stay within it unless a scene has too many objects
MAX_CAPTION_WORDS = 30


@dataclass(frozen=True)
class CaptionSample:
    text: str
    kind: str  # one of CAPTION_KINDS
    claim: Claim


def _strip_positions(claim: Claim) -> Claim:
    objs = tuple(dataclasses.replace(o, row=None, col=None) for o in claim.objects)
    rels = tuple(r for r in claim.relations if r.kind not in DIRECTIONAL_RELATIONS)
    return dataclasses.replace(claim, objects=objs, relations=rels)


def _n_words(text: str) -> int:
    return len(clean(text).split())


def _holding_relations(a: SceneObject, b: SceneObject, cfg: ShapesConfig) -> List[str]:
    kinds = RELATIONS if cfg.use_positions else ("next to",)
    return [k for k in kinds if relation_holds(k, a, b)]


def _random_position(o: SceneObject,
                     rng: np.random.Generator) -> Tuple[Optional[str], Optional[str]]:
    options = [(o.row, o.col)]
    if o.row in ("top", "bottom"):
        options.append((o.row, None))
    if o.col in ("left", "right"):
        options.append((None, o.col))
    return pick(rng, options)


_ATTRIBUTE_VARIANTS = (("shape", "color"), ("size", "shape"), ("color",), ("shape",),
                       ("size", "color"))


def _reduced_spec(o: SceneObject, attrs: Sequence[str]) -> ObjectSpec:
    return ObjectSpec(**{a: getattr(o, a) for a in attrs})


def _full_claim(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig) -> Claim:
    objs = [scene.objects[int(j)] for j in rng.permutation(len(scene.objects))]
    with_pos = cfg.use_positions and rng.random() < 0.35
    specs = tuple(ObjectSpec(o.shape, o.color, o.size, o.row if with_pos else None,
                             o.col if with_pos else None) for o in objs)
    relations: Tuple[Relation, ...] = ()
    if len(objs) == 2 and not with_pos and rng.random() < 0.35:
        kinds = _holding_relations(objs[0], objs[1], cfg)
        if kinds:
            relations = (Relation(pick(rng, kinds), 0, 1),)
    count = len(objs) if rng.random() < 0.3 else None
    background = None
    if rng.random() < 0.3:
        background = scene.background
        if background != "plain" and rng.random() < 0.3:
            background = "textured"
    return Claim(specs, relations, count, background)


def _partial_claim(scene: Scene, rng: np.random.Generator,
                   cfg: ShapesConfig) -> Tuple[Claim, str]:
    kind = PARTIAL_KINDS[int(rng.choice(4, p=[0.35, 0.35, 0.15, 0.15]))]
    objs = scene.objects
    if kind == "relation":
        pairs = [(a, b) for a in objs for b in objs if a is not b and _holding_relations(a, b, cfg)]
        if not pairs:
            kind = "object"
        else:
            a, b = pick(rng, pairs)
            rel = pick(rng, _holding_relations(a, b, cfg))
            specs = (ObjectSpec(a.shape, a.color), ObjectSpec(b.shape, b.color))
            return Claim(specs, (Relation(rel, 0, 1),)), kind
    if kind == "count":
        bg = scene.background if rng.random() < 0.5 else None
        return Claim(count=len(objs), background=bg), kind
    o = pick(rng, objs)
    if kind == "object":
        spec = ObjectSpec(o.shape, o.color, o.size)
        pos_prob = 0.3
    else:
        spec = _reduced_spec(o, pick(rng, _ATTRIBUTE_VARIANTS))
        pos_prob = 0.2
    if cfg.use_positions and rng.random() < pos_prob:
        row, col = _random_position(o, rng)
        spec = dataclasses.replace(spec, row=row, col=col)
    bg = scene.background if rng.random() < 0.15 else None
    return Claim((spec,), (), None, bg), kind


def make_captions(scene: Union[Scene, Mapping[str, Any]], cfg: ShapesConfig,
                  rng: np.random.Generator) -> List[CaptionSample]:
    """``cfg.captions_per_image`` captions for a scene, distinct where possible.

    Each caption is whole-scene ("full") with probability 1 - partial_caption_prob, otherwise
    partial: one object ("object"), one object without some attributes ("attribute"), two objects
    in a spatial relation ("relation"), or the number of shapes ("count")."""
    scene = as_scene(scene)
    out: List[CaptionSample] = []
    seen = set()
    for _ in range(cfg.captions_per_image):
        sample = None
        for _attempt in range(10):
            if rng.random() < cfg.partial_caption_prob:
                claim, kind = _partial_claim(scene, rng, cfg)
            else:
                claim, kind = _full_claim(scene, rng, cfg), "full"
            text = render_claim(claim, rng)
            # keep within ALBEF's 30 words where possible: drop positions, background, count
            for reduce in (_strip_positions,
                           lambda c: dataclasses.replace(c, background=None),
                           lambda c: dataclasses.replace(c, count=None) if c.objects else c):
                if _n_words(text) <= MAX_CAPTION_WORDS:
                    break
                claim = reduce(claim)
                text = render_claim(claim, rng)
            sample = CaptionSample(text, kind, claim)
            if text not in seen:
                break
        seen.add(sample.text)
        out.append(sample)
    return out


# ---------------------------------------------------------------------------------- questions
def _unique(spec: ObjectSpec, scene: Scene) -> bool:
    return sum(spec.matches(o) for o in scene.objects) == 1


def _make_question(qtype: str, scene: Scene, rng: np.random.Generator,
                   cfg: ShapesConfig) -> Optional[Tuple[str, str, str]]:
    objs = scene.objects
    o = pick(rng, objs)
    pos = [ObjectSpec(row=o.row, col=o.col)] if cfg.use_positions else []
    if qtype in ("color", "shape", "size"):
        if qtype == "color":
            cands = [ObjectSpec(shape=o.shape), ObjectSpec(shape=o.shape, size=o.size)] + pos
        elif qtype == "shape":
            cands = [ObjectSpec(color=o.color), ObjectSpec(color=o.color, size=o.size)] + pos
        else:
            cands = [ObjectSpec(shape=o.shape, color=o.color)] + pos
        cands = [c for c in cands if _unique(c, scene)]
        if not cands:
            return None
        desc = object_text(pick(rng, cands), rng, article=False)
        q = f"what {qtype} is the {desc}?"
        return q, getattr(o, qtype), "other"
    if qtype == "count":
        variant = pick(rng, ("all", "color", "shape"))
        tail = pick(rng, ("are there?", "are in the image?", "are there in the picture?"))
        if variant == "all":
            q = f"how many {pick(rng, ('shapes', 'objects'))} {tail}"
            n = len(objs)
        elif variant == "color":
            c = o.color if rng.random() < 0.7 else pick(rng, COLOR_NAMES)
            q = f"how many {c} {pick(rng, ('shapes', 'objects'))} {tail}"
            n = sum(x.color == c for x in objs)
        else:
            s = o.shape if rng.random() < 0.7 else pick(rng, SHAPES)
            q = f"how many {SHAPE_PLURALS[s]} {tail}"
            n = sum(x.shape == s for x in objs)
        return q, str(n), "number"
    if qtype == "exist":
        attrs = pick(rng, _ATTRIBUTE_VARIANTS + (("size", "color", "shape"),))
        if rng.random() < 0.5:
            spec, ans = _reduced_spec(o, attrs), "yes"
        else:
            for _ in range(30):
                fake = SceneObject(pick(rng, SHAPES), pick(rng, COLOR_NAMES), pick(rng, SIZES),
                                   "center", "middle", 0, 0, 0)
                spec = _reduced_spec(fake, attrs)
                if not any(spec.matches(x) for x in objs):
                    break
            else:
                return None
            ans = "no"
        return f"is there {object_text(spec, rng)}?", ans, "yes/no"
    raise ValueError(f"unknown question type {qtype!r}")


def make_questions(scene: Union[Scene, Mapping[str, Any]], cfg: ShapesConfig,
                   rng: np.random.Generator, k: Optional[int] = None) -> List[Tuple[str, str, str]]:
    """Up to ``k`` distinct (question, true answer, answer_type) triples for a scene."""
    scene = as_scene(scene)
    k = cfg.vqa_questions_per_image if k is None else k
    out: List[Tuple[str, str, str]] = []
    seen = set()
    for _ in range(20 * k):
        if len(out) >= k:
            break
        q = _make_question(pick(rng, ("color", "shape", "size", "count", "exist")), scene, rng,
                           cfg)
        if q is None or q[0] in seen:
            continue
        seen.add(q[0])
        out.append((q[0][0].upper() + q[0][1:], q[1], q[2]))
    return out


def _answer_alternatives(answer: str, qtype: str, cfg: ShapesConfig) -> List[str]:
    if qtype == "yes/no":
        pool: Sequence[str] = ("yes", "no")
    elif qtype == "number":
        pool = [str(i) for i in range(cfg.max_objects + 1)]
    elif answer in COLORS:
        pool = COLOR_NAMES
    elif answer in SIZES:
        pool = SIZES
    else:
        pool = SHAPES
    return [a for a in pool if a != answer]


def annotate_answers(answer: str, qtype: str, rng: np.random.Generator, cfg: ShapesConfig) -> List[str]:
    """``cfg.annotators`` answers: the true one, a minority replaced by wrong ones (``vqa_answer_noise``)."""
    n = cfg.annotators
    noisy = min(int(rng.binomial(n, cfg.vqa_answer_noise)), (n - 1) // 2)
    alts = _answer_alternatives(answer, qtype, cfg)
    idx = set(int(i) for i in rng.choice(n, size=noisy, replace=False)) if noisy else set()
    return [pick(rng, alts) if (i in idx and alts) else answer for i in range(n)]


# -------------------------------------------------------------------------------------- NLVR2
def _random_statement(left: Scene, right: Scene, rng: np.random.Generator,
                      cfg: ShapesConfig) -> PairStatement:
    kind = pick(rng, ("left", "right", "both", "neither", "exactly_one", "more", "same_count",
                       "total"))
    if kind == "more":
        return PairStatement(pick(rng, ("more_left", "more_right")))
    if kind == "same_count":
        return PairStatement("same_count")
    nl, nr = len(left.objects), len(right.objects)
    if kind == "total":
        return PairStatement("total", number=max(2, nl + nr + int(rng.integers(-1, 2))))
    if rng.random() < 0.2:
        n = pick(rng, (nl, nr, int(rng.integers(cfg.min_objects, cfg.max_objects + 1))))
        return PairStatement(kind, claim=Claim(count=n))
    src = left if rng.random() < 0.5 else right
    o = pick(rng, src.objects)
    if rng.random() < 0.25:
        o = SceneObject(pick(rng, SHAPES), pick(rng, COLOR_NAMES), pick(rng, SIZES),
                        o.row, o.col, 0, 0, 0)
    attrs = pick(rng, _ATTRIBUTE_VARIANTS + (("size", "color", "shape"),))
    spec = _reduced_spec(o, attrs)
    if cfg.use_positions and rng.random() < 0.15:
        row, col = _random_position(o, rng)
        spec = dataclasses.replace(spec, row=row, col=col)
    return PairStatement(kind, claim=Claim((spec,)))


def make_nlvr2(scenes: Sequence[Tuple[str, Scene]], n_pairs: int, rng: np.random.Generator,
                cfg: ShapesConfig) -> List[Dict[str, Any]]:
    """``n_pairs`` NLVR2 records over ``scenes`` (path, scene), half of them true."""
    if n_pairs == 0 or len(scenes) < 2:
        return []
    targets = np.array([True] * (n_pairs // 2) + [False] * (n_pairs - n_pairs // 2))
    targets = targets[rng.permutation(n_pairs)]
    out = []
    for target in targets:
        for attempt in range(400):
            if attempt % 20 == 0:
                i, j = (int(v) for v in rng.choice(len(scenes), size=2, replace=False))
                (lp, ls), (rp, rs) = scenes[i], scenes[j]
            stmt = _random_statement(ls, rs, rng, cfg)
            if statement_is_true(stmt, ls, rs) == bool(target):
                break
        else:  # pragma: no cover - "more"/"same" statements always give both labels
            raise RuntimeError("could not draw an NLVR2 statement with the wanted label")
        out.append({"images": [lp, rp], "sentence": statement_text(stmt, rng),
                    "label": "True" if target else "False"})
    return out


# ---------------------------------------------------------------------------- false negatives
def false_negative_stats(world: ShapesWorld, samples: List[Tuple[str, str, str]],
                          rng: np.random.Generator, max_samples: int = 1000) -> Dict[str, Any]:
    """For a sample of train captions: the fraction of the *other* train images each is true of."""
    train = world.images("train")
    n_other = len(train) - 1
    result: Dict[str, Any] = {
        "definition": "for each sampled train caption, the fraction of the other train images "
                      "that the caption is also true of (false negatives for contrastive "
                      "learning); p_in_batch_64 = mean of 1-(1-f)^63",
        "train_images": len(train),
    }
    if n_other < 1 or not samples:
        result.update(sample_size=0, mean_fraction=0.0, per_kind={})
        return result
    idx = np.arange(len(samples))
    if len(samples) > max_samples:
        idx = np.sort(rng.choice(len(samples), size=max_samples, replace=False))
    cols = np.array([world.index[p] for p in train])
    per_kind: Dict[str, List[float]] = {}
    fracs = []
    for i in idx:
        text, kind, img = samples[int(i)]
        row = world.caption_row(text)
        own = bool(row[world.index[img]])
        if not own:
            raise AssertionError(f"caption {text!r} is not true of its own image {img}")
        f = (int(row[cols].sum()) - 1) / n_other
        per_kind.setdefault(kind, []).append(f)
        fracs.append(f)
    batch = min(63, n_other)

    def summary(v: List[float]) -> Dict[str, Any]:
        a = np.asarray(v)
        return {"captions": int(a.size), "mean_fraction": round(float(a.mean()), 6),
                "with_any": round(float((a > 0).mean()), 6),
                "p_in_batch_64": round(float((1 - (1 - a) ** batch).mean()), 6)}

    result["sample_size"] = int(len(idx))
    result.update({k: v for k, v in summary(fracs).items() if k != "captions"})
    result["per_kind"] = {k: summary(per_kind[k]) for k in CAPTION_KINDS if k in per_kind}
    return result
