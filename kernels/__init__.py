"""Fused Triton kernels (with torch reference backends) for MATE-KD.

* ``gumbel_softmax_sample``: Gumbel-max sampling of token ids with a (straight-through)
  relaxed sample, noise drawn in-kernel from a counter-based RNG (generator steps).
* ``gumbel_sample_ids``: the same law, ids only: no relaxed sample, nothing of size M x V
  (student steps).
* ``soft_cross_entropy`` / ``kl_div``: distillation losses over logits with gradients to
  both student and teacher.
* ``backend_info``: which backend "auto" picks where, and the Triton version, for metrics.json.

``backend="auto"`` runs Triton on CUDA tensors and torch elsewhere; ``MATEKD_KERNELS=triton|torch``
overrides "auto". Importing this package never requires Triton. On CPU the Triton path only
runs under the interpreter, and TRITON_INTERPRET=1 must be set before this package is imported.
``matekd_ds.kernels.aot`` compiles every kernel ahead of time for sm_80/sm_90 without a GPU.
"""

from .dispatch import HAS_TRITON, backend_info, resolve_backend
from .divergence import kl_div, soft_cross_entropy
from .gumbel import gumbel_softmax_sample
from .sample_ids import gumbel_sample_ids

__all__ = [
    "HAS_TRITON", "backend_info", "gumbel_sample_ids", "gumbel_softmax_sample", "kl_div", "resolve_backend",
    "soft_cross_entropy",
]
