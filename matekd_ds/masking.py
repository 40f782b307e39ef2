"""Choosing which tokens the generator rewrites: a fraction p of the real (non-special,
non-pad) tokens, each chosen independently, all replaced by the MLM mask token."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def maskable(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Iterable[int]) -> torch.Tensor:
    """True where a token may be masked: attended to and not a special token ([CLS], <s>, ...)."""
    special = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype, device=input_ids.device)
    return attention_mask.bool() & ~torch.isin(input_ids, special)


def choose_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: Iterable[int],
    prob: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """A Bernoulli(prob) draw per maskable token; [B, L] bool. `generator` lives on the CPU so
    the draw is the same on every device and resumes from a seed."""
    candidates = maskable(input_ids, attention_mask, special_ids)
    draws = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    return candidates & (draws < prob)


def apply_mask(input_ids: torch.Tensor, mask: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    return input_ids.masked_fill(mask, mask_token_id)
