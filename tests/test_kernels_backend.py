"""Backend report (backend_info, for metrics.json), the supported Triton range, and the host-side
launch helpers every kernel shares: aligned scratch vectors, padded row layouts, the device guard."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from matekd_ds.kernels import backend_info
from matekd_ds.kernels import launch as launch_mod
from matekd_ds.kernels.dispatch import (
    HAS_TRITON,
    NOISE_STREAM,
    TRITON_REQUIREMENT,
    triton,
    triton_version_supported,
)


def test_backend_info_reports_what_auto_picks(monkeypatch):
    monkeypatch.delenv("MATEKD_KERNELS", raising=False)
    info = backend_info()
    assert info["auto_backend"] == {"cuda": "triton" if HAS_TRITON else "torch", "cpu": "torch"}
    assert info["env_override"] is None
    assert info["triton_required"] == TRITON_REQUIREMENT
    assert info["noise_stream"] == NOISE_STREAM
    if HAS_TRITON:
        assert info["triton_version"] == triton.__version__ and info["triton_import_error"] is None
        assert info["triton_version_supported"] is True  # CI installs the pinned range
    monkeypatch.setenv("MATEKD_KERNELS", "torch")
    assert backend_info()["auto_backend"] == {"cuda": "torch", "cpu": "torch"}
    monkeypatch.setenv("MATEKD_KERNELS", "cuda")  # invalid: reported, not raised
    info = backend_info()
    assert info["env_override"] == "cuda" and info["auto_backend"]["cpu"].startswith("error:")


@pytest.mark.parametrize("version,supported", [("3.9.0", True), ("3.9.1+git1234", True), ("3.10.0", False),
                                               ("3.6.0", True), ("3.5.1", False), ("4.0.0", False)])
def test_triton_version_range(version, supported):
    assert triton_version_supported(version) is supported


@pytest.mark.parametrize("n_rows", range(1, 10))
def test_scratch_vectors_start_16_byte_aligned_for_any_row_count(n_rows):
    vectors = launch_mod.aligned_row_vectors(5, n_rows, "cpu")
    assert len(vectors) == 5 and all(v.shape == (n_rows,) for v in vectors)
    assert all(v.data_ptr() % 16 == 0 for v in vectors)


def test_row_layouts():
    buf = torch.zeros(4, 64)
    padded = buf[:, :50]
    assert launch_mod.as_rows(padded).data_ptr() == padded.data_ptr()  # kept, not copied
    assert launch_mod.loadable_cols(padded) == 64
    out = launch_mod.empty_rows_like(padded, torch.bfloat16)
    assert out.shape == (4, 50) and out.stride(0) == 64 and out.dtype == torch.bfloat16
    # The last row's padding is not allocated: only V columns may be read.
    tight = torch.zeros(3 * 64 + 50).as_strided((4, 50), (64, 1))
    assert launch_mod.loadable_cols(tight) == 50 and launch_mod.empty_rows_like(tight).stride(0) == 50
    transposed = torch.zeros(50, 4).t()
    assert launch_mod.as_rows(transposed).is_contiguous()
    assert launch_mod.as_rows(torch.zeros(2, 3, 7)).shape == (6, 7)


def test_launch_config():
    assert launch_mod.launch_config(3) == {"BLOCK": 4, "num_warps": 1}
    assert launch_mod.launch_config(1000) == {"BLOCK": 1024, "num_warps": 4}
    assert launch_mod.launch_config(50265) == {"BLOCK": launch_mod.MAX_BLOCK, "num_warps": 8}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_run_on_the_tensors_device():
    from matekd_ds.kernels import gumbel_sample_ids, kl_div

    torch.cuda.set_device(0)
    x = torch.randn(8, 1000, device="cuda:1")
    assert gumbel_sample_ids(x, seed=0, backend="triton").device == x.device
    assert torch.isfinite(kl_div(x, x.flip(0), backend="triton"))
