"""The frozen teacher, one owner for everything about it: its module, its ZeRO-3 engine when it
is partitioned over the ranks, and its clean-text logits.

A method asks for `clean_logits(batch)` and `logits(**inputs)` and calls `release()` after a
backward through the teacher; where the clean logits come from (a table computed once, or a
forward) and how ZeRO-3 memory is handed back are decided here, not in the method.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from matekd_ds.data.batching import Encoded, model_inputs
from matekd_ds.evaluation import predict
from matekd_ds.monitor import log
from matekd_ds.partition import release_backward_leftovers


class Teacher:
    def __init__(self, module: nn.Module, engine: Any = None, clean_table: torch.Tensor | None = None):
        self.module = module  # frozen, eval mode; the ZeRO-3 engine's module when partitioned
        self.engine = engine  # the ZeRO-3 inference engine (deepspeed.teacher), or None
        self.clean_table = clean_table  # [N, C] logits of the training set by example index, or None

    def logits(self, **inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's logits; gradients flow through its activations (never into its weights)."""
        return self.module(**inputs).logits

    @torch.no_grad()
    def clean_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits on a training batch's clean text: a table lookup when cached, else a forward."""
        if self.clean_table is not None:
            return self.clean_table[batch["index"]]
        return self.logits(**model_inputs(batch))

    def release(self) -> None:
        """After a backward through a ZeRO-3 teacher that its engine did not run (the generator
        step): free the weights that backward left gathered. No-op for a plain module."""
        if self.engine is not None:
            release_backward_leftovers(self.engine)

    def with_cached_clean_logits(self, train: Encoded, batch_size: int, pad_id: int, device: torch.device) -> Teacher:
        """This teacher with its clean logits on the whole training set computed once (a
        sharded pass): frozen and in eval mode, its clean logits never change, so a lookup by
        example index replaces a teacher forward in every step."""
        started = time.perf_counter()
        table = torch.from_numpy(predict(self.module, train, batch_size, pad_id, device)).to(device)
        log.info(f"[teacher] cached clean logits of {len(train)} training examples "
                 f"in {time.perf_counter() - started:.1f}s")
        return Teacher(self.module, engine=self.engine, clean_table=table)
