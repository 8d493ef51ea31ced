"""Caption cleaning, tokenizers and MLM masking (datasets/text.py).

Expected cleaned strings were derived by hand from the public sources: salesforce/ALBEF
``dataset/utils.py`` (pre_caption, pre_question) and salesforce/BLIP ``data/utils.py`` (pre_caption).
"""
import hashlib
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

from datasets.text import (load_tokenizer, mask_tokens, pre_caption, pre_question, save_tokenizer,
                           tokenizer_from_state, tokenizer_state, train_wordpiece_tokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALBEF_CASES = [
    ("A man's dog, running (fast)! Isn't it?", "a mans dog running fast isnt it"),
    ("A well-known T-shirt/jeans store", "a well known t shirt jeans store"),
    ("  Two   dogs \n\n on  the grass.  \n", "two dogs on the grass"),
    ('<person> holding a sign: "STOP"; #1 ~ *wow*', "person holding a sign stop 1 wow"),
    ("-hello-", "hello"),
    ("a - b", "a b"),
    ("Hello...World", "helloworld"),
    ("a\tb c", "a\tb c"),  # only runs of >= 2 whitespace characters are collapsed, as in ALBEF
]
BLIP_CASES = [
    ("A man's dog, running (fast)! Isn't it?", "a man's dog, running fast isn't it?"),
    ("A well-known T-shirt/jeans store.", "a well-known t-shirt/jeans store"),
    ("  Two   dogs \n\n on  the grass.  \n", "two dogs on the grass"),
    ('<person> said: "hi"; ok~', "<person> said hi ok"),
    ("Hello...World", "hello world"),
    ("a - b", "a - b"),
]

CORPUS = [
    "a red circle left of a blue square", "two green triangles above a small star",
    "the big yellow star is right of the red square", "three blue circles below a green triangle",
    "a small red triangle and a big blue circle", "no squares, only circles and stars",
] * 5


@pytest.mark.parametrize("raw,expected", ALBEF_CASES)
def test_pre_caption_albef(raw, expected):
    assert pre_caption(raw) == expected
    assert pre_caption(raw, style="albef") == expected


@pytest.mark.parametrize("raw,expected", BLIP_CASES)
def test_pre_caption_blip(raw, expected):
    assert pre_caption(raw, style="blip") == expected


def test_truncation_and_question():
    assert pre_caption("One two three four five six", max_words=4) == "one two three four"
    assert pre_caption("a  b  c", max_words=2) == "a b"  # words counted after collapsing
    assert pre_caption("One, two. three four", max_words=3, style="blip") == "one, two three"
    assert pre_question("What's the man-holding?  ") == "whats the man holding"
    assert pre_question("is  it red", max_words=3) == "is  it"  # ALBEF does not collapse questions
    with pytest.raises(ValueError, match="albef.*blip"):
        pre_caption("x", style="clip")


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece_tokenizer(CORPUS, vocab_size=120)


def _ids(t, texts):
    return [t(x)["input_ids"] for x in texts]


PROBE = ["A red circle", "Stars, STARS and unseen-words like zebra", "Café [MASK] square", ""]


def test_trained_tokenizer_specials_and_determinism(tok):
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [0, 1, 2, 3, 4]
    assert len(tok) <= 120
    ids = tok("a red circle")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and 1 not in ids
    again = train_wordpiece_tokenizer(list(CORPUS), vocab_size=120)
    assert again.get_vocab() == tok.get_vocab()


def test_trained_tokenizer_same_in_another_process(tok):
    """The tokenizers library's own trainer gives different vocabularies in different processes."""
    code = ("import hashlib, sys; sys.path.insert(0, %r); from datasets.text import train_wordpiece_tokenizer;"
            "from tests.test_text_pipeline import CORPUS; t = train_wordpiece_tokenizer(CORPUS, 120);"
            "print(hashlib.sha1(repr(sorted(t.get_vocab().items())).encode()).hexdigest())" % ROOT)
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == hashlib.sha1(repr(sorted(tok.get_vocab().items())).encode()).hexdigest()


def test_tokenizer_state_round_trip(tok):
    state = pickle.loads(pickle.dumps(tokenizer_state(tok)))
    assert state["vocab"][:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and state["do_lower_case"] is True
    rebuilt = tokenizer_from_state(state)
    assert rebuilt.get_vocab() == tok.get_vocab()
    assert _ids(rebuilt, PROBE + CORPUS[:6]) == _ids(tok, PROBE + CORPUS[:6])


def test_save_load_round_trip(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "tok")
    lines = (tmp_path / "tok" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(tok) and lines[:2] == ["[PAD]", "[UNK]"]
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.get_vocab() == tok.get_vocab()
    assert _ids(loaded, PROBE + CORPUS[:6]) == _ids(tok, PROBE + CORPUS[:6])
    assert _ids(tokenizer_from_state(tokenizer_state(loaded)), PROBE) == _ids(tok, PROBE)


def test_load_hand_written_vocab(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s", "blue", "sq", "##uare"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    t = load_tokenizer(tmp_path)
    assert len(t.get_vocab()) == len(vocab) == len(t)
    assert t("A red circles, BLUE square")["input_ids"] == [2, 5, 6, 7, 8, 1, 9, 10, 11, 3]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab + ["red"]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lines"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_missing(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(missing)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        load_tokenizer(missing)


# ---------------------------------------------------------------------------------------------- MLM
V, MASK, SPECIAL = 1000, 4, [0, 1, 2, 3, 4]


def _batch(B=3000, L=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, L), generator=g)
    lengths = torch.randint(5, L + 1, (B,), generator=g)
    pos = torch.arange(L)
    ids[:, 0] = 2
    ids[pos[None] == (lengths - 1)[:, None]] = 3
    ids[pos[None] >= lengths[:, None]] = 0
    special = (ids == 0) | (ids == 2) | (ids == 3)
    return ids, special


def test_mask_tokens_statistics():
    ids, special = _batch()
    masked, labels = mask_tokens(ids, special, MASK, V, prob=0.15, generator=torch.Generator().manual_seed(1),
                                 special_ids=SPECIAL)
    selected = labels != -100
    assert not (selected & special).any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])  # unselected positions untouched
    n_elig, n_sel = int((~special).sum()), int(selected.sum())
    assert abs(n_sel / n_elig - 0.15) < 5 * math.sqrt(0.15 * 0.85 / n_elig)
    to_mask = selected & (masked == MASK)
    kept = selected & (masked == ids)
    to_random = selected & ~to_mask & ~kept
    tol = 5 * math.sqrt(0.8 * 0.2 / n_sel)
    assert abs(int(to_mask.sum()) / n_sel - 0.8) < tol
    # a random draw equal to the original token counts as "kept": expected 0.1 * (1 - 1/995) and 0.1 + 0.1/995
    assert abs(int(to_random.sum()) / n_sel - 0.1) < tol
    assert abs(int(kept.sum()) / n_sel - 0.1) < tol
    assert int(to_random.sum()) > 0
    assert not torch.isin(masked[to_random], torch.tensor(SPECIAL)).any() and int(masked.max()) < V


def test_mask_tokens_reproducible_and_default_special_ids():
    ids, special = _batch(B=200, seed=3)
    a = mask_tokens(ids, special, MASK, V, generator=torch.Generator().manual_seed(7))
    b = mask_tokens(ids, special, MASK, V, generator=torch.Generator().manual_seed(7))
    c = mask_tokens(ids, special, MASK, V, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # default special_ids: [MASK] and the ids at special positions ([PAD], [CLS], [SEP]) are never drawn
    ids_all = ids.clone()
    ids_all[~special] = 7
    masked, labels = mask_tokens(ids_all, special, MASK, 10, prob=1.0, generator=torch.Generator().manual_seed(0))
    drawn = masked[(labels != -100) & (masked != MASK) & (masked != 7)]
    assert drawn.numel() > 0 and not torch.isin(drawn, torch.tensor([0, 2, 3, 4])).any()
