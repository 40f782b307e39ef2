"""Tokenisation, dynamic padding, rank sharding of training batches and of evaluation, and the
small helpers every consumer of a batch shares (device placement, model inputs)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from matekd_ds.data.loaders import Example

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a model's forward takes of a batch


@dataclass
class Encoded:
    """One tokenised split: ragged token lists plus labels, indexable by example id."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[float] | list[int]
    regression: bool

    def __len__(self) -> int:
        return len(self.input_ids)

    def head(self, n: int) -> Encoded:
        """The first n examples."""
        types = self.token_type_ids[:n] if self.token_type_ids is not None else None
        return Encoded(self.input_ids[:n], types, self.labels[:n], self.regression)


def encode(examples: Sequence[Example], tokenizer, max_length: int, regression: bool) -> Encoded:
    firsts = [ex.texts[0] for ex in examples]
    pairs = [ex.texts[1] for ex in examples] if examples and len(examples[0].texts) > 1 else None
    enc = tokenizer(firsts, pairs, truncation=True, max_length=max_length)
    token_types = enc.get("token_type_ids")
    if token_types is not None and pairs is None:
        token_types = None  # all zeros for single segments: not worth carrying
    labels = [float(ex.label) if regression else int(ex.label) for ex in examples]
    return Encoded(enc["input_ids"], token_types, labels, regression)


def collate(data: Encoded, indices: Sequence[int], pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in this batch (rounded up to `pad_to_multiple`)."""
    longest = max(len(data.input_ids[i]) for i in indices)
    length = math.ceil(longest / pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(indices), length), dtype=torch.long)
    types = torch.zeros((len(indices), length), dtype=torch.long) if data.token_type_ids else None
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        attention[row, :n] = 1
        if types is not None:
            types[row, :n] = torch.tensor(data.token_type_ids[i])
    label_dtype = torch.float32 if data.regression else torch.long
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": torch.tensor([data.labels[i] for i in indices], dtype=label_dtype),
        "index": torch.tensor(list(indices), dtype=torch.long),
    }
    if types is not None:
        batch["token_type_ids"] = types
    return batch


class TrainStream:
    """An endless, resumable stream of this rank's training micro-batches.

    Each epoch is one permutation (seeded by seed + epoch, the same on every rank) cut into
    global micro-batches of world_size x micro_batch examples; rank r takes slice r of each.
    The tail that does not fill a global micro-batch is dropped, so every rank sees the same
    number of batches. Position = micro-batches consumed so far, all a resume needs.

    With `lengths` (one per example: data.group_by_length) the epoch keeps the same examples,
    grouped by length: they are sorted by length (equal lengths stay in permutation order) and cut
    into global micro-batches, whose order is then shuffled, seeded by seed + epoch as well. A
    batch padded to its longest sequence is then almost all real tokens; the number of batches,
    the examples of each epoch, the ranks' shares and the resume position are as without it.
    """

    def __init__(self, size: int, micro_batch: int, rank: int, world_size: int, seed: int,
                 lengths: Sequence[int] | None = None):
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"{len(lengths)} lengths for {size} examples")
        self.size, self.micro_batch, self.rank, self.world = size, micro_batch, rank, world_size
        self.seed = seed
        self.lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
        self.batches_per_epoch = size // (micro_batch * world_size)

    @classmethod
    def over(cls, data: Encoded, micro_batch: int, rank: int, world_size: int, seed: int,
             group_by_length: bool = False) -> TrainStream:
        """The stream over a training set; `group_by_length` groups its batches by token count."""
        lengths = [len(ids) for ids in data.input_ids] if group_by_length else None
        return cls(len(data), micro_batch, rank, world_size, seed, lengths)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.size, generator=g)
        return order if self.lengths is None else self._grouped_by_length(order, g)

    def _grouped_by_length(self, order: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        global_batch = self.micro_batch * self.world
        kept = order[: self.batches_per_epoch * global_batch]  # the examples this epoch covers ungrouped
        by_length = kept[torch.sort(self.lengths[kept], stable=True).indices]
        batches = by_length.view(self.batches_per_epoch, global_batch)
        return batches[torch.randperm(self.batches_per_epoch, generator=g)].flatten()

    def batches(self, start: int = 0) -> Iterator[list[int]]:
        position = start
        while True:
            epoch, within = divmod(position, self.batches_per_epoch)
            order = self._epoch_order(epoch)
            for b in range(within, self.batches_per_epoch):
                first = (b * self.world + self.rank) * self.micro_batch
                yield order[first: first + self.micro_batch].tolist()
            position = (epoch + 1) * self.batches_per_epoch


def eval_shard(size: int, rank: int, world_size: int) -> list[int]:
    """Rank r evaluates examples r, r+W, ...; short shards repeat an index so that every rank
    runs the same number of forwards (ZeRO-3 gathers need that). Repeats are dropped on gather."""
    per_rank = math.ceil(size / world_size)
    shard = list(range(rank, size, world_size))
    while len(shard) < per_rank:
        shard.append(shard[-1] if shard else 0)
    return shard


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's keyword inputs of a batch (not its labels or example indices)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def doubled(batch: dict[str, torch.Tensor], perturbed_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clean and perturbed copies of a batch stacked into one forward of 2B rows."""
    out = {k: torch.cat([v, v]) for k, v in model_inputs(batch).items()}
    out["input_ids"] = torch.cat([batch["input_ids"], perturbed_ids])
    return out
