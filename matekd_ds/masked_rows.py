"""The generator's last encoder layer, computed at the masked rows only.

MATE-KD reads the generator's output at the M masked rows alone: its MLM head, the Gumbel sampling
and the soft embeddings all run on those rows. In the last encoder layer every position still
provides keys and values, but the queries, the attention output and the feed-forward block are
needed at the masked rows only: M of the B x L rows, about a sixth of them at a 30% mask rate on
GLUE-length text. `masked_rows_only(encoder, mask, attention_mask)` makes the encoder's next
forward compute its last layer that way; the encoder's output then holds the layer's result at
the masked rows (and, elsewhere, the previous layer's output, which nothing reads).

Supported: the BERT family's post-LayerNorm encoder layer (BERT, RoBERTa, XLM-R, CamemBERT,
ELECTRA; `attention.self.{query,key,value}`, `attention.output`, `intermediate`, `output`) with
absolute positions. Any other encoder runs its whole last layer (`supports_masked_rows` says
which), with the same result. Dropout is applied where the full layer applies it (attention
probabilities, both dense outputs), with its own draws.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import transformers
from torch import nn

# transformers 5 encoder layers return a tensor, earlier releases a tuple whose first item it is
_LAYER_RETURNS_TUPLE = int(transformers.__version__.split(".")[0]) < 5


def _last_layer(encoder: nn.Module) -> nn.Module | None:
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    return layers[-1] if isinstance(layers, nn.ModuleList) and len(layers) else None


def _is_bert_family_layer(layer: nn.Module) -> bool:
    attention = getattr(layer, "attention", None)
    heads = getattr(attention, "self", None)
    config = getattr(heads, "config", None)
    return (all(hasattr(heads, name) for name in ("query", "key", "value", "num_attention_heads", "scaling"))
            and hasattr(attention, "output") and hasattr(layer, "intermediate") and hasattr(layer, "output")
            and not getattr(layer, "is_decoder", False) and not getattr(layer, "add_cross_attention", False)
            and getattr(config, "position_embedding_type", "absolute") == "absolute")


def supports_masked_rows(encoder: nn.Module) -> bool:
    """Whether `encoder`'s last layer can be computed at the masked rows only."""
    layer = _last_layer(encoder)
    return layer is not None and _is_bert_family_layer(layer)


def layer_at_rows(layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """A BERT-family layer's output at the rows where `mask` is True: [M, H], in row-major order.

    hidden: the layer's input [B, L, H]; attention_mask: [B, L], 1 at real tokens. Keys and values
    come from every position; queries, the attention output and the feed-forward block from the
    M masked rows only. The queries are laid out per sequence, padded to the longest count of
    masked rows, for one batched attention."""
    heads = layer.attention.self
    batch, length, width = hidden.shape
    n_heads, head_size = heads.num_attention_heads, heads.attention_head_size
    rows = hidden[mask]  # [M, H]
    where = mask.nonzero()  # [M, 2]: (sequence, position), row-major like hidden[mask]
    counts = mask.sum(1)
    rank = torch.arange(len(where), device=hidden.device) - (counts.cumsum(0) - counts)[where[:, 0]]
    width_q = int(counts.max()) if len(where) else 0
    query_rows = heads.query(rows)  # (under autocast, in its dtype)
    queries = query_rows.new_zeros(batch, width_q, n_heads * head_size)
    queries[where[:, 0], rank] = query_rows

    def split(x: torch.Tensor) -> torch.Tensor:  # [B, T, heads x size] -> [B, heads, T, size]
        return x.view(batch, -1, n_heads, head_size).transpose(1, 2)

    attend = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]
    context = F.scaled_dot_product_attention(
        split(queries), split(heads.key(hidden)), split(heads.value(hidden)), attn_mask=attend,
        dropout_p=heads.dropout.p if heads.training else 0.0, scale=heads.scaling)
    context = context.transpose(1, 2).reshape(batch, width_q, n_heads * head_size)[where[:, 0], rank]
    attended = layer.attention.output(context, rows)
    return layer.output(layer.intermediate(attended), attended)


@contextlib.contextmanager
def masked_rows_only(encoder: nn.Module, mask: torch.Tensor, attention_mask: torch.Tensor) -> Iterator[bool]:
    """Inside the block, the encoder's last layer runs at the rows where `mask` [B, L] is True
    only (yields True), or, for an encoder outside the BERT family, as usual (yields False).
    Either way the encoder's output at the masked rows is the same."""
    layer = _last_layer(encoder)
    if layer is None or not _is_bert_family_layer(layer):
        yield False
        return

    def forward(hidden_states: torch.Tensor, *args, **kwargs):
        rows = layer_at_rows(layer, hidden_states, attention_mask, mask)
        out = hidden_states.masked_scatter(mask.unsqueeze(-1), rows.to(hidden_states.dtype))
        return (out,) if _LAYER_RETURNS_TUPLE else out

    layer.forward = forward  # an instance attribute: module hooks (ZeRO-3's gathers) still run
    try:
        yield True
    finally:
        del layer.forward
