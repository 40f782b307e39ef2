"""Host-side launch helpers shared by the kernel modules: block sizes, row layouts, aligned
scratch allocations, and the one place every kernel is launched from.

Everything the GPU compiler specialises on is decided here, so that one problem shape always maps
to one compiled variant:
  * Triton specialises pointer arguments on 16-byte alignment and integers on divisibility by 16.
    Per-row scratch vectors (row max, log-sum-exp, loss) are carved out of one allocation; each
    starts on a 16-byte boundary whatever the row count, so M mod 4 never adds a variant.
  * Rows keep a padded row stride when the caller has one (e.g. logits written into [M, V_pad]):
    when the padding is allocated the kernels load up to the stride, whose divisibility by 16 lets
    Triton issue vector loads, and drop the padding columns in registers.
"""

from __future__ import annotations

import contextlib

import torch

from .dispatch import ensure_launchable, next_power_of_2

# Larger blocks mean fewer loop trips (and far fewer interpreter steps on CPU); 4096 values per
# program keeps registers reasonable with 8 warps on GPU.
MAX_BLOCK = 4096
_FP32_PER_16_BYTES = 4

# Set by matekd_ds.kernels.aot while it compiles kernels ahead of time: called instead of launching,
# with exactly the arguments and options a launch would get.
compile_only_hook = None


def launch_config(n_cols: int) -> dict:
    """BLOCK (power of 2, at most MAX_BLOCK) and num_warps for rows of n_cols elements: about 8
    elements per thread, 1 to 8 warps (a short row gets one warp, not four idle ones)."""
    block = min(next_power_of_2(n_cols), MAX_BLOCK)
    return {"BLOCK": block, "num_warps": max(1, min(8, block // 256))}


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [M, V] with unit stride along V. A padded row stride is kept (no copy)."""
    rows = t.reshape(-1, t.shape[-1])
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]):
        rows = rows.contiguous()
    return rows


def loadable_cols(rows: torch.Tensor) -> int:
    """How many columns of every row may be read: the row stride when the rows are padded and the
    last row's padding lies inside the storage too, else V."""
    n_rows, n_cols = rows.shape
    stride = rows.stride(0)
    if n_rows == 0 or stride <= n_cols:
        return n_cols
    end = (rows.storage_offset() + n_rows * stride) * rows.element_size()
    return stride if rows.untyped_storage().nbytes() >= end else n_cols


def common_loadable_cols(*rows: torch.Tensor) -> int:
    return min(loadable_cols(r) for r in rows)


def empty_rows_like(rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An [M, V] output laid out like ``rows``: with the same (allocated) padded row stride, so that
    its stores vectorise like the loads, or contiguous."""
    n_rows, n_cols = rows.shape
    dtype = dtype or rows.dtype
    if loadable_cols(rows) > n_cols:
        return torch.empty(n_rows, rows.stride(0), dtype=dtype, device=rows.device)[:, :n_cols]
    return torch.empty(n_rows, n_cols, dtype=dtype, device=rows.device)


def aligned_row_vectors(count: int, n_rows: int, device, dtype=torch.float32) -> list[torch.Tensor]:
    """``count`` fp32 vectors of n_rows each, from one allocation, each starting 16-byte aligned."""
    width = -(-max(n_rows, 1) // _FP32_PER_16_BYTES) * _FP32_PER_16_BYTES
    return list(torch.empty(count, width, dtype=dtype, device=device)[:, :n_rows].unbind(0))


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device and its current stream, not on the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, grid, *args, **options):
    """kernel[grid](*args, **options) on the device of the first tensor argument."""
    tensor = next(a for a in args if isinstance(a, torch.Tensor))
    # Explicit, so numerics do not follow Triton's default (3.10 plans to turn FMA contraction off).
    options.setdefault("enable_fp_fusion", True)
    if compile_only_hook is not None:
        return compile_only_hook(kernel, grid, args, options)
    ensure_launchable(kernel, tensor)
    with _device_guard(tensor.device):
        return kernel[grid](*args, **options)
