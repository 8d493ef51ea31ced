"""A small own-data fixture on REAL photographs: 12 pictures bundled in scikit-image's wheel, written as
JPEG files, with hand-written captions, VQA questions and NLVR2 statements in the standard annotation
formats (docs/datasets.md) -- what a user with a folder of photos and captions brings.

    paths = write_photo_dataset(tmp_path)   # {"image_root", "pretrain", "retrieval_train", ...}
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# name -> (captions, [(question, answer), ...]); captions describe what is in the picture
PHOTOS: dict[str, tuple[list[str], list[tuple[str, str]]]] = {
    "astronaut": (["a smiling woman astronaut in an orange space suit",
                   "an astronaut posing in front of an american flag and a model space shuttle",
                   "a portrait of a woman in an orange flight suit holding a white helmet"],
                  [("what color is the suit?", "orange"), ("is there a flag?", "yes"), ("how many people are there?", "1")]),
    "coffee": (["a cup of coffee on a red saucer with a spoon",
                "a white and red coffee cup on a wooden table",
                "an espresso in a red cup seen from above"],
               [("what is in the cup?", "coffee"), ("what color is the saucer?", "red"), ("is there a spoon?", "yes")]),
    "chelsea": (["a close up of a tabby cat with green eyes",
                 "the face of a striped cat looking at the camera",
                 "a brown tabby cat with long white whiskers"],
                [("what animal is this?", "cat"), ("what color are the eyes?", "green"), ("how many animals are there?", "1")]),
    "rocket": (["a white rocket on a launch pad at night",
                "a rocket standing between tall towers under a dark blue sky",
                "a space rocket lit by lights before launch"],
               [("what is standing on the pad?", "rocket"), ("is it night?", "yes"), ("what color is the rocket?", "white")]),
    "camera": (["a black and white photo of a man with a camera on a tripod",
                "a photographer in a dark coat looking through a camera",
                "a man filming on a lawn with buildings behind him"],
               [("what is the man holding?", "camera"), ("is the photo in color?", "no"), ("how many people are there?", "1")]),
    "coins": (["rows of old silver coins on a dark background",
               "a black and white photo of many round coins",
               "a collection of ancient coins laid out in rows"],
              [("what objects are shown?", "coins"), ("is the photo in color?", "no"), ("are there many coins?", "yes")]),
    "horse": (["the black silhouette of a horse on a white background",
               "a black horse shape standing to the right",
               "a horse drawn as a black shadow"],
              [("what animal is this?", "horse"), ("what color is the horse?", "black"), ("how many animals are there?", "1")]),
    "hubble_deep_field": (["many small galaxies and stars in the black sky",
                           "a deep space photo full of colorful galaxies",
                           "a dark sky with hundreds of tiny bright galaxies"],
                          [("what is in the sky?", "galaxies"), ("what color is the background?", "black"), ("are there many stars?", "yes")]),
    "moon": (["the grey surface of the moon with craters",
              "a black and white close up of a cratered moon surface",
              "craters and dark spots on the lunar surface"],
             [("what is shown?", "moon"), ("is the photo in color?", "no"), ("are there craters?", "yes")]),
    "stereo_motorcycle": (["a red motorcycle parked in a garage",
                           "a red and black motorbike standing in a workshop",
                           "a motorcycle with chrome wheels in front of shelves with boxes"],
                          [("what vehicle is this?", "motorcycle"), ("what color is the motorcycle?", "red"), ("how many wheels are there?", "2")]),
    "brick": (["a grey brick wall seen at an angle",
               "rows of long grey bricks in a wall",
               "a close up of a brick pavement in black and white"],
              [("what is the wall made of?", "brick"), ("is the photo in color?", "no"), ("are there people?", "no")]),
    "retina": (["a photo of the retina of a human eye with red blood vessels",
                "an orange round image of the back of an eye",
                "blood vessels spreading over a red retina"],
               [("what organ is shown?", "eye"), ("what color is it?", "red"), ("is it round?", "yes")]),
}

NAMES = list(PHOTOS)
# NLVR2: (left, right, statement, label)
STATEMENTS = [
    ("chelsea", "horse", "there is exactly one animal in each image", True),
    ("chelsea", "horse", "both images show a cat", False),
    ("coffee", "astronaut", "one of the images shows a cup of coffee", True),
    ("coffee", "astronaut", "both images show a red saucer", False),
    ("rocket", "hubble_deep_field", "both images show a dark sky", True),
    ("rocket", "hubble_deep_field", "the left image shows a motorcycle", False),
    ("camera", "coins", "both images are black and white", True),
    ("camera", "coins", "both images are in color", False),
    ("stereo_motorcycle", "brick", "the left image shows a red motorcycle", True),
    ("stereo_motorcycle", "brick", "the right image shows a motorcycle", False),
    ("moon", "retina", "one image shows craters", True),
    ("moon", "retina", "both images show a horse", False),
    ("astronaut", "chelsea", "the left image shows a person", True),
    ("astronaut", "chelsea", "the right image shows a person", False),
    ("horse", "coins", "the left image shows a horse", True),
    ("horse", "coins", "the left image shows coins", False),
]


def _array(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return image


def write_photos(root: Path) -> dict[str, str]:
    """The photos as JPEG files ``root/photos/<name>.jpg``; returns name -> path relative to ``root``."""
    from PIL import Image

    (root / "photos").mkdir(parents=True, exist_ok=True)
    out = {}
    for name in NAMES:
        rel = f"photos/{name}.jpg"
        Image.fromarray(_array(name)).convert("RGB").save(root / rel, quality=90)
        out[name] = rel
    return out


def _dump(path: Path, obj) -> str:
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return str(path)


def write_photo_dataset(root: Path) -> dict[str, str]:
    """Photos and annotation files of every task under ``root``. Splits: train = all 12 photos; val =
    the first 6, test = the last 6 (small: a user's first try). Image ids are 1..12."""
    root = Path(root)
    rel = write_photos(root)
    ann = root / "annotations"
    ann.mkdir(exist_ok=True)
    ids = {name: i + 1 for i, name in enumerate(NAMES)}
    val, test = NAMES[:6], NAMES[6:]
    paths = {"image_root": str(root)}
    paths["pretrain"] = _dump(ann / "pretrain.json",
                              [{"image": rel[n], "caption": c} for n in NAMES for c in PHOTOS[n][0]])
    paths["retrieval_train"] = _dump(ann / "retrieval_train.json",
                                     [{"image": rel[n], "caption": c, "image_id": ids[n]} for n in NAMES for c in PHOTOS[n][0]])
    for split, names in (("val", val), ("test", test)):
        paths[f"retrieval_{split}"] = _dump(ann / f"retrieval_{split}.json",
                                            [{"image": rel[n], "caption": PHOTOS[n][0]} for n in names])
        paths[f"caption_{split}"] = _dump(ann / f"caption_{split}.json",
                                          [{"image": rel[n], "caption": PHOTOS[n][0], "image_id": ids[n]} for n in names])
    paths["caption_train"] = paths["retrieval_train"]
    qid = iter(range(1, 10_000))
    questions = {n: [(next(qid), q, a) for q, a in PHOTOS[n][1]] for n in NAMES}
    paths["vqa_train"] = _dump(ann / "vqa_train.json", [{"question_id": i, "image": rel[n], "question": q, "answer": [a] * 3}
                                                        for n in NAMES for i, q, a in questions[n]])
    for split, names in (("val", val), ("test", test)):
        paths[f"vqa_{split}"] = _dump(ann / f"vqa_{split}.json",
                                      [{"question_id": i, "image": rel[n], "question": q} for n in names for i, q, _ in questions[n]])
        paths[f"vqa_{split}_gt"] = _dump(ann / f"vqa_{split}_gt.json",
                                         [{"question_id": i, "image": rel[n], "question": q, "answer": [a] * 3}
                                          for n in names for i, q, a in questions[n]])
    paths["answer_list"] = _dump(ann / "answer_list.json", sorted({a for n in NAMES for _, a in PHOTOS[n][1]}))
    pairs = [{"images": [rel[l], rel[r]], "sentence": s, "label": lab} for l, r, s, lab in STATEMENTS]
    paths["nlvr2_train"] = _dump(ann / "nlvr2_train.json", pairs)
    paths["nlvr2_dev"] = _dump(ann / "nlvr2_dev.json", pairs[:8])
    paths["nlvr2_test"] = _dump(ann / "nlvr2_test.json", pairs[8:])
    return paths
