"""Ids-only sampler (student steps): the law Categorical(softmax(logits)), the Triton kernel against a
torch mirror of its algorithm on identical uniforms, the torch backend against the straight-through
sampler's ids, and no allocation of size M x V on either backend.

Without CUDA the Triton path runs in the Triton interpreter, which must be switched on before the
kernel modules are imported (triton.jit reads TRITON_INTERPRET when it decorates).
"""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

from matekd_ds.kernels import gumbel as gumbel_mod
from matekd_ds.kernels import gumbel_sample_ids, gumbel_softmax_sample
from matekd_ds.kernels import launch as launch_mod
from matekd_ds.kernels.sample_ids import _sample_ids_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIXED_LOGITS = [0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 0.3]


def _logits(rows, vocab, scale=2.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=gen) * scale).to(DEVICE, dtype)


def _chi_square_p(ids, logits_row):
    probs = torch.softmax(torch.tensor(logits_row, dtype=torch.float64), 0)
    counts = torch.bincount(ids.flatten().cpu(), minlength=len(probs)).double()
    return stats.chisquare(counts.numpy(), (probs * len(ids.flatten())).numpy()).pvalue


# --------------------------------------------------------------------------- the algorithm, in torch


def mirror_sample_ids(logits, uniforms, block):
    """The Triton kernel's algorithm in float64 torch, vectorised over rows: Gumbel-max race of the
    blocks' log-masses with u_race, then inverse CDF inside the winning block with u_pick."""
    x = logits.double()
    n_rows, n_cols = x.shape
    n_blocks = -(-n_cols // block)
    padded = torch.full((n_rows, n_blocks * block), float("-inf"), dtype=torch.float64, device=x.device)
    padded[:, :n_cols] = x
    blocks = padded.view(n_rows, n_blocks, block)
    ref = blocks.amax(-1).nan_to_num(neginf=0.0)
    mass = torch.exp(blocks - ref[..., None]).sum(-1)
    gumbel = -torch.log(-torch.log(uniforms[..., 0].double()))
    keys = ref + mass.log() + gumbel
    winner = keys.argmax(-1)  # first maximal block, like the kernel's strict '>'
    e = torch.exp(blocks - ref[..., None])[torch.arange(n_rows), winner]
    target = uniforms[torch.arange(n_rows), winner, 1].double() * e.sum(-1)
    hit = (e.cumsum(-1) > target[:, None]).double().argmax(-1)  # first True
    return winner * block + hit


def _uniforms(n_rows, n_blocks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n_rows, n_blocks, 2, generator=gen).clamp_(1e-7, 1 - 1e-7)
    return u.to(DEVICE)


@pytest.mark.parametrize("vocab,block", [(7, 8), (300, 64), (1000, 1024)])
def test_kernel_matches_mirror_on_given_uniforms(vocab, block, monkeypatch):
    monkeypatch.setattr(launch_mod, "MAX_BLOCK", block)
    logits = _logits(24, vocab)
    logits[0, :] = float("-inf")  # a row whose every block but the last is empty ...
    logits[0, -1] = 0.0
    logits[1, : min(vocab, block)] = float("-inf")  # ... and one whose first block is empty
    uniforms = _uniforms(24, -(-vocab // block))
    ids = _sample_ids_triton(logits, seed=0, uniforms=uniforms)
    assert torch.equal(ids, mirror_sample_ids(logits, uniforms, block))
    assert ids[0] == vocab - 1


@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_mirror_follows_softmax(block):
    # One block (pure inverse CDF) to one column per block (pure Gumbel-max race over columns).
    n = 200_000
    logits = torch.tensor(FIXED_LOGITS, device=DEVICE).repeat(n, 1)
    ids = mirror_sample_ids(logits, _uniforms(n, -(-7 // block), seed=block), block)
    assert _chi_square_p(ids, FIXED_LOGITS) > 1e-3


# --------------------------------------------------------------------------- the kernel with its own RNG


def test_triton_samples_follow_softmax(monkeypatch):
    # Two blocks per row, so both the race and the inverse CDF draw from Philox. Each row is one
    # interpreter program on CPU (~10 ms), hence a few hundred rows; a GPU takes 20000.
    monkeypatch.setattr(launch_mod, "MAX_BLOCK", 4)
    n = 20000 if DEVICE == "cuda" else 400
    ids = gumbel_sample_ids(torch.tensor(FIXED_LOGITS, device=DEVICE).repeat(n, 1), seed=2024, backend="triton")
    assert _chi_square_p(ids, FIXED_LOGITS) > 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seed_determinism_and_tau(backend):
    logits = _logits(16, 500)
    ids = gumbel_sample_ids(logits, seed=7, backend=backend)
    assert ids.dtype == torch.int64 and ids.shape == (16,)
    assert torch.equal(ids, gumbel_sample_ids(logits, tau=0.3, seed=7, backend=backend))  # the law ignores tau
    assert not torch.equal(ids, gumbel_sample_ids(logits, seed=8, backend=backend))
    torch.manual_seed(5)
    first = gumbel_sample_ids(logits, backend=backend)
    torch.manual_seed(5)
    assert torch.equal(first, gumbel_sample_ids(logits, backend=backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_extreme_and_half_logits(backend):
    logits = _logits(4, 300, dtype=torch.bfloat16)
    logits[0, ::2] = float("-inf")
    logits[1, 17] = 1e4
    logits[2, :299] = float("-inf")
    ids = gumbel_sample_ids(logits, seed=3, backend=backend)
    assert ids[0] % 2 == 1 and ids[1] == 17 and ids[2] == 299
    assert torch.isfinite(logits.gather(1, ids[:, None])).all()


def test_padded_row_stride_and_leading_dims():
    base = _logits(6, 64)
    logits = base[:, :50]  # rows padded to 64: the kernel may load the padding and must ignore it
    base[:, 50:] = 1e4
    ids = gumbel_sample_ids(logits, seed=1, backend="triton")
    assert torch.equal(ids, gumbel_sample_ids(logits.contiguous(), seed=1, backend="triton"))
    assert (ids < 50).all()
    assert gumbel_sample_ids(logits.contiguous().view(2, 3, 50), seed=1, backend="triton").shape == (2, 3)


# --------------------------------------------------------------------------- the torch backend


@pytest.mark.parametrize("chunk_elements", [gumbel_mod.NOISE_CHUNK_ELEMENTS, 700])
def test_torch_backend_equals_straight_through_ids(chunk_elements, monkeypatch):
    # The same noise stream, chunk for chunk: student and generator steps (and the reference
    # oracle) see the same ids for the same seed.
    monkeypatch.setattr(gumbel_mod, "NOISE_CHUNK_ELEMENTS", chunk_elements)
    logits = _logits(37, 60).view(37, 60)
    expected, _ = gumbel_softmax_sample(logits, seed=11, backend="torch")
    assert torch.equal(gumbel_sample_ids(logits, seed=11, backend="torch"), expected)
    three_d = logits[:36].reshape(4, 9, 60)
    assert torch.equal(gumbel_sample_ids(three_d, seed=4, backend="torch"),
                       gumbel_softmax_sample(three_d, seed=4, backend="torch")[0])


def test_torch_backend_follows_softmax():
    ids = gumbel_sample_ids(torch.tensor(FIXED_LOGITS, device=DEVICE).repeat(20000, 1), seed=9, backend="torch")
    assert _chi_square_p(ids, FIXED_LOGITS) > 1e-3


# --------------------------------------------------------------------------- no M x V allocation


class LargestNewTensor(TorchDispatchMode):
    """Largest storage (bytes) of any tensor an op creates, ignoring outputs that alias an input."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        created = [t for t in torch.utils._pytree.tree_leaves(out)
                   if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        for t in created:
            if t.untyped_storage().nbytes() > self.largest:
                self.largest, self.op = t.untyped_storage().nbytes(), str(func)
        return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_student_step_sampler_allocates_nothing_of_size_m_by_v(backend, monkeypatch):
    n_rows, vocab = 40, 300
    monkeypatch.setattr(gumbel_mod, "NOISE_CHUNK_ELEMENTS", 2000)  # the torch backend: < 7 rows a chunk
    logits = _logits(n_rows, vocab)
    with LargestNewTensor() as probe:
        ids = gumbel_sample_ids(logits, seed=0, backend=backend)
    assert ids.shape == (n_rows,)
    assert 0 < probe.largest < n_rows * vocab, (probe.largest, probe.op)
    # The straight-through sampler, by contrast, returns its [M, V] one-hot: the probe sees it.
    with LargestNewTensor() as probe:
        gumbel_softmax_sample(logits, seed=0, backend=backend)
    assert probe.largest >= n_rows * vocab * logits.element_size()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        gumbel_sample_ids(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        gumbel_sample_ids(torch.zeros(2, 3), tau=0.0)
    with pytest.raises(ValueError):
        gumbel_sample_ids(torch.zeros(2, 0))
    assert math.isfinite(float(gumbel_sample_ids(torch.zeros(1, 1), seed=0)[0]))
