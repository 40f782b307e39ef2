"""The generator's side of MATE-KD: rewrite the masked tokens of a batch.

Two samplers share one shape, `sample_perturbed_ids(generator, mb, seed)`: the Perturber (the
generator's samples) and RandomTokens (matekd.perturbation random, the control arm: uniform
tokens, no generator). The Perturber draws the masks for both.

Two forms of the generator's perturbation:
- `sample_perturbed_ids` (student steps): no gradient is needed, so the sampled tokens are fed
  back as ids. No B×L×V one-hot, no matmul with the embeddings, no backward through anything.
- `soft_embeddings` (generator steps): the straight-through one-hot y [M, V] of the masked
  rows only, times a model's word embeddings, replaces those rows' input embeddings so that the
  divergence's gradient reaches the generator's logits. The product runs inside the
  word-embedding module's own forward, where ZeRO-3 has gathered the partitioned matrix E
  (outside any forward, E is an empty placeholder under ZeRO-3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from matekd_ds.config import MatekdConfig
from matekd_ds.kernels import gumbel_sample_ids, gumbel_softmax_sample
from matekd_ds.masked_rows import masked_rows_only
from matekd_ds.masking import apply_mask, choose_mask, maskable
from matekd_ds.models import masked_lm_parts


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor  # [B, L] original ids
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    mask: torch.Tensor  # [B, L] bool: the positions the generator rewrites

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        kwargs = {"attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            kwargs["token_type_ids"] = self.token_type_ids
        return kwargs


class Perturber:
    def __init__(self, special_ids: list[int], mask_token_id: int, mask_prob: float, tau: float,
                 masked_rows_last_layer: bool = True):
        self.special_ids = special_ids
        self.mask_token_id = mask_token_id
        self.mask_prob = mask_prob
        self.tau = tau
        # the generator's last encoder layer at the masked rows only (masked_rows.py): the same
        # output there, a fraction of the work; encoders outside the BERT family run it whole
        self.masked_rows_last_layer = masked_rows_last_layer

    @classmethod
    def for_run(cls, matekd: MatekdConfig, tokenizer) -> Perturber:
        """The run's masking and sampling: matekd.mask_prob and gumbel_tau, the tokenizer's
        special tokens never masked, its mask token as the generator's input."""
        return cls(tokenizer.all_special_ids, tokenizer.mask_token_id, matekd.mask_prob, matekd.gumbel_tau,
                   matekd.generator_last_layer_masked_rows)

    def mask_batch(self, batch: dict[str, torch.Tensor], seed: int) -> MaskedBatch:
        ids, attention = batch["input_ids"], batch["attention_mask"]
        mask = choose_mask(ids, attention, self.special_ids, self.mask_prob, torch.Generator().manual_seed(seed))
        if not mask.any():  # keep every step a real one: mask the first maskable token
            candidates = maskable(ids, attention, self.special_ids).flatten()
            if candidates.any():
                mask.view(-1)[candidates.nonzero()[0]] = True
        return MaskedBatch(ids, attention, batch.get("token_type_ids"), mask)

    def masked_logits(self, generator: nn.Module, mb: MaskedBatch) -> torch.Tensor:
        """Generator logits at the masked rows only: [M, V]. The encoder runs on the whole
        batch (its last layer, where supported, at the masked rows only), the MLM head (the H×V
        projection) only on the M masked rows."""
        parts = masked_lm_parts(generator)
        masked_ids = apply_mask(mb.input_ids, mb.mask, self.mask_token_id)
        rows_only = masked_rows_only(parts.encoder, mb.mask, mb.attention_mask) if self.masked_rows_last_layer \
            else contextlib.nullcontext()
        with rows_only:
            hidden = parts.encoder(input_ids=masked_ids, **mb.model_kwargs())[0]
        return parts.head(hidden[mb.mask])

    @torch.no_grad()
    def sample_perturbed_ids(self, generator: nn.Module, mb: MaskedBatch, seed: int) -> torch.Tensor:
        logits = self.masked_logits(generator, mb)
        sampled = gumbel_sample_ids(logits, tau=self.tau, seed=seed)  # ids only: nothing of size M x V
        return mb.input_ids.masked_scatter(mb.mask, sampled)

    def sample_straight_through(self, generator: nn.Module, mb: MaskedBatch, seed: int) -> torch.Tensor:
        """The masked rows' samples as a straight-through one-hot y [M, V]: its values are an
        exact one-hot, its gradient the relaxed softmax's (what the generator step needs)."""
        logits = self.masked_logits(generator, mb)
        _, y = gumbel_softmax_sample(logits, tau=self.tau, hard=True, seed=seed)
        return y


class RandomTokens:
    """matekd.perturbation random: each masked token replaced by a token drawn uniformly from the
    vocabulary without the special tokens, as a control for the generator's samples (is it the
    adversary, or any masked-LM-style noise?). The draw comes from a CPU generator seeded with the
    step's seed, as the masks do: the same on every device, on resume and between runs."""

    def __init__(self, vocab_size: int, special_ids: list[int]):
        special = set(special_ids)
        self.candidates = torch.tensor([i for i in range(vocab_size) if i not in special], dtype=torch.long)
        if not len(self.candidates):
            raise ValueError("random tokens: the vocabulary holds special tokens only")

    @classmethod
    def for_run(cls, tokenizer) -> RandomTokens:
        """Every id the tokenizer can produce (len(tokenizer)), less its special ones."""
        return cls(len(tokenizer), tokenizer.all_special_ids)

    @torch.no_grad()
    def sample_perturbed_ids(self, generator: nn.Module | None, mb: MaskedBatch, seed: int) -> torch.Tensor:
        """`generator` is not used (the Perturber's shape). One draw per position of the batch,
        kept at the masked ones: no host sync for the number of masked tokens."""
        draws = torch.randint(len(self.candidates), mb.input_ids.shape, generator=torch.Generator().manual_seed(seed))
        replacements = self.candidates[draws].to(mb.input_ids.device)
        return torch.where(mb.mask, replacements, mb.input_ids)


# The generator step's soft input, computed where a ZeRO-3 partitioned E is whole.
#
# A forward hook on the model's word-embedding module, placed before every other hook of that
# module, replaces the masked rows of its output (the input embeddings) by y @ E. Under ZeRO-3:
# - forward: DeepSpeed's pre-forward hook has gathered E; its post-forward hook, which frees E
#   again, runs after ours;
# - backward: DeepSpeed's pre-backward hook wraps the output this hook returns, so E is gathered
#   again before autograd reaches y @ E and computes dL/dy = dL/drows @ E^T.
# Without DeepSpeed (or at ZeRO 0-2) the hook computes y @ E spliced into the looked-up embeddings
# (tests/helpers.py: soft_inputs_embeds, the inputs_embeds path it is checked against).


def _soft_rows_hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
    state = module.__dict__.get("_matekd_soft_rows")
    if state is None:
        return None
    mask, y = state
    if output.shape[:-1] != mask.shape:
        raise RuntimeError(f"soft embeddings: the word embeddings returned {tuple(output.shape)} "
                           f"for a mask of {tuple(mask.shape)}")
    rows = y.to(module.weight.dtype) @ module.weight
    return output.masked_scatter(mask.unsqueeze(-1), rows)


@contextlib.contextmanager
def soft_embeddings(model: nn.Module, mask: torch.Tensor, y: torch.Tensor) -> Iterator[None]:
    """Inside the block, `model(input_ids=..., ...)` embeds the positions where `mask` is True
    as y @ E (E = its word embeddings, y [M, V] one row per masked position, in row-major
    order) and every other position as usual. Call the model on its input_ids, once."""
    embedding = model.get_input_embeddings()
    if "_matekd_soft_hook" not in embedding.__dict__:
        embedding.__dict__["_matekd_soft_hook"] = embedding.register_forward_hook(_soft_rows_hook, prepend=True)
    embedding.__dict__["_matekd_soft_rows"] = (mask, y)
    try:
        yield
    finally:
        embedding.__dict__["_matekd_soft_rows"] = None
