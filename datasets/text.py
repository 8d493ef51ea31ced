"""Caption cleaning (ALBEF / BLIP), WordPiece tokenizers (train, load, save, checkpoint state) and
BERT-style MLM masking.

Cleaning follows the public ``pre_caption`` functions character for character, because tokenisation
and therefore every metric depends on it:

* ``albef`` (salesforce/ALBEF ``dataset/utils.py``): lower-case; delete ``, . ' ! ? " ( ) * # : ; ~``;
  ``-`` and ``/`` become spaces; ``<person>`` becomes ``person``; runs of two or more whitespace
  characters become one space; strip a trailing newline and surrounding spaces; keep the first
  ``max_words`` space-separated words.
* ``blip`` (salesforce/BLIP ``data/utils.py``): lower-case; ``. ! " ( ) * # : ; ~`` become spaces
  (commas, apostrophes, question marks, hyphens and slashes stay); then the same collapsing, stripping
  and truncation.

As in the originals, a *single* tab or newline inside a caption is not turned into a space (only runs
of two or more whitespace characters are); BERT's pre-tokeniser treats it as a separator anyway.
"""
from __future__ import annotations

import heapq
import os
import re
from collections import Counter, defaultdict
from typing import Iterable, Optional, Sequence

import torch
from tokenizers import normalizers, pre_tokenizers
from transformers import BertTokenizerFast

__all__ = [
    "CLEAN_STYLES", "SPECIAL_TOKENS", "pre_caption", "pre_question", "train_wordpiece_tokenizer",
    "load_tokenizer", "save_tokenizer", "tokenizer_state", "tokenizer_from_state", "mask_tokens",
]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in trained vocabularies

_ALBEF_DELETE = re.compile(r"([,.'!?\"()*#:;~])")
_BLIP_SPACE = re.compile(r"([.!\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")


def _truncate_words(text: str, max_words: Optional[int]) -> str:
    text = _MULTI_SPACE.sub(" ", text).rstrip("\n").strip(" ")
    if max_words is None:
        return text
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def _clean_albef(caption: str, max_words: Optional[int]) -> str:
    caption = _ALBEF_DELETE.sub("", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    return _truncate_words(caption, max_words)


def _clean_blip(caption: str, max_words: Optional[int]) -> str:
    return _truncate_words(_BLIP_SPACE.sub(" ", caption.lower()), max_words)


CLEAN_STYLES = {"albef": _clean_albef, "blip": _clean_blip}


def pre_caption(caption: str, max_words: Optional[int] = 30, style: str = "albef") -> str:
    """Clean a caption exactly as ALBEF (``style="albef"``, the default) or BLIP (``"blip"``) does
    (``max_words=None``: no word limit)."""
    try:
        clean = CLEAN_STYLES[style]
    except KeyError:
        raise ValueError(f"unknown caption cleaning style {style!r}; valid: {sorted(CLEAN_STYLES)}") from None
    return clean(caption, max_words)


def pre_question(question: str, max_words: int = 30) -> str:
    """ALBEF's VQA question cleaning: as ``pre_caption`` but no whitespace collapsing and no
    ``<person>`` rule; only trailing spaces are stripped."""
    question = _ALBEF_DELETE.sub("", question.lower()).replace("-", " ").replace("/", " ")
    question = question.rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------
def _merge(word: list[str], pair: tuple[str, str], new: str) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _learn_wordpiece_vocab(word_counts: Counter, vocab_size: int, min_frequency: int) -> list[str]:
    """WordPiece vocabulary by BPE merges (as the ``tokenizers`` WordPieceTrainer does, "##" marking
    word-internal pieces), with ties broken by the pair's strings so the result is deterministic."""
    words = sorted(word_counts)
    counts = [word_counts[w] for w in words]
    pieces = [[w[0]] + ["##" + c for c in w[1:]] for w in words]
    vocab = list(SPECIAL_TOKENS) + sorted({p for w in pieces for p in w} - set(SPECIAL_TOKENS))
    known = set(vocab)
    pair_count: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(pieces):
        for pair in zip(w, w[1:]):
            pair_count[pair] += counts[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue  # stale heap entry
        if -neg < min_frequency:
            break
        new = pair[0] + (pair[1][2:] if pair[1].startswith("##") else pair[1])
        if new not in known:
            vocab.append(new)
            known.add(new)
        touched = set()
        for i in sorted(where.pop(pair)):
            old, c = pieces[i], counts[i]
            pieces[i] = merged = _merge(old, pair, new)
            for q in zip(old, old[1:]):
                pair_count[q] -= c
                touched.add(q)
            for q in zip(merged, merged[1:]):
                pair_count[q] += c
                where[q].add(i)
                touched.add(q)
        for q in sorted(touched):
            if pair_count[q] <= 0:
                del pair_count[q]
            else:
                heapq.heappush(heap, (-pair_count[q], q))
    return vocab


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 1) -> BertTokenizerFast:
    """Learn a lower-cased BERT WordPiece tokenizer from ``texts``.

    Normalisation and pre-tokenisation are the ``tokenizers`` library's ``BertNormalizer(lowercase)``
    and ``BertPreTokenizer``; the result is a ``BertTokenizerFast`` (WordPiece model, ``##`` prefix)
    with ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4``, then every character seen, then merges.
    The vocabulary is learned here rather than by ``tokenizers.trainers.WordPieceTrainer`` because that
    trainer breaks frequency ties by hash-map order and gives a different vocabulary in different
    processes; this one is identical for the same texts. ``vocab_size`` is an upper bound, except that
    the special tokens and the full character alphabet are always kept.
    """
    norm = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter = Counter()
    for text in texts:
        word_counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    vocab = _learn_wordpiece_vocab(word_counts, vocab_size, min_frequency)
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)


def _vocab_list(tok: BertTokenizerFast) -> list[str]:
    items = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    if [i for _, i in items] != list(range(len(items))):
        raise ValueError("tokenizer ids are not contiguous from 0; cannot write a vocab.txt")
    return [t for t, _ in items]


def save_tokenizer(tok: BertTokenizerFast, directory: str | os.PathLike) -> None:
    """Write ``vocab.txt`` (one token a line, in id order) plus the transformers files."""
    os.makedirs(directory, exist_ok=True)
    tok.save_pretrained(str(directory))
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in _vocab_list(tok))


def load_tokenizer(path: str | os.PathLike) -> BertTokenizerFast:
    """Load a BERT WordPiece tokenizer from a local directory holding ``vocab.txt`` (e.g. a
    ``bert-base-uncased`` download or a directory written by :func:`save_tokenizer`). Never downloads.
    Raises ``FileNotFoundError`` naming the missing directory or file and ``ValueError`` when the loaded
    vocabulary size differs from the number of lines of ``vocab.txt``."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory not found: {directory!r} (it must contain vocab.txt)")
    vocab_file = os.path.join(directory, "vocab.txt")
    if not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"tokenizer vocabulary not found: {vocab_file!r}")
    with open(vocab_file, encoding="utf-8") as f:
        n_lines = len(f.read().splitlines())
    # from_pretrained(directory), never BertTokenizerFast(vocab_file=...): in transformers 5.x the
    # latter silently builds a 5-token vocabulary.
    tok = BertTokenizerFast.from_pretrained(directory, local_files_only=True)
    if len(tok.get_vocab()) != n_lines:
        raise ValueError(f"tokenizer loaded from {directory!r} has {len(tok.get_vocab())} tokens but "
                         f"{vocab_file!r} has {n_lines} lines (duplicate lines or a broken tokenizer.json?)")
    return tok


def tokenizer_state(tok: BertTokenizerFast) -> dict:
    """A small picklable description of a BERT WordPiece tokenizer, to store inside a checkpoint."""
    norm = tok.backend_tokenizer.normalizer
    return {
        "kind": "bert_wordpiece",
        "vocab": _vocab_list(tok),
        "do_lower_case": bool(getattr(norm, "lowercase", getattr(tok, "do_lower_case", True))),
        "strip_accents": getattr(norm, "strip_accents", getattr(tok, "strip_accents", None)),
        "tokenize_chinese_chars": bool(getattr(norm, "handle_chinese_chars", True)),
        **{name: str(getattr(tok, name)) for name in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")},
        "model_max_length": int(tok.model_max_length),
    }


def tokenizer_from_state(state: dict) -> BertTokenizerFast:
    """Rebuild the tokenizer described by :func:`tokenizer_state` (same ids for any text)."""
    if state.get("kind") != "bert_wordpiece":
        raise ValueError(f"not a tokenizer state (kind={state.get('kind')!r})")
    kwargs = {k: v for k, v in state.items() if k not in ("kind", "vocab")}
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(state["vocab"])}, **kwargs)


# --------------------------------------------------------------------------------------------------
# MLM masking
# --------------------------------------------------------------------------------------------------
def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
    special_ids: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a ``(B, L)`` long tensor.

    Each position with ``special_mask`` False ([CLS]/[SEP]/[PAD] are True) is selected with
    probability ``prob``; a selected token becomes ``[MASK]`` (80%), a random token (10%) or stays
    (10%). Random tokens are drawn uniformly from ``[0, vocab_size)`` minus ``special_ids``; when
    ``special_ids`` is None, minus ``mask_token_id`` and every id found at special positions of this
    batch. Returns ``(masked_ids, labels)`` with labels the original id at selected positions and -100
    elsewhere. The draws are, in order: selection ``rand(B, L)``, split ``rand(B, L)``, random ids
    ``randint(B, L)``, all from ``generator``.
    """
    if special_ids is None:
        special_ids = {int(mask_token_id), *input_ids[special_mask].unique().tolist()}
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in special_ids if 0 <= i < vocab_size]] = False
    candidates = allowed.nonzero().squeeze(1)

    selected = (torch.rand(input_ids.shape, generator=generator) < prob) & ~special_mask.bool()
    split = torch.rand(input_ids.shape, generator=generator)
    random_ids = candidates[torch.randint(len(candidates), input_ids.shape, generator=generator)]

    masked = input_ids.clone()
    masked[selected & (split < 0.8)] = mask_token_id
    to_random = selected & (split >= 0.8) & (split < 0.9)
    masked[to_random] = random_ids[to_random]
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    return masked, labels
