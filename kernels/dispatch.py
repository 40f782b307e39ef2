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
import re

import torch

ENV_VAR = "MATEKD_KERNELS"
BACKENDS = ("auto", "torch", "triton")
# The Triton releases these kernels are tested with: 3.9 in CI (interpreter) and ahead of time for
# sm_80/sm_90 (tests/test_kernels_aot.py); 3.6, the Triton of torch 2.11 images, natively on an
# H200 (benchmarks/gpu_check.sh, benchmarks/results/gpu_check_nvidia-h200_20261204.json). setup.py
# pins the same range: a newer Triton may change code generation (3.10 turns FP fusion off by default).
TRITON_REQUIREMENT = ">=3.6,<3.10"
TRITON_SUPPORTED = ((3, 6), (3, 10))  # [lowest, first unsupported) as (major, minor)
# Names the noise each backend draws for a seed; bump it when the stream changes. (The torch
# backend's CPU stream is the v1 one; on CUDA v2 draws from a generator on the tensor's device.)
NOISE_STREAM = {"triton": "philox4x32-10/quarter-rows/v2", "torch": "torch.Generator(tensor device)/row-chunks/v2"}

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = ""
except Exception as exc:  # any import failure means "no Triton"
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
# Module-level constants read inside kernels must be tl.constexpr; plain values without Triton.
constexpr = tl.constexpr if HAS_TRITON else (lambda value: value)


def triton_version_supported(version: str | None = None) -> bool | None:
    """Whether ``version`` (default: the installed Triton) lies in TRITON_REQUIREMENT; None without Triton."""
    version = version or (triton.__version__ if HAS_TRITON else None)
    if version is None:
        return None
    major_minor = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    lowest, first_unsupported = TRITON_SUPPORTED
    return lowest <= major_minor < first_unsupported


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET asks for the (CPU) Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def is_interpreted(kernel) -> bool:
    """Whether a decorated kernel was built for the interpreter (decided at decoration time)."""
    return type(kernel).__name__ == "InterpretedFunction"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _env_override() -> str:
    override = os.environ.get(ENV_VAR, "").strip().lower()
    if override and override not in ("torch", "triton"):
        raise ValueError(f"{ENV_VAR} must be 'triton' or 'torch', got {override!r}")
    return override


def _auto_backend(on_cuda: bool) -> str:
    """What "auto" picks for tensors on CUDA (on_cuda) or elsewhere, before any override."""
    return "triton" if on_cuda and HAS_TRITON else "torch"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map a requested backend ("auto", "torch", "triton") to "torch" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        override = _env_override()
        if not override:
            return _auto_backend(bool(tensors) and all(t.is_cuda for t in tensors))
        backend = override
    if backend == "triton":
        _check_triton_usable(tensors)
    return backend


def backend_info() -> dict:
    """What runs where, for a run's metrics.json: the backend "auto" resolves to for CUDA and for CPU
    tensors (the MATEKD_KERNELS override included), the Triton version or its import error, the
    supported Triton range, and the noise stream each backend draws. Never raises: an invalid
    MATEKD_KERNELS is reported as such."""
    raw_override = os.environ.get(ENV_VAR, "").strip().lower()
    try:
        override = _env_override()
        auto = {"cuda": override or _auto_backend(True), "cpu": override or _auto_backend(False)}
    except ValueError as exc:
        auto = {"cuda": f"error: {exc}", "cpu": f"error: {exc}"}
    return {
        "auto_backend": auto,
        "env_override": raw_override or None,
        "triton_version": triton.__version__ if HAS_TRITON else None,
        "triton_import_error": TRITON_IMPORT_ERROR or None,
        "triton_required": TRITON_REQUIREMENT,
        "triton_version_supported": triton_version_supported(),
        "triton_interpreter": interpreter_enabled(),
        "noise_stream": dict(NOISE_STREAM),
    }


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
