"""ML-Decoder (Ridnik et al., arXiv 2111.12933, WACV 2023), the ASL authors' successor classification head, in
the official layout.

A fixed set of G query vectors attends over the backbone's spatial tokens in one transformer-decoder layer without
self-attention; each of the G outputs is then turned into K logits by its own D x K matrix (the
"group fully-connected" layer), and the first C of the G * K logits are the classes (K = int(C / G + 0.999)).

The keys are the official checkpoints' (``head.decoder.*`` once attached to a model):

- ``embed_standart``: Linear(num_features, D), the token projection (sic, the official spelling);
- ``query_embed``: Embedding(G, D), the queries; never trained (``requires_grad=False``, as the original);
- ``layers.0.{multihead_attn, linear1, linear2, norm1, norm2, norm3}``: the decoder layer (8 heads, feed-forward
  width 2048, dropout 0.1);
- ``duplicate_pooling`` (G, D, K) and ``duplicate_pooling_bias`` (C): the group fully-connected layer.

The original wrapped its layer in ``nn.TransformerDecoder``, whose fast-path checks read a ``self_attn`` that the
layer does not have, so it fails on torch >= 2.1 (ML_Decoder issue #82). Here the layer is called directly: the
same maths, on any torch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError

__all__ = ["MLDecoder", "MLDecoderLayer", "ml_decoder_sizes", "DEFAULT_GROUPS", "DEFAULT_EMBEDDING", "MAX_EMBEDDING"]

#: original: 100 queries when num_of_groups < 0 ("full decoding" up to 100 classes)
DEFAULT_GROUPS = 100
#: original: the default decoder_embedding
DEFAULT_EMBEDDING = 768
#: the widest decoder_embedding: the attention alone holds 4 D^2 weights, 268 M (1 GiB) at D = 8192 and 40 G at
#: D = 100000, which no machine allocates; the published models use the default width or less.
MAX_EMBEDDING = 4096
# original: one decoder layer, 8 heads, feed-forward width 2048, dropout 0.1
NUM_HEADS = 8
FEEDFORWARD = 2048
DROPOUT = 0.1


def ml_decoder_sizes(num_classes: int, num_of_groups: int = -1,
                     decoder_embedding: int = DEFAULT_EMBEDDING) -> tuple[int, int, int]:
    """(G, D, K): queries, embedding width and logits per query, as the original computes them.

    G = 100 if ``num_of_groups`` is -1 else ``num_of_groups``, capped at C; D = :data:`DEFAULT_EMBEDDING` if
    ``decoder_embedding`` is -1; K = int(C / G + 0.999) (original: that expression rather than a ceiling). Only -1
    means "the default" (the original took any negative number so; a typo such as -5 is refused here), and D is at
    most :data:`MAX_EMBEDDING`. K falls short of C outputs only when C / G lies within 0.001 above an integer
    (G > 1000): such sizes are refused rather than giving fewer logits.
    """
    if isinstance(num_of_groups, bool) or not isinstance(num_of_groups, int) or (num_of_groups < 1
                                                                                   and num_of_groups != -1):
        raise ModelError(f"num_of_groups must be a positive integer (or -1 for the default), got {num_of_groups!r}")
    if isinstance(decoder_embedding, bool) or not isinstance(decoder_embedding, int) or not (
            decoder_embedding == -1 or 1 <= decoder_embedding <= MAX_EMBEDDING):
        raise ModelError(f"decoder_embedding must be a whole number within 1..{MAX_EMBEDDING} (or -1 for "
                         f"{DEFAULT_EMBEDDING}), got {decoder_embedding!r}")
    groups = min(DEFAULT_GROUPS if num_of_groups == -1 else num_of_groups, num_classes)
    embedding = DEFAULT_EMBEDDING if decoder_embedding == -1 else decoder_embedding
    if embedding % NUM_HEADS:
        raise ModelError(f"decoder_embedding must be a multiple of the {NUM_HEADS} attention heads, got {embedding}")
    factor = int(num_classes / groups + 0.999)
    if groups * factor < num_classes:
        raise ModelError(f"ML-Decoder with {groups} groups gives {groups * factor} outputs for {num_classes} classes "
                         f"(the original's int(C / G + 0.999)); choose fewer groups")
    return groups, embedding, factor


class MLDecoderLayer(nn.Module):
    """A transformer-decoder layer whose self-attention is replaced by ``tgt + dropout(tgt)``.

    Post-norm: add-and-norm after the stand-in for self-attention, after the cross-attention and after the
    feed-forward. The dropout modules have no parameters, so the keys are ``norm1..3``, ``multihead_attn``,
    ``linear1`` and ``linear2``, as the official layer's.
    """

    def __init__(self, d_model: int, num_heads: int = NUM_HEADS, dim_feedforward: int = FEEDFORWARD,
                 dropout: float = DROPOUT, layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.multihead_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """``tgt`` (N, G, D) queries, ``memory`` (N, L, D) tokens -> (N, G, D)."""
        # original: this stands where self-attention would be; in eval it doubles the queries (LayerNorm then
        # removes the factor). Kept, so that the official weights give the official outputs.
        tgt = self.norm1(tgt + self.dropout1(tgt))
        attended = self.multihead_attn(tgt, memory, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        fed = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(fed))


class _Decoder(nn.Module):
    """The parameters under ``decoder.``: the official head hung them all on its ``nn.TransformerDecoder``."""

    def __init__(self, num_classes: int, num_features: int, groups: int, embedding: int, factor: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MLDecoderLayer(embedding)])
        self.embed_standart = nn.Linear(num_features, embedding)
        self.query_embed = nn.Embedding(groups, embedding)
        # original: the queries are fixed random vectors, never trained.
        self.query_embed.requires_grad_(False)
        self.duplicate_pooling = nn.Parameter(torch.empty(groups, embedding, factor))
        self.duplicate_pooling_bias = nn.Parameter(torch.empty(num_classes))
        # original: xavier_normal_ for the group weights, zero biases; every other part keeps torch's defaults.
        nn.init.xavier_normal_(self.duplicate_pooling)
        nn.init.zeros_(self.duplicate_pooling_bias)


class MLDecoder(nn.Module):
    """The ML-Decoder head: (N, C_in, H, W) feature map, or (N, L, C_in) tokens -> (N, num_classes) logits."""

    def __init__(self, num_classes: int, num_features: int, num_of_groups: int = -1,
                 decoder_embedding: int = DEFAULT_EMBEDDING) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
        groups, embedding, factor = ml_decoder_sizes(num_classes, num_of_groups, decoder_embedding)
        self.num_classes = num_classes
        self.num_of_groups = groups
        self.decoder_embedding = embedding
        self.decoder = _Decoder(num_classes, num_features, groups, embedding, factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4):
            raise ModelError(f"ML-Decoder reads a (N, C, H, W) feature map or (N, L, C) tokens, got a tensor of "
                             f"shape {tuple(x.shape)}: the backbone still pools its features")
        tokens = x.flatten(2).transpose(1, 2) if x.dim() == 4 else x
        decoder = self.decoder
        memory = F.relu(decoder.embed_standart(tokens))
        queries = decoder.query_embed.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        hidden: torch.Tensor = queries
        for layer in decoder.layers:
            hidden = layer(hidden, memory)
        # Group FC: out[n, g, :] = hidden[n, g, :] @ P[g], as one batched matmul over the groups.
        grouped = torch.bmm(hidden.transpose(0, 1), decoder.duplicate_pooling).transpose(0, 1)
        return grouped.flatten(1)[:, :self.num_classes] + decoder.duplicate_pooling_bias

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, groups={self.num_of_groups}, "
                f"embedding={self.decoder_embedding}")
