"""Backend selection for the fused kernels, and the guarded Triton import.

Every op has two implementations: a Triton kernel and a plain-torch reference.
``backend="auto"`` picks Triton for CUDA tensors (when Triton imports) and torch
otherwise; the env var ``MATEKD_KERNELS=triton|torch`` overrides "auto" only, so
an explicit ``backend=`` argument always wins.

Triton is imported here, once, inside a try: a missing or broken Triton install
must leave the torch backends usable (CPU-only CI, tokenizer-only tooling, ...).
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "MATEKD_KERNELS"
BACKENDS = ("auto", "torch", "triton")

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = ""
except Exception as exc:  # noqa: BLE001 - any import failure means "no Triton"
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _no_triton_jit(fn=None, **_kwargs):
    """Stand-in for ``triton.jit`` when Triton is missing: keeps the plain function.

    The kernel modules use ``from __future__ import annotations`` so their
    ``tl.constexpr`` annotations are never evaluated; the undecorated kernels are
    never launched because dispatch refuses the Triton backend.
    """
    if fn is None:
        return lambda f: f
    return fn


jit = triton.jit if HAS_TRITON else _no_triton_jit


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET asks for the (CPU) Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def is_interpreted(kernel) -> bool:
    """Whether a decorated kernel was built for the interpreter (decided at decoration time)."""
    return type(kernel).__name__ == "InterpretedFunction"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map a requested backend ("auto", "torch", "triton") to "torch" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        override = os.environ.get(ENV_VAR, "").strip().lower()
        if override and override not in ("torch", "triton"):
            raise ValueError(f"{ENV_VAR} must be 'triton' or 'torch', got {override!r}")
        if override:
            backend = override
        else:
            on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
            return "triton" if on_cuda and HAS_TRITON else "torch"
    if backend == "triton":
        _check_triton_usable(tensors)
    return backend


def _check_triton_usable(tensors) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"Triton backend requested but triton failed to import ({TRITON_IMPORT_ERROR})")
    on_cpu = any(not t.is_cuda for t in tensors)
    if on_cpu and not interpreter_enabled():
        raise RuntimeError(
            "Triton backend on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing matekd_ds.kernels (or move the tensors to CUDA)"
        )


def ensure_launchable(kernel, tensor: torch.Tensor) -> None:
    """Fail clearly instead of crashing inside Triton when a kernel cannot run on ``tensor``.

    ``triton.jit`` reads TRITON_INTERPRET when it decorates, i.e. when the kernel module is
    imported, so setting the env var later does not turn an already-built GPU kernel into an
    interpreted one.
    """
    if not tensor.is_cuda and not is_interpreted(kernel):
        raise RuntimeError(
            "Triton kernels were built without TRITON_INTERPRET=1, so they cannot run on CPU "
            "tensors: set TRITON_INTERPRET=1 before the first import of matekd_ds.kernels"
        )
