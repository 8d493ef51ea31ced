"""The shared text decoder: LM loss, causality, the key/value cache, initialisation from the base
model, and generation checked against exhaustive search and an independent reference beam search."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from models.decoder import GenerationConfig, TextDecoder, decode_texts, init_decoder_from_base
from models.text import MLMHead, TextConfig, TextTransformer

PAD, CLS, EOS = 0, 1, 2  # the tiny vocabularies below: 0 pad, 1 begin, 2 end, 3.. words


def tiny_cfg(vocab: int = 6, **kw) -> TextConfig:
    base = dict(vocab_size=vocab, hidden_size=16, num_text_layers=1, num_fusion_layers=2, num_heads=2,
                intermediate_size=32, max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
                encoder_width=12)
    base.update(kw)
    return TextConfig(**base)


def peaky_decoder(vocab: int = 6, seed: int = 0, layers: int = 2) -> TextDecoder:
    """A random decoder whose next-token distributions are far from uniform (few exact ties)."""
    torch.manual_seed(seed)
    dec = TextDecoder(tiny_cfg(vocab), layers, encoder_width=12)
    with torch.no_grad():
        dec.text.embeddings.word_embeddings.weight.mul_(20.0)
        dec.lm_head.bias.copy_(torch.randn(vocab) * 1.5)
    return dec.eval()


def gen_cfg(**kw) -> GenerationConfig:
    g = GenerationConfig(**kw)
    g.validate()
    return g


def encoder_states(B: int = 3, N: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(B, N, 12, generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    mask[min(1, B - 1), 3:] = 0  # padding in one item
    return enc, mask


def seq_logprobs64(dec: TextDecoder, prefix: list[int], tokens: list[int], enc, mask) -> list[float]:
    """Log-probabilities (float64, full vocabulary) of each of ``tokens`` after ``prefix``, by a full
    forward pass (no cache)."""
    ids = torch.tensor([prefix + tokens])
    with torch.no_grad():
        logits = dec(ids, None, enc[None], None if mask is None else mask[None])[0].double()
    logp = F.log_softmax(logits, dim=-1)
    return [float(logp[len(prefix) - 1 + i, t]) for i, t in enumerate(tokens)]


# ----------------------------------------------------------------------------- loss and forward
def test_lm_loss_matches_float64_cross_entropy_with_smoothing_and_ignored_positions():
    torch.manual_seed(0)
    dec = TextDecoder(tiny_cfg(vocab=11), 2, 12).eval()
    enc, emask = encoder_states()
    ids = torch.randint(3, 11, (3, 7))
    ids[:, 0] = CLS
    att = torch.ones_like(ids)
    att[0, 5:] = 0
    ids[0, 5:] = PAD
    labels = ids.masked_fill(att == 0, -100)
    labels[:, :3] = -100  # a 3-token prompt is excluded
    eps = 0.1
    with torch.no_grad():
        logits = dec(ids, att, enc, emask).double()
        mean = dec.lm_loss(ids, att, enc, emask, labels, eps, "mean")
        per_seq = dec.lm_loss(ids, att, enc, emask, labels, eps, "sequence")
    logp = F.log_softmax(logits, dim=-1)
    tot, n, seq = 0.0, 0, [0.0, 0.0, 0.0]
    for b in range(3):
        for t in range(6):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            loss = (1 - eps) * -logp[b, t, y] - eps * logp[b, t].mean()
            tot, n = tot + float(loss), n + 1
            seq[b] += float(loss)
    assert float(mean) == pytest.approx(tot / n, rel=1e-5)
    assert per_seq.tolist() == pytest.approx(seq, rel=1e-5)
    # sequence_log_prob: the answer likelihood without smoothing, from token 1 on
    with torch.no_grad():
        slp = dec.sequence_log_prob(ids, att, enc, emask)
    ref = [sum(float(logp[b, t - 1, ids[b, t]]) for t in range(1, 7) if att[b, t]) for b in range(3)]
    assert slp.tolist() == pytest.approx(ref, rel=1e-5)


def test_decoder_is_causal_and_reads_the_encoder():
    dec = peaky_decoder(vocab=9)
    enc, emask = encoder_states()
    ids = torch.randint(3, 9, (3, 6))
    with torch.no_grad():
        a = dec(ids, None, enc, emask)
        ids2 = ids.clone()
        ids2[:, 4] = (ids2[:, 4] - 3 + 1) % 6 + 3  # change token 4
        b = dec(ids2, None, enc, emask)
        c = dec(ids, None, enc + 1.0, emask)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)  # earlier positions do not see token 4
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)
    assert not torch.allclose(a, c, atol=1e-3)


def test_key_value_cache_gives_the_full_forward_states():
    dec = peaky_decoder(vocab=9)
    enc, emask = encoder_states()
    ids = torch.randint(3, 9, (3, 7))
    ids[:, 0] = CLS
    with torch.no_grad():
        full = dec.hidden_states(ids, None, enc, emask)
        from models.text import attention_mask_4d
        caches = dec._init_cache(enc)
        m4 = attention_mask_4d(emask, 1, False)
        first = dec._step_cached(ids[:, :3], 0, caches, m4)  # a 3-token prompt at once
        steps = [first] + [dec._step_cached(ids[:, t:t + 1], t, caches, m4) for t in range(3, 7)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_init_from_base_copies_fusion_layers_embeddings_and_mlm_head():
    torch.manual_seed(0)
    cfg = tiny_cfg(vocab=13)
    base = TextTransformer(cfg)
    head = MLMHead(cfg)
    head.decoder.weight = base.embeddings.word_embeddings.weight
    dec = TextDecoder(cfg, 2, encoder_width=12)
    rep = init_decoder_from_base(dec, base, head, "fusion")
    assert not rep.unexplained_missing() and not rep.mismatched
    for i in range(2):  # decoder layer i == base layer 1 + i (one text layer first)
        for name, p in dec.text.encoder.layer[i].state_dict().items():
            assert torch.equal(p, base.encoder.layer[1 + i].state_dict()[name]), (i, name)
    assert torch.equal(dec.text.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)
    assert torch.equal(dec.lm_head.transform.dense.weight, head.transform.dense.weight)
    assert dec.lm_head.decoder.weight is dec.text.embeddings.word_embeddings.weight  # tied in the decoder
    assert dec.text.embeddings.word_embeddings.weight is not base.embeddings.word_embeddings.weight  # own copy

    # text_fusion with 3 layers: layer 0 comes from a text layer (no cross-attention: new)
    dec3 = TextDecoder(cfg, 3, encoder_width=12)
    rep3 = init_decoder_from_base(dec3, base, head, "text_fusion")
    assert not rep3.unexplained_missing()
    new = [k for k in rep3.missing]
    assert new and all(k.startswith("text.encoder.layer.0.crossattention.") for k in new)
    assert torch.equal(dec3.text.encoder.layer[0].attention.self.query.weight, base.encoder.layer[0].attention.self.query.weight)

    # a decoder reading another width (VQA: fusion states 16 wide, base cross-attention read 12)
    dec_w = TextDecoder(cfg, 2, encoder_width=16)
    rep_w = init_decoder_from_base(dec_w, base, head, "fusion")
    assert not rep_w.unexplained_missing() and not rep_w.mismatched
    assert sorted({k.rsplit(".", 1)[0] for k in rep_w.missing}) == [
        f"text.encoder.layer.{i}.crossattention.self.{kv}" for i in range(2) for kv in ("key", "value")]
    assert torch.equal(dec_w.text.encoder.layer[0].crossattention.self.query.weight,
                       base.encoder.layer[1].crossattention.self.query.weight)


# ----------------------------------------------------------------------------- beam search
def exhaustive_best(dec, enc, mask, prompt, words, min_len, max_len, lp):
    """Score every possible text (EOS-ended of length min_len..max_len-1, or cut at max_len), all
    texts of one length in one batched forward pass (float64 log-softmax over the full vocabulary)."""
    best = (-math.inf, None, None)
    for L in range(0, max_len + 1):
        if L < min_len:
            continue
        ended = L < max_len
        texts = [list(t) + ([EOS] if ended else []) for t in itertools.product(words, repeat=L)]
        ids = torch.tensor([prompt + t for t in texts])
        with torch.no_grad():
            logits = dec(ids, None, enc[None].expand(len(texts), -1, -1), mask[None].expand(len(texts), -1)).double()
        logp = F.log_softmax(logits, dim=-1)
        P = len(prompt)
        for i, t in enumerate(texts):
            total = sum(float(logp[i, P - 1 + j, w]) for j, w in enumerate(t))
            score = total / max(L, 1) ** lp
            if score > best[0]:
                best = (score, t[:L], ended)
    return best


@pytest.mark.parametrize("min_len,max_len,lp", [(0, 3, 1.0), (2, 4, 1.0), (1, 3, 0.0), (0, 3, 2.0)])
def test_beam_search_with_enough_beams_is_exhaustive_search(min_len, max_len, lp):
    dec = peaky_decoder(vocab=6, seed=min_len + max_len)
    enc, mask = encoder_states()
    words = [3, 4, 5]
    prompt = [CLS, 4]
    K = len(words) ** (max_len - 1)  # every prefix stays alive
    for use_cache in (True, False):
        out = dec.generate(enc, mask, torch.tensor(prompt), gen_cfg(num_beams=K, min_length=min_len, max_length=max_len,
                                                                     length_penalty=lp, use_cache=use_cache),
                           EOS, PAD, suppress_ids=[PAD, CLS])
        for b in range(enc.shape[0]):
            score, toks, ended = exhaustive_best(dec, enc[b], mask[b], prompt, words, min_len, max_len, lp)
            n = int(out.lengths[b])
            assert out.tokens[b, :n].tolist() == toks, (b, use_cache)
            assert bool(out.eos[b]) == ended
            assert float(out.scores[b]) == pytest.approx(score, abs=1e-4)
            assert (out.tokens[b, n:] == PAD).all()


def reference_beam_search(dec, enc, mask, prompt, K, min_len, max_len, lp, suppress):
    """A plain, one-item, list-based beam search with the same definition (no batching, no cache)."""
    live = [(0.0, [])]
    finished = []
    for t in range(max_len):
        cands = []
        for score, toks in live:
            ids = torch.tensor([prompt + toks])
            with torch.no_grad():
                logp = F.log_softmax(dec(ids, None, enc[None], mask[None])[0, -1].double(), -1)
            if t >= min_len:
                finished.append(((score + float(logp[EOS])) / max(t, 1) ** lp, toks, True))
            for w in range(logp.shape[0]):
                if w == EOS or w in suppress:
                    continue
                cands.append((score + float(logp[w]), toks + [w]))
        cands.sort(key=lambda c: -c[0])
        live = cands[:K]
        finished = sorted(finished, key=lambda f: -f[0])[:K]
        if t + 1 == max_len:
            finished += [(s / max(max_len, 1) ** lp, toks, False) for s, toks in live]
            break
        bound = max(s for s, _ in live) / (max_len if lp >= 0 else t + 1) ** lp
        if finished and finished[0][0] >= bound:
            break
    return max(finished, key=lambda f: f[0])


@pytest.mark.parametrize("K,min_len,max_len,lp", [(2, 1, 6, 1.0), (3, 3, 7, 0.6), (1, 0, 5, 1.0)])
def test_batched_beam_search_equals_a_plain_reference(K, min_len, max_len, lp):
    dec = peaky_decoder(vocab=10, seed=K)
    enc, mask = encoder_states(B=3, seed=K)
    prompt = [CLS, 5, 6]
    out = dec.generate(enc, mask, torch.tensor(prompt), gen_cfg(num_beams=K, min_length=min_len, max_length=max_len,
                                                                 length_penalty=lp), EOS, PAD, suppress_ids=[PAD, CLS])
    for b in range(3):
        score, toks, ended = reference_beam_search(dec, enc[b], mask[b], prompt, K, min_len, max_len, lp, {PAD, CLS})
        n = int(out.lengths[b])
        assert out.tokens[b, :n].tolist() == toks
        assert bool(out.eos[b]) == ended
        assert float(out.scores[b]) == pytest.approx(score, abs=1e-4)
        if b != 1:  # item 1 (with encoder padding) alone gives the same text: no cross-talk between items
            continue
        one = dec.generate(enc[b:b + 1], mask[b:b + 1], torch.tensor(prompt),
                           gen_cfg(num_beams=K, min_length=min_len, max_length=max_len, length_penalty=lp),
                           EOS, PAD, suppress_ids=[PAD, CLS])
        assert one.tokens[0, :int(one.lengths[0])].tolist() == toks


@pytest.mark.parametrize("strategy", ["beam", "nucleus"])
def test_min_max_length_and_eos_handling(strategy):
    dec = peaky_decoder(vocab=10)
    enc, mask = encoder_states(B=4)
    prompt = torch.tensor([CLS])
    # length_penalty 0: with a constant per-token cost every length would tie under normalisation
    g = dict(strategy=strategy, num_beams=3, top_p=0.95, length_penalty=0.0)
    with torch.no_grad():
        dec.lm_head.bias[EOS] = 60.0  # EOS as soon as it is allowed
    out = dec.generate(enc, mask, prompt, gen_cfg(min_length=3, max_length=8, **g), EOS, PAD, suppress_ids=[PAD, CLS])
    assert out.lengths.tolist() == [3] * 4 and out.eos.all()
    assert out.tokens.shape == (4, 3)
    assert not torch.isin(out.tokens, torch.tensor([PAD, CLS, EOS])).any()
    with torch.no_grad():
        dec.lm_head.bias[EOS] = -60.0  # EOS never wins: every text is cut at max_length
    out = dec.generate(enc, mask, prompt, gen_cfg(min_length=0, max_length=6, **g), EOS, PAD, suppress_ids=[PAD, CLS])
    assert out.lengths.tolist() == [6] * 4 and not out.eos.any()
    with torch.no_grad():
        dec.lm_head.bias[EOS] = 0.0
    out = dec.generate(enc, mask, prompt, gen_cfg(min_length=2, max_length=5, **g), EOS, PAD, suppress_ids=[PAD, CLS])
    assert ((out.lengths >= 2) & (out.lengths <= 5)).all()
    assert (out.lengths[~out.eos] == 5).all()  # only max_length cuts a text without EOS
    for b in range(4):  # padding after the text, never inside
        n = int(out.lengths[b])
        assert (out.tokens[b, n:] == PAD).all() and (out.tokens[b, :n] != PAD).all()


def test_nucleus_sampling_tiny_top_p_is_greedy_and_seeded_sampling_is_reproducible():
    dec = peaky_decoder(vocab=10, seed=3)
    enc, mask = encoder_states(B=3)
    prompt = [CLS, 4]
    out = dec.generate(enc, mask, torch.tensor(prompt), gen_cfg(strategy="nucleus", top_p=1e-6, min_length=2, max_length=6),
                       EOS, PAD, suppress_ids=[PAD, CLS])
    for b in range(3):  # manual greedy decoding with the same constraints
        toks, total = [], 0.0
        for t in range(6):
            ids = torch.tensor([prompt + toks])
            with torch.no_grad():
                logits = dec(ids, None, enc[b:b + 1], mask[b:b + 1])[0, -1].double()
            logits[[PAD, CLS]] = -math.inf
            if t < 2:
                logits[EOS] = -math.inf
            logp = F.log_softmax(logits, -1)
            w = int(logits.argmax())
            total += float(logp[w])
            if w == EOS:
                break
            toks.append(w)
        assert out.tokens[b, :int(out.lengths[b])].tolist() == toks
        assert float(out.scores[b]) == pytest.approx(total, abs=1e-4)
    g = gen_cfg(strategy="nucleus", top_p=0.9, temperature=1.5, min_length=1, max_length=8)
    a = dec.generate(enc, mask, torch.tensor(prompt), g, EOS, PAD, [PAD, CLS], torch.Generator().manual_seed(5))
    b = dec.generate(enc, mask, torch.tensor(prompt), g, EOS, PAD, [PAD, CLS], torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens)
    c = dec.generate(enc, mask, torch.tensor(prompt), dataclasses.replace(g, use_cache=False), EOS, PAD, [PAD, CLS],
                     torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, c.tokens)


def test_generation_config_validation_and_decode_texts():
    with pytest.raises(ValueError, match="min_length"):
        gen_cfg(min_length=5, max_length=3)
    with pytest.raises(ValueError, match="top_p"):
        gen_cfg(top_p=0.0)
    dec = peaky_decoder(vocab=10)
    enc, mask = encoder_states(B=1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        dec.generate(enc, mask, torch.tensor([CLS]), gen_cfg(max_length=40, min_length=0), EOS, PAD)

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(f"w{i}" for i in ids)
    out = dec.generate(enc, mask, torch.tensor([CLS]), gen_cfg(min_length=2, max_length=4), EOS, PAD, [PAD, CLS])
    n = int(out.lengths[0])
    assert decode_texts(Tok(), out) == [" ".join(f"w{i}" for i in out.tokens[0, :n].tolist())]
