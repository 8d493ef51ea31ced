"""BERT-style text encoder, fusion encoder and MLM head with Hugging Face parameter names.

One :class:`TransformerLayer` serves every text block: bidirectional text layers, fusion layers
(self-attention + cross-attention to image tokens), and causal decoder layers (``causal=True``)
with cross-attention to any encoder states of width ``encoder_width``. Post-LN like BERT; attention
through :func:`torch.nn.functional.scaled_dot_product_attention` with boolean masks.

Parameter names follow ``transformers``' ``BertModel`` so that a local ``bert-base-uncased``
directory loads through ``models/loading.py`` (``load_bert_weights``) with an explicit key map.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["TextConfig", "TransformerLayer", "TextEmbeddings", "TextTransformer", "MLMHead",
           "attention_mask_4d", "QueryLayout", "KVGroups"]


@dataclass
class TextConfig:
    """Text / fusion encoder configuration (defaults: BERT-base split 6 + 6)."""

    vocab_size: int = field(default=30522, metadata={"help": "WordPiece vocabulary size"})
    hidden_size: int = field(default=768, metadata={"help": "text hidden width"})
    num_text_layers: int = field(default=6, metadata={"help": "bidirectional text layers (BERT layers 0..n-1)"})
    num_fusion_layers: int = field(default=6, metadata={"help": "fusion layers with cross-attention (next BERT layers)"})
    num_heads: int = field(default=12, metadata={"help": "attention heads"})
    intermediate_size: int = field(default=3072, metadata={"help": "FFN width"})
    max_position_embeddings: int = field(default=512, metadata={"help": "maximum text length"})
    type_vocab_size: int = field(default=2, metadata={"help": "token type vocabulary (BERT: 2)"})
    hidden_dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings and block outputs"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout on attention probabilities"})
    layer_norm_eps: float = field(default=1e-12, metadata={"help": "LayerNorm epsilon (BERT: 1e-12)"})
    pad_token_id: int = field(default=0, metadata={"help": "padding token id"})
    encoder_width: int = field(default=768, metadata={"help": "width of the image tokens read by cross-attention"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute each layer in backward (saves memory)"})

    def validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "max_position_embeddings"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.text.{key} must be positive; got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.text.num_heads={self.num_heads} must divide model.text.hidden_size="
                             f"{self.hidden_size}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"model.text.pad_token_id={self.pad_token_id} must be a token id below "
                             f"model.text.vocab_size={self.vocab_size}")


def attention_mask_4d(key_mask: Optional[Tensor], q_len: int, causal: bool,
                      device: Optional[torch.device] = None) -> Optional[Tensor]:
    """Boolean SDPA mask (True = attend) from a ``(B, K)`` key mask (1 = token, 0 = pad).

    Returns None when nothing is masked (SDPA's fast path), else a mask broadcastable to
    ``(B, heads, Q, K)``. With ``causal`` the queries are the last ``q_len`` key positions.
    Query rows that would see no key at all (an all-padding sequence) attend to every key instead
    of producing NaN; their outputs are padding and meaningless anyway.
    """
    if key_mask is None and not causal:
        return None
    mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
    if causal:
        k_len = q_len if key_mask is None else key_mask.shape[1]
        tri = torch.ones(q_len, k_len, dtype=torch.bool, device=device if mask is None else mask.device)
        tri = tri.tril(diagonal=k_len - q_len)[None, None]
        mask = tri if mask is None else mask & tri
    return mask | ~mask.any(dim=-1, keepdim=True)


class Attention(nn.Module):
    """Multi-head attention with BERT names: ``self.{query,key,value}``, ``output.{dense,LayerNorm}``.

    ``kv_width`` is the width of the key/value input (``encoder_width`` for cross-attention).
    """

    def __init__(self, hidden: int, heads: int, kv_width: int, attention_dropout: float,
                 hidden_dropout: float, layer_norm_eps: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of the number of heads {heads}")
        self.heads = heads
        self.attention_dropout = attention_dropout
        self.self = nn.Module()
        self.self.query = nn.Linear(hidden, hidden)
        self.self.key = nn.Linear(kv_width, hidden)
        self.self.value = nn.Linear(kv_width, hidden)
        self.output = nn.Module()
        self.output.dense = nn.Linear(hidden, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.output.dropout = nn.Dropout(hidden_dropout)
        # ``record_probs = True`` makes forward() compute the attention probabilities explicitly and keep
        # them, in the autograd graph, as ``probs`` (B, heads, Q, K): Grad-CAM reads them and their
        # gradients (models/gradcam.py). Off, attention runs through SDPA and nothing is kept.
        self.record_probs = False
        self.probs: Optional[Tensor] = None

    def forward(self, x: Tensor, kv: Tensor, mask: Optional[Tensor] = None,
                kv_index: Optional[Tensor] = None, layout: Optional["QueryLayout"] = None,
                groups: Optional["KVGroups"] = None) -> Tensor:
        """``x`` (B, Q, H) attends to ``kv`` (B, K, W); ``mask`` boolean, broadcastable to (B, h, Q, K).

        With ``kv_index`` (B,) long, ``kv`` is (M, K, W) and row ``b`` of ``x`` attends to
        ``kv[kv_index[b]]``: keys and values are projected once per ``kv`` item and then gathered
        (the same result as passing ``kv[kv_index]``, without repeating the projections); ``mask``
        is then one key mask per row, equal for the rows that read one item. The rows of an item run
        as one packed query sequence (:class:`KVGroups`), except with ``record_probs`` (per-row
        probabilities): then the keys and values are gathered per row. ``groups``: that grouping of
        ``kv_index`` when the caller has it already (one per fusion pass, not one per layer).

        With ``layout`` (a :class:`QueryLayout`), ``x`` is (T, H): T query tokens spread over the
        layout's rows; only their queries, outputs and residuals are computed, and the result is
        (T, H). ``kv`` (and ``kv_index``, ``mask``) then describe the layout's rows."""
        H = x.shape[-1]

        def split(t: Tensor) -> Tensor:  # (N, T, H) -> (N, heads, T, H / heads)
            return t.view(t.shape[0], t.shape[1], self.heads, H // self.heads).transpose(1, 2)

        q = self.self.query(x)
        if layout is not None:
            q = layout.pad(q)
        B, Q = q.shape[0], q.shape[1]
        if kv_index is not None and not self.record_probs:  # no keys/values gathered per row
            groups = groups if groups is not None else KVGroups.from_index(kv_index, kv.shape[0])
            out = groups.attend(
                q, split(self.self.key(kv)), split(self.self.value(kv)), mask,
                self.attention_dropout if self.training else 0.0)
            if layout is not None:
                out = layout.unpad(out)
            return self.output.LayerNorm(x + self.output.dropout(self.output.dense(out)))
        q, k, v = split(q), split(self.self.key(kv)), split(self.self.value(kv))
        if kv_index is not None:
            k, v = k[kv_index], v[kv_index]
        if self.record_probs:
            out = self._explicit_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask,
                dropout_p=self.attention_dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, Q, H)
        if layout is not None:
            out = layout.unpad(out)
        return self.output.LayerNorm(x + self.output.dropout(self.output.dense(out)))


    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """SDPA's result with the probabilities kept as ``self.probs``: softmax(q k^T / sqrt(d)) v."""
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        self.probs = scores.softmax(dim=-1)
        return F.dropout(self.probs, self.attention_dropout, self.training) @ v


@dataclass
class QueryLayout:
    """Selected tokens of a batch of sequences, for layers that compute only those tokens' outputs.

    Built from a boolean ``(R, L)`` selection by :meth:`from_select`: ``rows`` (R',) are the rows
    with at least one selected token (ascending), token ``t`` (in the row-major order of
    ``select.nonzero()``) lies in row ``rows[row[t]]`` at position ``pos[t]`` and takes query slot
    ``slot[t]`` of its row; ``width`` is the largest number of selected tokens in a row. Attention
    runs on queries padded to ``(R', width)``; the padding slots are computed and dropped."""

    rows: Tensor
    row: Tensor
    pos: Tensor
    slot: Tensor
    width: int

    @classmethod
    def from_select(cls, select: Tensor) -> "QueryLayout":
        counts = select.sum(1)
        rows = counts.nonzero().squeeze(1)
        counts = counts[rows]
        row, pos = select[rows].nonzero(as_tuple=True)
        start = counts.cumsum(0) - counts
        slot = torch.arange(row.numel(), device=row.device) - start[row]
        return cls(rows, row, pos, slot, int(counts.max()) if rows.numel() else 0)

    def pad(self, x: Tensor) -> Tensor:
        """(T, H) token states -> (R', width, H), zeros in the unused slots."""
        return x.new_zeros(self.rows.numel(), self.width, x.shape[-1]).index_put((self.row, self.slot), x)

    def unpad(self, x: Tensor) -> Tensor:
        """(R', width, H) -> (T, H): the inverse of :meth:`pad`."""
        return x[self.row, self.slot]


@dataclass
class KVGroups:
    """Rows of an attention call grouped by the key/value item they read (``kv_index``).

    Gathering each item's keys and values once per row (``k[kv_index]``) copies rows x tokens x
    width, and its backward scatter-adds as much. Instead, every item's first ``width`` rows
    (``width``: the fewest rows any item read has) lay their queries side by side along the query
    axis of one packed row per item: attention runs once per item on its own keys and values, with
    no padding. Only the rows beyond an item's first ``width`` (the ``overflow``) gather their
    item's keys and values. Queries attend independently, so the result is the per-row one.

    ``items`` (M',): the items read (None: all of them, in order); ``inverse`` (R,): row -> packed
    row; ``packed`` (M' * width,): the rows in packed order (item-major); ``overflow``: the other
    rows; ``restore``: the permutation from ``cat(packed, overflow)`` back to row order;
    ``first`` (M',): one row per item (rows of an item share its key mask)."""

    items: Optional[Tensor]
    inverse: Tensor
    packed: Tensor
    overflow: Tensor
    restore: Tensor
    first: Tensor
    width: int

    @classmethod
    def from_index(cls, kv_index: Tensor, num_items: int) -> "KVGroups":
        """The grouping of ``kv_index`` (R,) long over ``num_items`` items."""
        items, inverse, counts = torch.unique(kv_index, return_inverse=True, return_counts=True)
        if items.numel() and not (0 <= int(items[0]) and int(items[-1]) < num_items):
            raise IndexError(f"key/value index out of range: {int(items[0])}..{int(items[-1])} for {num_items} items")
        width = int(counts.min()) if counts.numel() else 0
        order = torch.argsort(inverse, stable=True)  # item-major, rows of an item in row order
        start = counts.cumsum(0) - counts
        slot = torch.arange(order.numel(), device=order.device) - start[inverse[order]]
        packed, overflow = order[slot < width], order[slot >= width]
        restore = torch.argsort(torch.cat([packed, overflow]))
        return cls(None if items.numel() == num_items else items, inverse, packed, overflow, restore,
                   order[start], width)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float) -> Tensor:
        """SDPA of row ``r`` of ``q`` (R, Q, H) with item ``kv_index[r]`` of ``k``, ``v`` (M, h, K, d),
        as (R, Q, H); ``mask``: None or one key mask per row, ``(R or 1, 1 or h, 1, K)``."""
        if mask is not None and mask.shape[-2] != 1:
            raise ValueError("grouped attention takes one key mask per row, not per query")
        (R, Q, H) = q.shape
        if R == 0:
            return q.new_zeros(0, Q, H)
        if self.items is not None:
            k, v = k[self.items], v[self.items]
        per_row = mask is not None and mask.shape[0] != 1
        M, h, _, d = k.shape

        def heads(t: Tensor) -> Tensor:  # (N, T, H) -> (N, h, T, d)
            return t.view(t.shape[0], t.shape[1], h, d).transpose(1, 2)

        def merge(t: Tensor, rows: int) -> Tensor:  # (N, h, T, d) -> (rows, Q, H)
            return t.transpose(1, 2).reshape(rows, Q, H)

        outs = []
        if self.width:
            qp = heads(q[self.packed].view(M, self.width * Q, H))
            outs.append(merge(F.scaled_dot_product_attention(
                qp, k, v, attn_mask=mask[self.first] if per_row else mask, dropout_p=dropout_p), M * self.width))
        if self.overflow.numel():
            rows = self.inverse[self.overflow]
            outs.append(merge(F.scaled_dot_product_attention(
                heads(q[self.overflow]), k[rows], v[rows], attn_mask=mask[self.overflow] if per_row else mask,
                dropout_p=dropout_p), self.overflow.numel()))
        return (outs[0] if len(outs) == 1 else torch.cat(outs))[self.restore]


class TransformerLayer(nn.Module):
    """One BERT block: self-attention (optionally causal), optional cross-attention, FFN; post-LN.

    Parameter names: ``attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm}``,
    ``crossattention.*`` likewise (key/value read ``encoder_width``), ``intermediate.dense``,
    ``output.{dense,LayerNorm}``.
    """

    def __init__(self, hidden: int, heads: int, intermediate: int, cross_attention: bool = False,
                 causal: bool = False, encoder_width: Optional[int] = None, hidden_dropout: float = 0.1,
                 attention_dropout: float = 0.1, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.causal = causal
        self.has_cross_attention = cross_attention
        self.attention = Attention(hidden, heads, hidden, attention_dropout, hidden_dropout, layer_norm_eps)
        if cross_attention:
            self.crossattention = Attention(hidden, heads, encoder_width or hidden, attention_dropout,
                                            hidden_dropout, layer_norm_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.output.dropout = nn.Dropout(hidden_dropout)

    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor] = None,
                encoder_hidden: Optional[Tensor] = None, encoder_mask: Optional[Tensor] = None,
                causal: Optional[bool] = None, encoder_index: Optional[Tensor] = None,
                hidden_index: Optional[Tensor] = None, select: Optional[Tensor] = None,
                encoder_groups: Optional[KVGroups] = None) -> Tensor:
        """Run the block.

        Args:
            hidden: (B, L, H) input states.
            attention_mask: (B, L) with 1 = token, 0 = pad, or None (no padding).
            encoder_hidden: (B, N, encoder_width) states for cross-attention (required iff the
                layer has cross-attention).
            encoder_mask: (B, N) with 1 = token, 0 = pad, or None.
            causal: override the layer's default (``self.causal``) for this call.
            encoder_index: (B,) long or None: ``encoder_hidden`` (and ``encoder_mask``) then hold
                M distinct items and row b reads item ``encoder_index[b]`` (keys/values projected
                once per item).
            hidden_index: (R,) long or None: ``hidden`` (and ``attention_mask``) hold D distinct
                sequences and the block's rows are ``hidden[hidden_index]``; the self-attention runs
                once per distinct sequence (it depends on nothing else), the rest per row. The
                result has R rows; ``encoder_index`` and ``select`` refer to them.
            encoder_groups: ``KVGroups.from_index(encoder_index, M)``, when the caller has it
                (computed once for all the layers of a pass); not used with ``select``.
            select: (R, L) bool or None: compute only the outputs of the selected tokens (keys and
                values still come from every token) and return them as (T, H), in the order of
                ``select.nonzero()`` (equal to ``forward(...)[select]``). Not for causal layers.
        """
        if select is not None:
            return self._forward_selected(hidden, attention_mask, encoder_hidden, encoder_mask, causal,
                                          encoder_index, hidden_index, select)
        x = self.self_attend(hidden, attention_mask, causal)
        if hidden_index is not None:
            x = x[hidden_index]
        if self.has_cross_attention:
            if encoder_hidden is None:
                raise ValueError("this layer has cross-attention: pass encoder_hidden (image tokens)")
            if encoder_index is not None and encoder_mask is not None:
                encoder_mask = encoder_mask[encoder_index]
            x = self.crossattention(x, encoder_hidden, attention_mask_4d(encoder_mask, x.shape[1], False),
                                    kv_index=encoder_index, groups=encoder_groups)
        return self.feed_forward(x)

    def _forward_selected(self, hidden: Tensor, attention_mask: Optional[Tensor], encoder_hidden: Optional[Tensor],
                          encoder_mask: Optional[Tensor], causal: Optional[bool], encoder_index: Optional[Tensor],
                          hidden_index: Optional[Tensor], select: Tensor) -> Tensor:
        """``forward(...)[select]`` computing only the selected tokens' queries, outputs and FFN."""
        if (self.causal if causal is None else causal):
            raise ValueError("select (outputs at selected tokens only) needs a bidirectional layer")
        if hidden_index is not None:
            hidden = hidden[hidden_index]
            attention_mask = None if attention_mask is None else attention_mask[hidden_index]
        layout = QueryLayout.from_select(select)
        hidden = hidden[layout.rows]
        attention_mask = None if attention_mask is None else attention_mask[layout.rows]
        x = hidden[layout.row, layout.pos]
        if layout.width == 0:  # nothing selected
            return x
        x = self.attention(x, hidden, attention_mask_4d(attention_mask, layout.width, False), layout=layout)
        if self.has_cross_attention:
            if encoder_hidden is None:
                raise ValueError("this layer has cross-attention: pass encoder_hidden (image tokens)")
            kv_index = layout.rows if encoder_index is None else encoder_index[layout.rows]
            encoder_mask = None if encoder_mask is None else encoder_mask[kv_index]
            x = self.crossattention(x, encoder_hidden, attention_mask_4d(encoder_mask, layout.width, False),
                                    kv_index=kv_index, layout=layout)
        return self.feed_forward(x)

    # The block's stages, for heads that change only the cross-attention step (e.g. NLVR2's two
    # images): forward() is self_attend -> crossattention -> feed_forward.
    def self_attend(self, hidden: Tensor, attention_mask: Optional[Tensor] = None,
                    causal: Optional[bool] = None) -> Tensor:
        """The self-attention sub-block (with its residual and LayerNorm): (B, L, H) -> (B, L, H)."""
        causal = self.causal if causal is None else causal
        self_mask = attention_mask_4d(attention_mask, hidden.shape[1], causal, hidden.device)
        return self.attention(hidden, hidden, self_mask)

    def feed_forward(self, x: Tensor) -> Tensor:
        """The FFN sub-block (with its residual and LayerNorm): (B, L, H) -> (B, L, H)."""
        h = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(x + self.output.dropout(self.output.dense(h)))


class TextEmbeddings(nn.Module):
    """BERT embeddings: word + absolute position + token type, then LayerNorm and dropout."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None, past_length: int = 0) -> Tensor:
        """(B, L) token ids -> (B, L, H); positions start at ``past_length`` (for cached decoding)."""
        L = input_ids.shape[1]
        if past_length + L > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {past_length + L} exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}; truncate the text")
        pos = torch.arange(past_length, past_length + L, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class TextTransformer(nn.Module):
    """Embeddings + ``encoder.layer``: ``num_text_layers`` text layers, then fusion layers with
    cross-attention to image tokens of width ``cfg.encoder_width``."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            TransformerLayer(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size,
                             cross_attention=i >= cfg.num_text_layers, causal=False,
                             encoder_width=cfg.encoder_width, hidden_dropout=cfg.hidden_dropout,
                             attention_dropout=cfg.attention_dropout, layer_norm_eps=cfg.layer_norm_eps)
            for i in range(cfg.num_text_layers + cfg.num_fusion_layers))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """BERT initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorm."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_layers(self, hidden: Tensor, attention_mask: Optional[Tensor], start: int, end: int,
                       image_embeds: Optional[Tensor] = None, image_atts: Optional[Tensor] = None,
                       causal: bool = False, image_index: Optional[Tensor] = None,
                       text_index: Optional[Tensor] = None, select: Optional[Tensor] = None) -> Tensor:
        """Run ``encoder.layer[start:end]`` (the shared implementation of every text path).

        ``causal=True`` makes the self-attention causal (a decoder reusing these layers).
        ``image_index`` (R,): row b cross-attends to ``image_embeds[image_index[b]]`` (see
        ``TransformerLayer.forward``'s ``encoder_index``). ``text_index`` (R,): ``hidden`` holds
        distinct sequences and the rows are ``hidden[text_index]``; the first layer's
        self-attention runs once per distinct sequence. ``select`` (R, L) bool: the last layer
        computes only the selected tokens and the result is (T, H) = ``full_result[select]``.
        Gradient checkpointing applies per layer when ``cfg.grad_checkpointing`` and training.
        """
        layers = self.encoder.layer[start:end]
        if len(layers) == 0:
            if text_index is not None:
                hidden = hidden[text_index]
            return hidden if select is None else hidden[select]
        # the rows' grouping by image, for every layer's cross-attention (the last one with select
        # computes fewer rows and groups them itself)
        groups = None
        if image_index is not None and any(layer.has_cross_attention for layer in layers):
            groups = KVGroups.from_index(image_index, image_embeds.shape[0])
        for i, layer in enumerate(layers):
            extra = {} if image_index is None else {"encoder_index": image_index}
            if groups is not None and layer.has_cross_attention and not (i == len(layers) - 1 and select is not None):
                extra["encoder_groups"] = groups
            if i == 0 and text_index is not None:
                extra["hidden_index"] = text_index
            if i == len(layers) - 1 and select is not None:
                extra["select"] = select
            args = (hidden, attention_mask, image_embeds, image_atts, causal)
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, *args, use_reentrant=False, **extra)
            else:
                hidden = layer(*args, **extra)
            if i == 0 and text_index is not None and attention_mask is not None:
                attention_mask = attention_mask[text_index]
        return hidden

    def forward_text(self, input_ids: Tensor, attention_mask: Optional[Tensor],
                     select: Optional[Tensor] = None) -> Tensor:
        """Embeddings + bidirectional text layers: (B, L) ids -> (B, L, H); with ``select`` (B, L)
        bool only the selected tokens' states, (T, H) (the last layer computes only those)."""
        hidden = self.embeddings(input_ids)
        return self.forward_layers(hidden, attention_mask, 0, self.cfg.num_text_layers, select=select)

    def forward_fusion(self, hidden: Tensor, attention_mask: Optional[Tensor], image_embeds: Tensor,
                       image_atts: Optional[Tensor] = None, image_index: Optional[Tensor] = None,
                       text_index: Optional[Tensor] = None, select: Optional[Tensor] = None) -> Tensor:
        """Fusion layers (self-attention + cross-attention to ``image_embeds`` (B, N, encoder_width)).

        With ``image_index`` (R,) long, ``image_embeds`` (M, N, W) holds M distinct images and text
        row b reads image ``image_index[b]``: the same result as ``image_embeds[image_index]``, but
        the cross-attention keys/values are projected once per image, not once per pair.
        With ``text_index`` (R,) long, ``hidden`` (D, L, H) and ``attention_mask`` (D, L) hold D
        distinct texts and the rows are ``hidden[text_index]`` (the first layer's self-attention
        runs once per distinct text). With ``select`` (R, L) bool the result is (T, H), the states
        of the selected tokens only (``full_result[select]``), and the last layer computes only
        those tokens (its keys and values still read every token)."""
        n = self.cfg.num_text_layers
        return self.forward_layers(hidden, attention_mask, n, n + self.cfg.num_fusion_layers,
                                   image_embeds, image_atts, image_index=image_index,
                                   text_index=text_index, select=select)


class MLMHead(nn.Module):
    """BERT's ``cls.predictions``: dense, GELU, LayerNorm, decoder (tie it to the word embeddings), bias."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        TextTransformer._init_weights(self.transform.dense)
        TextTransformer._init_weights(self.decoder)

    def forward(self, hidden: Tensor) -> Tensor:
        """(M, H) states at the masked positions -> (M, V) logits."""
        h = self.transform.LayerNorm(F.gelu(self.transform.dense(hidden)))
        return self.decoder(h) + self.bias
