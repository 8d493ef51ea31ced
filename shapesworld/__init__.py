"""The synthetic "shapes" world: a seeded generator of images and annotations in exactly the formats
that ALBEF/BLIP users already have (pre-training, retrieval, VQA, NLVR2, captioning), with a truth
oracle that knows, for any caption and any image, whether the caption is true of the image. The demo
presets (configs/demo/) run on it (README.md, "What the demo does").

A scene is a few coloured shapes on a 3x3 grid, on a plain or textured background, rendered with PIL.
Every caption is generated from a structured claim and can be parsed back, also after ALBEF-style
cleaning. Partial captions ("there is a red circle", "an image with two shapes") are true of many
images: the dataset has real, measurable false negatives, which is what SRCL is about
(``partial_caption_prob`` sets how often a caption describes only part of the scene).

With ``use_positions=False`` no caption, question or statement mentions a position or a directional
relation (left of / right of / above / below), so horizontal-flip augmentation keeps every caption
true; "next to" is flip-invariant and stays. (NLVR2's "left image" / "right image" name the images
of the pair, not positions, and stay too.)

Modules:
  config      :class:`ShapesConfig`, everything that determines the generated files
  scene       scenes: sampling and rendering
  grammar     claims, caption writing and parsing
  statements  NLVR2 statements about an image pair: writing and parsing
  truth       the truth oracle (:class:`ShapesWorld`, loaded from a world's ``scenes.json``)
  annotate    captions, VQA questions, NLVR2 pairs, false-negative statistics
  entailment  SNLI-VE: a covered grid cell, statements true, unknown or false of the image, their oracle
  entailment_write  the SNLI-VE part of a world's folder (written by :func:`ensure_shapes`)
  record      the record of the files the generator wrote, the manifest, the folder lock
  write       writing a world into a folder (:func:`ensure_shapes`, :func:`generate_shapes`)
  grounding   phrases naming one object each, with its box (the Grad-CAM grounding benchmark)
  preset      a run config's ``x-synthetic`` section: the world a preset asks for (:func:`prepare`)

Command line: ``python -m shapesworld --out DIR [--seed 0 --num-train-images 1500 ...]``.
"""
