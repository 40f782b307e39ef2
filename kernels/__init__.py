"""Fused Triton kernels (with torch reference backends) for MATE-KD.

* ``gumbel_softmax_sample``: Gumbel-max sampling of token ids with a (straight-through)
  relaxed sample, noise drawn in-kernel from a counter-based RNG.
* ``soft_cross_entropy`` / ``kl_div``: distillation losses over logits with gradients to
  both student and teacher.

``backend="auto"`` runs Triton on CUDA tensors and torch elsewhere; ``MATEKD_KERNELS=triton|torch``
overrides "auto". Importing this package never requires Triton. On CPU the Triton path only
runs under the interpreter, and TRITON_INTERPRET=1 must be set before this package is imported.
"""

from .dispatch import HAS_TRITON, resolve_backend
from .divergence import kl_div, soft_cross_entropy
from .gumbel import gumbel_softmax_sample

__all__ = ["HAS_TRITON", "gumbel_softmax_sample", "kl_div", "resolve_backend", "soft_cross_entropy"]
