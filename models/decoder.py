"""The shared causal text decoder (image captioning, generative VQA) and its generation.

:class:`TextDecoder` is a BERT-style language model built from the project's own pieces: the
embeddings and ``encoder.layer`` of a :class:`~models.text.TextTransformer` whose layers all have
cross-attention and run with causal self-attention, plus an :class:`~models.text.MLMHead` used as
the LM head (its output matrix tied to the decoder's word embeddings, as in BERT). The decoder
cross-attends to any encoder states: image tokens for captioning, the fusion encoder's output for
VQA. Parameter names: ``text.embeddings.*``, ``text.encoder.layer.<i>.*`` (HF BERT names),
``lm_head.{transform.dense, transform.LayerNorm, decoder, bias}``.

Initialisation from the pre-trained base model (:func:`init_decoder_from_base`, ``init_from``):

* ``fusion`` (default; ALBEF's VQA decoder, ``fusion`` layers copied): decoder layer ``i`` takes
  the base model's fusion layer ``i`` (BERT layer ``num_text_layers + i``): self-attention,
  cross-attention and FFN; the self-attention becomes causal.
* ``text_fusion``: decoder layer ``i`` takes base layer ``i`` (text layers first, then fusion
  layers), like BLIP's decoder initialised from all of BERT; the text layers have no
  cross-attention, so the decoder's cross-attention in those layers is new.
* ``none``: random (BERT) initialisation.

In every mode except ``none`` the embeddings come from the base text embeddings and the LM head
from the base MLM head. Decoder layers beyond the base model's layers are new, and so is a
cross-attention whose key/value width differs from the base's (e.g. a VQA decoder reading
768-wide fusion states initialised from cross-attention that read 1024-wide image tokens). All of
it is listed in the returned :class:`~models.loading.LoadReport`.

Sequences: ``[CLS] prompt... tokens... [SEP]``: ``[CLS]`` is the begin token, ``[SEP]`` the end
(EOS) token. The LM loss at position ``t`` predicts token ``t + 1``; ``labels`` of -100 (prompt,
padding) are ignored.

Generation (:meth:`TextDecoder.generate`): batched beam search or nucleus sampling, with a
key/value cache (self-attention keys/values of the prefix, cross-attention keys/values of the
encoder states computed once). Lengths count the tokens generated after the prompt:

* ``max_length``: at most this many tokens are generated, the EOS token included; a hypothesis
  that reaches ``max_length`` tokens without EOS ends there (its text has ``max_length`` tokens).
* ``min_length``: EOS is forbidden until ``min_length`` non-EOS tokens have been generated.
* Beam score: sum of the log-probabilities of the generated tokens (EOS included when generated)
  divided by ``max(1, n) ** length_penalty`` where ``n`` counts the generated tokens without EOS
  (the Hugging Face convention; ``length_penalty`` 0 ranks by total log-probability, larger
  values favour longer texts).
* Beam search keeps the ``num_beams`` best unfinished prefixes (by total log-probability) at each
  step; every EOS continuation of a kept prefix is offered to a pool of the ``num_beams`` best
  finished hypotheses (by normalised score). An item stops when its best finished hypothesis
  cannot be beaten by any continuation of its live prefixes (an exact bound, since log-probs are
  <= 0) or at ``max_length``. With ``num_beams`` at least the number of possible prefixes, the
  result is the exhaustive-search optimum (tested). Unlike Hugging Face's implementation, EOS
  continuations outside the top ``2 * num_beams`` candidates are not discarded.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import opt
from models.text import MLMHead, TextConfig, TextTransformer, attention_mask_4d
from models.loading import LoadReport, copy_into

__all__ = ["DecoderConfig", "GenerationConfig", "Generated", "TextDecoder", "init_decoder_from_base",
           "decode_texts"]

NEG_INF = float("-inf")


@dataclass
class DecoderConfig:
    num_layers: Optional[int] = opt(None, "decoder layers; null = as many as the base model's fusion layers")
    init_from: Literal["fusion", "text_fusion", "none"] = opt(
        "fusion", "initialise decoder layer i from: fusion = the base's fusion layer i (ALBEF); text_fusion = "
                  "base layer i counting text layers first (BLIP-like); none = random. Embeddings and LM head "
                  "come from the base model unless none")

    def validate(self) -> None:
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"decoder.num_layers must be >= 1 (or null); got {self.num_layers}")


@dataclass
class GenerationConfig:
    strategy: Literal["beam", "nucleus"] = opt("beam", "beam search or nucleus (top-p) sampling")
    num_beams: int = opt(3, "beams of beam search")
    max_length: int = opt(20, "most tokens generated after the prompt, EOS included")
    min_length: int = opt(5, "EOS is forbidden before this many tokens (after the prompt) were generated")
    length_penalty: float = opt(1.0, "beam score = log-prob / max(1, length) ** length_penalty (0 = total log-prob)")
    top_p: float = opt(0.9, "nucleus sampling: smallest set of tokens whose probability reaches top_p")
    temperature: float = opt(1.0, "nucleus sampling: logits are divided by this")
    use_cache: bool = opt(True, "cache keys/values of the prefix and of the encoder states (faster, same result)")
    seed: int = opt(0, "nucleus sampling: seed of the sampling generator (per evaluation call)")

    def validate(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"generation.num_beams must be >= 1; got {self.num_beams}")
        if self.max_length < 1:
            raise ValueError(f"generation.max_length must be >= 1; got {self.max_length}")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"generation.min_length must be in [0, max_length={self.max_length}]; got {self.min_length}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"generation.top_p must be in (0, 1]; got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0; got {self.temperature}")


@dataclass
class Generated:
    """Result of :meth:`TextDecoder.generate` for a batch of B items.

    Attributes:
        tokens: (B, T) generated token ids after the prompt, EOS removed, right-padded with the pad id.
        lengths: (B,) number of generated tokens without EOS.
        scores: (B,) beam search: the normalised beam score; sampling: the model's total log-probability
            of the sampled tokens (temperature 1, no top-p filtering), EOS included.
        eos: (B,) True where the text ended with EOS, False where ``max_length`` cut it.
    """

    tokens: Tensor
    lengths: Tensor
    scores: Tensor
    eos: Tensor


class _LayerCache:
    """Keys/values of one decoder layer: self-attention (grows per step, one row per hypothesis) and
    cross-attention (fixed, one row per encoder item, shared by that item's hypotheses)."""

    __slots__ = ("self_k", "self_v", "cross_k", "cross_v")

    def __init__(self, cross_k: Tensor, cross_v: Tensor) -> None:
        self.self_k: Optional[Tensor] = None
        self.self_v: Optional[Tensor] = None
        self.cross_k, self.cross_v = cross_k, cross_v

    def reorder(self, index: Tensor) -> None:
        """Keep hypothesis rows ``index`` (beam re-ordering within each item)."""
        self.self_k, self.self_v = self.self_k.index_select(0, index), self.self_v.index_select(0, index)


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, T, H) -> (B, heads, T, H / heads)."""
    B, T, H = t.shape
    return t.view(B, T, heads, H // heads).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:
    """(B, heads, T, d) -> (B, T, heads * d)."""
    B, h, T, d = t.shape
    return t.transpose(1, 2).reshape(B, T, h * d)


class TextDecoder(nn.Module):
    """Causal BERT-style decoder with cross-attention and a tied LM head.

    Args:
        text_cfg: the base model's text config (width, heads, FFN, vocabulary, dropouts are taken
            from it; its layer counts are ignored).
        num_layers: decoder layers.
        encoder_width: width of the encoder states the cross-attention reads.
    """

    def __init__(self, text_cfg: TextConfig, num_layers: int, encoder_width: int) -> None:
        super().__init__()
        cfg = dataclasses.replace(text_cfg, num_text_layers=0, num_fusion_layers=num_layers,
                                  encoder_width=encoder_width)
        self.cfg = cfg
        self.text = TextTransformer(cfg)
        self.lm_head = MLMHead(cfg)
        self.lm_head.decoder.weight = self.text.embeddings.word_embeddings.weight

    @property
    def num_layers(self) -> int:
        return self.cfg.num_fusion_layers

    # ------------------------------------------------------------------ training / scoring
    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor], encoder_hidden: Tensor,
                      encoder_mask: Optional[Tensor] = None) -> Tensor:
        """(B, L) token ids -> (B, L, H) states (causal self-attention, cross-attention to
        ``encoder_hidden`` (B, N, encoder_width) with ``encoder_mask`` (B, N), 1 = token)."""
        h = self.text.embeddings(input_ids)
        return self.text.forward_layers(h, attention_mask, 0, self.num_layers, encoder_hidden, encoder_mask,
                                        causal=True)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor], encoder_hidden: Tensor,
                encoder_mask: Optional[Tensor] = None) -> Tensor:
        """Next-token logits (B, L, V) at every position (prefer :meth:`lm_loss` for training:
        it computes logits only where there is a label)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, encoder_hidden, encoder_mask))

    def lm_loss(self, input_ids: Tensor, attention_mask: Optional[Tensor], encoder_hidden: Tensor,
                encoder_mask: Optional[Tensor], labels: Tensor, label_smoothing: float = 0.0,
                reduction: Literal["mean", "sequence"] = "mean") -> Tensor:
        """Teacher-forced LM loss: position ``t`` predicts ``labels[:, t + 1]``; -100 is ignored.

        Args:
            labels: (B, L) usually ``input_ids`` with the prompt and padding set to -100.
            label_smoothing: as ``torch.nn.functional.cross_entropy``.
            reduction: ``mean`` over all labelled tokens of the batch (captioning), or ``sequence``:
                (B,) per-sequence sums (VQA weights each answer's loss).
        """
        hidden = self.hidden_states(input_ids, attention_mask, encoder_hidden, encoder_mask)[:, :-1]
        targets = labels[:, 1:]
        sel = targets != -100
        logits = self.lm_head(hidden[sel]).float()
        tok_loss = F.cross_entropy(logits, targets[sel], reduction="none", label_smoothing=label_smoothing)
        if reduction == "mean":
            return tok_loss.sum() / sel.sum().clamp_min(1)
        if reduction == "sequence":
            rows = sel.nonzero()[:, 0]
            return torch.zeros(input_ids.shape[0], dtype=tok_loss.dtype, device=tok_loss.device).index_add_(0, rows, tok_loss)
        raise ValueError(f"reduction must be 'mean' or 'sequence'; got {reduction!r}")

    def sequence_log_prob(self, input_ids: Tensor, attention_mask: Tensor, encoder_hidden: Tensor,
                          encoder_mask: Optional[Tensor] = None, start: int = 1) -> Tensor:
        """(B,) total log-probability of the tokens ``input_ids[:, start:]`` that are not padding
        (``attention_mask`` 0), each given the tokens before it: the answer likelihood for VQA."""
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :start] = -100
        return -self.lm_loss(input_ids, attention_mask, encoder_hidden, encoder_mask, labels, 0.0, "sequence")

    # ------------------------------------------------------------------ incremental decoding
    def _init_cache(self, encoder_hidden: Tensor) -> list[_LayerCache]:
        """Cross-attention keys/values of ``encoder_hidden`` (B, N, W) for every layer (B rows)."""
        caches = []
        for layer in self.text.encoder.layer:
            ca = layer.crossattention
            caches.append(_LayerCache(_split_heads(ca.self.key(encoder_hidden), ca.heads),
                                      _split_heads(ca.self.value(encoder_hidden), ca.heads)))
        return caches

    def _step_cached(self, input_ids: Tensor, past_length: int, caches: list[_LayerCache],
                     encoder_mask4d: Optional[Tensor], group: int = 1) -> Tensor:
        """Hidden states (R, T, H) of ``input_ids`` (R, T) that follow ``past_length`` cached tokens
        (no padding anywhere); updates ``caches``. Row ``r`` reads encoder item ``r // group`` (the
        cross-attention cache and ``encoder_mask4d`` have R / group rows: an item's beams share them).
        Inference only (no dropout). The same computation as
        :class:`~models.text.TransformerLayer` (checked by the tests)."""
        x = self.text.embeddings(input_ids, past_length=past_length)
        R, T, _ = x.shape
        B = R // group
        self_mask = None
        if T > 1:
            k_len = past_length + T
            self_mask = torch.ones(T, k_len, dtype=torch.bool, device=x.device).tril(k_len - T)[None, None]
        for layer, c in zip(self.text.encoder.layer, caches):
            att = layer.attention
            q = _split_heads(att.self.query(x), att.heads)
            k = _split_heads(att.self.key(x), att.heads)
            v = _split_heads(att.self.value(x), att.heads)
            if c.self_k is not None:
                k, v = torch.cat([c.self_k, k], dim=2), torch.cat([c.self_v, v], dim=2)
            c.self_k, c.self_v = k, v
            out = _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=self_mask))
            x = att.output.LayerNorm(x + att.output.dense(out))
            ca = layer.crossattention
            q = _split_heads(ca.self.query(x), ca.heads)  # (R, h, T, d) -> (B, h, group * T, d)
            h, d = q.shape[1], q.shape[3]
            q = q.view(B, group, h, T, d).permute(0, 2, 1, 3, 4).reshape(B, h, group * T, d)
            out = F.scaled_dot_product_attention(q, c.cross_k, c.cross_v, attn_mask=encoder_mask4d)
            out = out.view(B, h, group, T, d).permute(0, 2, 1, 3, 4).reshape(R, h, T, d)
            x = ca.output.LayerNorm(x + ca.output.dense(_merge_heads(out)))
            x = layer.output.LayerNorm(x + layer.output.dense(F.gelu(layer.intermediate.dense(x))))
        return x

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, encoder_hidden: Tensor, encoder_mask: Optional[Tensor], prompt: Tensor,
                 gen: GenerationConfig, eos_token_id: int, pad_token_id: int,
                 suppress_ids: Sequence[int] = (), generator: Optional[torch.Generator] = None) -> Generated:
        """Generate a text for each of the B items.

        Args:
            encoder_hidden: (B, N, encoder_width) states to cross-attend to.
            encoder_mask: (B, N) 1 = token, 0 = pad, or None.
            prompt: (P,) or (B, P) token ids that start every text (``[CLS]`` + prompt words; no padding).
            gen: strategy and lengths (see the module docstring).
            eos_token_id, pad_token_id: end token and padding of the returned ``tokens``.
            suppress_ids: tokens never generated (e.g. ``[PAD]``, ``[CLS]``, ``[MASK]``).
            generator: random generator for nucleus sampling (None = torch's default).
        """
        B = encoder_hidden.shape[0]
        if prompt.dim() == 1:
            prompt = prompt[None].expand(B, -1)
        if prompt.shape[0] != B or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be (P,) or (B={B}, P) with P >= 1; got {tuple(prompt.shape)}")
        if prompt.shape[1] + gen.max_length > self.cfg.max_position_embeddings:
            raise ValueError(f"prompt ({prompt.shape[1]} tokens) + generation.max_length ({gen.max_length}) exceeds "
                             f"the decoder's max_position_embeddings ({self.cfg.max_position_embeddings})")
        was_training = self.training
        self.eval()
        try:
            if gen.strategy == "beam":
                return self._beam_search(encoder_hidden, encoder_mask, prompt, gen, eos_token_id, pad_token_id,
                                         suppress_ids)
            if gen.strategy == "nucleus":
                return self._sample(encoder_hidden, encoder_mask, prompt, gen, eos_token_id, pad_token_id,
                                    suppress_ids, generator)
            raise ValueError(f"unknown generation strategy {gen.strategy!r}; valid: beam, nucleus")
        finally:
            self.train(was_training)

    def _next_logits_fn(self, encoder_hidden: Tensor, encoder_mask: Optional[Tensor], prompt: Tensor,
                        group: int, use_cache: bool):
        """A stateful ``step(new_tokens (R,) | None, reorder (R,) | None) -> logits (R, V)`` for the
        R = B * group hypothesis rows of ``prompt`` (row r reads encoder item r // group). ``reorder``
        selects the rows that continue (within each item); ``new_tokens`` None runs the prompt."""
        state = {"seq": prompt, "len": 0}

        if use_cache:
            caches = self._init_cache(encoder_hidden)
            mask4d = attention_mask_4d(encoder_mask, 1, False)

            def step(new: Optional[Tensor], reorder: Optional[Tensor]) -> Tensor:
                if reorder is not None:
                    for c in caches:
                        c.reorder(reorder)
                ids = state["seq"] if new is None else new[:, None]
                h = self._step_cached(ids, state["len"], caches, mask4d, group)
                state["len"] += ids.shape[1]
                return self.lm_head(h[:, -1]).float()
            return step

        rows = torch.arange(encoder_hidden.shape[0], device=encoder_hidden.device).repeat_interleave(group)
        enc = encoder_hidden.index_select(0, rows)
        mask = None if encoder_mask is None else encoder_mask.index_select(0, rows)

        def step_full(new: Optional[Tensor], reorder: Optional[Tensor]) -> Tensor:
            if reorder is not None:
                state["seq"] = state["seq"].index_select(0, reorder)
            if new is not None:
                state["seq"] = torch.cat([state["seq"], new[:, None]], dim=1)
            h = self.hidden_states(state["seq"], None, enc, mask)
            return self.lm_head(h[:, -1]).float()
        return step_full

    def _beam_search(self, encoder_hidden: Tensor, encoder_mask: Optional[Tensor], prompt: Tensor,
                     gen: GenerationConfig, eos: int, pad: int, suppress_ids: Sequence[int]) -> Generated:
        B, K, dev = encoder_hidden.shape[0], gen.num_beams, encoder_hidden.device
        lp, max_len = gen.length_penalty, gen.max_length
        step = self._next_logits_fn(encoder_hidden, encoder_mask, prompt.repeat_interleave(K, dim=0), K,
                                    gen.use_cache)
        suppress = [i for i in suppress_ids if i != eos]
        seqs = torch.full((B, K, 0), pad, dtype=torch.long, device=dev)
        live = torch.full((B, K), NEG_INF, device=dev)
        live[:, 0] = 0.0  # the K copies of the prompt are one hypothesis
        fin_tok = torch.full((B, K, max_len), pad, dtype=torch.long, device=dev)
        fin_score = torch.full((B, K), NEG_INF, device=dev)
        fin_len = torch.zeros((B, K), dtype=torch.long, device=dev)
        fin_eos = torch.zeros((B, K), dtype=torch.bool, device=dev)

        def offer(cand_score: Tensor, cand_tok: Tensor, length: int, ended: bool) -> None:
            """Merge (B, K) candidates with ``length`` tokens into the finished pool (best K kept)."""
            nonlocal fin_tok, fin_score, fin_len, fin_eos
            padded = F.pad(cand_tok, (0, max_len - cand_tok.shape[2]), value=pad)
            all_score = torch.cat([fin_score, cand_score], 1)
            best, idx = all_score.topk(K, dim=1)
            gather = lambda t, new: torch.cat([t, new], 1).gather(1, idx if t.dim() == 2 else idx[..., None].expand(-1, -1, t.shape[2]))
            fin_tok = gather(fin_tok, padded)
            fin_len = gather(fin_len, torch.full_like(fin_len, length))
            fin_eos = gather(fin_eos, torch.full_like(fin_eos, ended))
            fin_score = best

        logits = step(None, None)
        for t in range(max_len):
            logp = F.log_softmax(logits, dim=-1).view(B, K, -1)
            norm = max(t, 1) ** lp
            if t >= gen.min_length:  # EOS continuations: finished hypotheses with t tokens
                offer((live + logp[..., eos]) / norm, seqs, t, True)
            if suppress:
                logp[..., suppress] = NEG_INF
            logp[..., eos] = NEG_INF
            V = logp.shape[-1]
            cand = (live[..., None] + logp).view(B, K * V)
            live, flat = cand.topk(K, dim=1)
            beam, tok = flat // V, flat % V
            seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, seqs.shape[2])), tok[..., None]], dim=2)
            if t + 1 == max_len:
                break
            # stop when no live continuation can beat the best finished hypothesis
            lengths_max = max_len if lp >= 0 else t + 1
            bound = live.max(dim=1).values / (max(lengths_max, 1) ** lp)
            if bool((fin_score[:, 0] >= bound).all()):
                break
            reorder = (torch.arange(B, device=dev)[:, None] * K + beam).view(-1)
            logits = step(tok.view(-1), reorder)
        if seqs.shape[2] == max_len:  # cut at max_length without EOS
            offer(live / (max(max_len, 1) ** lp), seqs, max_len, False)
        best = fin_score.argmax(dim=1)
        ar = torch.arange(B, device=dev)
        length = fin_len[ar, best]
        width = max(int(length.max()) if B else 0, 1)
        return Generated(tokens=fin_tok[ar, best, :width], lengths=length, scores=fin_score[ar, best],
                         eos=fin_eos[ar, best])

    def _sample(self, encoder_hidden: Tensor, encoder_mask: Optional[Tensor], prompt: Tensor, gen: GenerationConfig,
                eos: int, pad: int, suppress_ids: Sequence[int], generator: Optional[torch.Generator]) -> Generated:
        B, dev = encoder_hidden.shape[0], encoder_hidden.device
        step = self._next_logits_fn(encoder_hidden, encoder_mask, prompt, 1, gen.use_cache)
        suppress = [i for i in suppress_ids if i != eos]
        tokens = torch.full((B, gen.max_length), pad, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        ended = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.zeros(B, dtype=torch.long, device=dev)
        score = torch.zeros(B, device=dev)
        logits = step(None, None)
        for t in range(gen.max_length):
            logits = logits.clone()
            if suppress:
                logits[:, suppress] = NEG_INF
            if t < gen.min_length:
                logits[:, eos] = NEG_INF
            logp_model = F.log_softmax(logits, dim=-1)
            probs = F.softmax(logits / gen.temperature, dim=-1)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            cum = sorted_p.cumsum(dim=-1)
            keep = (cum - sorted_p) < gen.top_p  # tokens before which the mass is still below top_p
            keep[:, 0] = True
            sorted_p = sorted_p * keep
            pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
            tok = order.gather(1, pick).squeeze(1)
            active = ~done
            score = score + torch.where(active, logp_model.gather(1, tok[:, None]).squeeze(1), torch.zeros_like(score))
            is_eos = (tok == eos) & active
            ended |= is_eos
            write = active & ~is_eos
            tokens[write, t] = tok[write]
            lengths += write.long()
            done |= is_eos
            if bool(done.all()) or t + 1 == gen.max_length:
                break
            logits = step(torch.where(done, torch.full_like(tok, pad), tok), None)
        width = max(int(lengths.max()) if B else 0, 1)
        return Generated(tokens=tokens[:, :width], lengths=lengths, scores=score, eos=ended)


def decode_texts(tokenizer, generated: Generated) -> list[str]:
    """Texts of generated token ids (WordPiece pieces joined, special tokens dropped)."""
    out = []
    for row, n in zip(generated.tokens.tolist(), generated.lengths.tolist()):
        out.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def init_decoder_from_base(decoder: TextDecoder, text: TextTransformer, mlm_head: Optional[MLMHead],
                           init_from: str = "fusion") -> LoadReport:
    """Copy the base model's text weights into ``decoder`` (see the module docstring).

    Returns a report whose ``missing`` keys are the decoder weights left at their (random)
    initialisation, each with the reason in ``expected_missing``; ``unexpected`` lists the base
    weights not used (with reasons).
    """
    report = LoadReport()
    if init_from == "none":
        report.missing.extend(decoder.state_dict().keys())
        report.expected_missing.update({k: "decoder.init_from=none (random initialisation)" for k in report.missing})
        return report
    if init_from not in ("fusion", "text_fusion"):
        raise ValueError(f"decoder.init_from must be fusion, text_fusion or none; got {init_from!r}")
    base_cfg = text.cfg
    n_base = base_cfg.num_text_layers + base_cfg.num_fusion_layers
    start = base_cfg.num_text_layers if init_from == "fusion" else 0
    source: dict[str, Tensor] = {}
    reasons: dict[str, str] = {}
    base_sd = text.state_dict()
    for k, v in base_sd.items():
        if k.startswith("embeddings."):
            source["text." + k] = v
    for i in range(decoder.num_layers):
        j = start + i
        prefix = f"text.encoder.layer.{i}."
        if j >= n_base:
            reasons[prefix] = f"decoder layer {i} has no base layer to copy (the base has {n_base} layers)"
            continue
        for k, v in base_sd.items():
            if k.startswith(f"encoder.layer.{j}."):
                source[prefix + k[len(f"encoder.layer.{j}."):]] = v
        if j < base_cfg.num_text_layers:
            reasons[prefix + "crossattention."] = f"new cross-attention (base layer {j} is a text layer)"
        elif base_cfg.encoder_width != decoder.cfg.encoder_width:
            reasons[prefix + "crossattention."] = (
                f"new cross-attention key/value (the decoder reads width {decoder.cfg.encoder_width}, "
                f"base layer {j} read width {base_cfg.encoder_width})")
    if mlm_head is not None:
        for k, v in mlm_head.state_dict().items():
            if k != "decoder.weight":  # tied to the word embeddings
                source["lm_head." + k] = v
    targets = {k: v for k, v in decoder.state_dict().items() if k != "lm_head.decoder.weight"}
    # cross-attention of another width: the key/value projections are new (reported), the rest is copied
    if base_cfg.encoder_width != decoder.cfg.encoder_width:
        for k in list(source):
            if ".crossattention.self.key." in k or ".crossattention.self.value." in k:
                del source[k]
    copy_into(targets, source, report)
    used_layers = {start + i for i in range(decoder.num_layers)}
    for k in report.missing:
        for prefix, why in reasons.items():
            if k.startswith(prefix):
                report.expected_missing[k] = why
                break
    for j in range(n_base):
        if j not in used_layers:
            report.unexpected.append(f"encoder.layer.{j}.*")
            report.expected_unexpected[f"encoder.layer.{j}.*"] = (
                "base layer not used by the decoder (its text/fusion encoder role is unaffected)")
    if mlm_head is None:
        for k in report.missing:
            if k.startswith("lm_head."):
                report.expected_missing[k] = "no base MLM head given"
    return report

