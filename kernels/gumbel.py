"""Fused Gumbel-softmax sampling: ids ~ softmax(logits), plus a (straight-through) sample.

MATE-KD's generator turns masked-LM logits [M, V] into token ids with the Gumbel trick and
keeps a differentiable relaxation for the backward pass. Done eagerly that needs an M x V
uniform tensor, the noise, log_softmax, softmax and a one-hot: ~6 passes over M x V floats.
The Triton path instead draws the noise inside the kernel from a counter-based RNG, so nothing
M x V is stored besides the output, and the backward regenerates the same noise from the seed
instead of keeping it. (Student steps need only the ids: see ``sample_ids.gumbel_sample_ids``.)

Noise layout: each row is cut into four quarters of Q = ceil(V / 4) (rounded up to 16) columns;
column q * Q + i gets output q of the Philox call with counter (i, row, 0, 0) (see rng.py), so one
call feeds four elements and the noise depends on (seed, row, column, V) only. A block of the
loop is four TILE-wide sub-tiles, one per quarter, each a contiguous run of columns.

Math, in base 2 (w2 = w * log2(e), z = log_softmax(x) + G, w = (x + G) / tau, s = softmax(z / tau)):
  * ids = argmax(z) = argmax(x + G): log_softmax only shifts a row by a constant.
  * s = softmax(w) = exp2(w2 - max w2 - log2 sum exp2(w2 - max w2)), so the kernel never needs lse(x).
  * dL/dz = s * (g - <g, s>) / tau. log_softmax's Jacobian maps that to
    dL/dz - softmax(x) * sum(dL/dz), and sum(dL/dz) = 0, hence dL/dx = dL/dz
    (checked against torch autograd in tests/test_kernels_gumbel.py).
  * hard=True returns one_hot(ids) exactly with the gradient of s (straight-through); the forward
    kernel writes the one-hot itself (zeros while it scans, the 1 once the row is done).
"""

from __future__ import annotations

import torch

from .dispatch import constexpr, is_interpreted, jit, resolve_backend, tl
from .launch import (
    aligned_row_vectors,
    as_rows,
    common_loadable_cols,
    empty_rows_like,
    launch,
    launch_config,
    loadable_cols,
)
from .rng import STREAM_GUMBEL, gumbel_log2e, open_uniform, philox4

_LOG2E = constexpr(1.4426950408889634)
_LN2 = constexpr(0.6931471805599453)
_NO_COLUMN = constexpr(2147483647)
# Quarter length is rounded to 16 columns so that, with a padded row stride, every sub-tile starts
# 16-element aligned and its loads can be vectorised.
_QUARTER_ALIGN = 16
# Uniforms are clamped away from 0 so the torch backend's noise stays finite.
_TINY = 1.0e-20
# The torch backend draws its noise in row chunks of at most this many elements (16 MiB of fp32):
# the ids-only path never holds more than one chunk, and both paths consume the generator alike.
NOISE_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- Triton kernels


@jit
def _pick(q: tl.constexpr, r0, r1, r2, r3):
    if q == 0:
        return r0
    elif q == 1:
        return r1
    elif q == 2:
        return r2
    else:
        return r3


@jit
def _in_quarter(idx, q: tl.constexpr, QUARTER, limit):
    """Mask of sub-tile q: its columns q * QUARTER + idx below ``limit`` (V; LOAD_N for loads and
    stores) and inside quarter q (a quarter's last block may overhang it)."""
    return idx < tl.minimum(QUARTER, limit - q * QUARTER)


@jit
def _perturbed_tile(x_row, noise_row, idx, q: tl.constexpr, bits, QUARTER, V, LOAD_N, x_scale, inv_tau,
                    HAS_NOISE: tl.constexpr, PADDED: tl.constexpr, FAST_MATH: tl.constexpr):
    """w2 = (x + G) / tau * log2(e) on sub-tile q, -inf outside the row. The load is masked at
    LOAD_N (the padded row stride when there is one, whose divisibility keeps it vectorisable);
    the padding is dropped in registers."""
    cols = idx + q * QUARTER
    x = tl.load(x_row + cols, mask=_in_quarter(idx, q, QUARTER, LOAD_N), other=float("-inf")).to(tl.float32)
    if PADDED:
        x = tl.where(_in_quarter(idx, q, QUARTER, V), x, float("-inf"))
    if HAS_NOISE:  # test hook: explicit noise so the kernel can be compared with the reference
        g = tl.load(noise_row + cols, mask=_in_quarter(idx, q, QUARTER, V), other=0.0).to(tl.float32) * _LOG2E
    else:
        g = gumbel_log2e(open_uniform(bits), FAST_MATH)
    return x * x_scale + g * inv_tau


@jit
def _perturbed_quad(x_row, noise_row, seed, row, idx, QUARTER, V, LOAD_N, x_scale, inv_tau,
                    HAS_NOISE: tl.constexpr, PADDED: tl.constexpr, FAST_MATH: tl.constexpr):
    """The four sub-tiles of one block: w2 at columns q * QUARTER + idx, q = 0..3."""
    if HAS_NOISE:
        r0, r1, r2, r3 = idx, idx, idx, idx  # unused
    else:
        r0, r1, r2, r3 = philox4(seed, idx, row, STREAM_GUMBEL)
    w0 = _perturbed_tile(x_row, noise_row, idx, 0, r0, QUARTER, V, LOAD_N, x_scale, inv_tau, HAS_NOISE, PADDED,
                         FAST_MATH)
    w1 = _perturbed_tile(x_row, noise_row, idx, 1, r1, QUARTER, V, LOAD_N, x_scale, inv_tau, HAS_NOISE, PADDED,
                         FAST_MATH)
    w2 = _perturbed_tile(x_row, noise_row, idx, 2, r2, QUARTER, V, LOAD_N, x_scale, inv_tau, HAS_NOISE, PADDED,
                         FAST_MATH)
    w3 = _perturbed_tile(x_row, noise_row, idx, 3, r3, QUARTER, V, LOAD_N, x_scale, inv_tau, HAS_NOISE, PADDED,
                         FAST_MATH)
    return w0, w1, w2, w3


@jit
def _store_quarter(row_ptr, idx, q: tl.constexpr, value, QUARTER, LOAD_N):
    mask = _in_quarter(idx, q, QUARTER, LOAD_N)
    tl.store(row_ptr + idx + q * QUARTER, value.to(row_ptr.dtype.element_ty), mask=mask)


@jit
def _first_max(w0, w1, w2, w3, idx, QUARTER):
    """Elementwise max over the four sub-tiles and the column it came from; on ties the lower
    column (the sub-tiles' columns increase with q), like torch.argmax."""
    c0 = idx
    c1 = idx + QUARTER
    c2 = c1 + QUARTER
    c3 = c2 + QUARTER
    wa = tl.maximum(w0, w1)
    ca = tl.where(w1 > w0, c1, c0)
    wb = tl.maximum(w2, w3)
    cb = tl.where(w3 > w2, c3, c2)
    return tl.maximum(wa, wb), tl.where(wb > wa, cb, ca)


@jit(do_not_specialize=["seed"])
def _gumbel_fwd_kernel(
    X, stride_x, NOISE, stride_noise, Y, stride_y, IDS, ROW_MAX, ROW_LOGD,
    seed, V, LOAD_N, QUARTER, inv_tau,
    HAS_NOISE: tl.constexpr, HARD: tl.constexpr, PADDED: tl.constexpr, FAST_MATH: tl.constexpr,
    TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    noise_row = NOISE + row * stride_noise
    y_row = Y + row * stride_y
    x_scale = inv_tau * _LOG2E
    # One online pass: running max/argmax and rescaled sum of exp2 of w2.
    # Start from a finite max so exp2(m_old - m_new) is defined even for an all -inf block.
    m = -1.0e30
    d = 0.0
    best = tl.zeros((), dtype=tl.int32)
    for start in range(0, QUARTER, TILE):
        idx = start + tl.arange(0, TILE)
        w0, w1, w2, w3 = _perturbed_quad(
            x_row, noise_row, seed, row, idx, QUARTER, V, LOAD_N, x_scale, inv_tau, HAS_NOISE, PADDED, FAST_MATH)
        w_max, w_col = _first_max(w0, w1, w2, w3, idx, QUARTER)
        blk_max = tl.max(w_max, 0)
        blk_col = tl.min(tl.where(w_max == blk_max, w_col, _NO_COLUMN), 0)
        # Blocks do not visit columns in order, so ties across blocks also go to the lower column.
        better = (blk_max > m) | ((blk_max == m) & (blk_col < best))
        best = tl.where(better, blk_col, best)
        m_new = tl.maximum(m, blk_max)
        e = tl.exp2(w0 - m_new) + tl.exp2(w1 - m_new) + tl.exp2(w2 - m_new) + tl.exp2(w3 - m_new)
        d = d * tl.exp2(m - m_new) + tl.sum(e, 0)
        m = m_new
        if HARD:  # the one-hot's zeros, written while the row streams by
            zeros = tl.zeros_like(w0)
            _store_quarter(y_row, idx, 0, zeros, QUARTER, LOAD_N)
            _store_quarter(y_row, idx, 1, zeros, QUARTER, LOAD_N)
            _store_quarter(y_row, idx, 2, zeros, QUARTER, LOAD_N)
            _store_quarter(y_row, idx, 3, zeros, QUARTER, LOAD_N)
    log_d = tl.log2(d)
    tl.store(IDS + row, best.to(tl.int64))
    # max and log(d) stay separate: their fp32 sum rounds at ~1e-3 once |w| ~ 1e4.
    tl.store(ROW_MAX + row, m)
    tl.store(ROW_LOGD + row, log_d)
    if HARD:
        tl.debug_barrier()  # every thread's zeros are written before the 1 lands on one of them
        tl.store(y_row + best, tl.full((), 1.0, tl.float32).to(Y.dtype.element_ty))
    else:
        for start in range(0, QUARTER, TILE):
            idx = start + tl.arange(0, TILE)
            w0, w1, w2, w3 = _perturbed_quad(
                x_row, noise_row, seed, row, idx, QUARTER, V, LOAD_N, x_scale, inv_tau, HAS_NOISE, PADDED,
                FAST_MATH)
            _store_quarter(y_row, idx, 0, tl.exp2((w0 - m) - log_d), QUARTER, LOAD_N)
            _store_quarter(y_row, idx, 1, tl.exp2((w1 - m) - log_d), QUARTER, LOAD_N)
            _store_quarter(y_row, idx, 2, tl.exp2((w2 - m) - log_d), QUARTER, LOAD_N)
            _store_quarter(y_row, idx, 3, tl.exp2((w3 - m) - log_d), QUARTER, LOAD_N)


@jit
def _grad_tile(dy_row, idx, q: tl.constexpr, w, m, log_d, QUARTER, V, LOAD_N, PADDED: tl.constexpr):
    """(s, g) on sub-tile q: s rebuilt from w2 and the saved row stats, g = dL/dy (0 off the row)."""
    cols = idx + q * QUARTER
    g = tl.load(dy_row + cols, mask=_in_quarter(idx, q, QUARTER, LOAD_N), other=0.0).to(tl.float32)
    if PADDED:
        g = tl.where(_in_quarter(idx, q, QUARTER, V), g, 0.0)
    return tl.exp2((w - m) - log_d), g


@jit(do_not_specialize=["seed"])
def _gumbel_bwd_kernel(
    X, stride_x, NOISE, stride_noise, DY, stride_dy, DX, stride_dx, ROW_MAX, ROW_LOGD,
    seed, V, LOAD_N, QUARTER, inv_tau,
    HAS_NOISE: tl.constexpr, PADDED: tl.constexpr, FAST_MATH: tl.constexpr, TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    noise_row = NOISE + row * stride_noise
    dy_row = DY + row * stride_dy
    dx_row = DX + row * stride_dx
    x_scale = inv_tau * _LOG2E
    m = tl.load(ROW_MAX + row)
    log_d = tl.load(ROW_LOGD + row)
    # Pass 1: <g, s>. Pass 2: dx = s * (g - <g, s>) / tau (see the module docstring for why no
    # softmax(x) term). Each pass regenerates the noise, once per element (~30 SASS instructions:
    # a quarter of a Philox call, two logs); keeping G from the forward instead would move 8 more
    # bytes per element (an fp32 write there, a read here), worth ~80 issue slots on an H100.
    dot = 0.0
    for start in range(0, QUARTER, TILE):
        idx = start + tl.arange(0, TILE)
        w0, w1, w2, w3 = _perturbed_quad(
            x_row, noise_row, seed, row, idx, QUARTER, V, LOAD_N, x_scale, inv_tau, HAS_NOISE, PADDED, FAST_MATH)
        s0, g0 = _grad_tile(dy_row, idx, 0, w0, m, log_d, QUARTER, V, LOAD_N, PADDED)
        s1, g1 = _grad_tile(dy_row, idx, 1, w1, m, log_d, QUARTER, V, LOAD_N, PADDED)
        s2, g2 = _grad_tile(dy_row, idx, 2, w2, m, log_d, QUARTER, V, LOAD_N, PADDED)
        s3, g3 = _grad_tile(dy_row, idx, 3, w3, m, log_d, QUARTER, V, LOAD_N, PADDED)
        dot += tl.sum(s0 * g0 + s1 * g1 + s2 * g2 + s3 * g3, 0)
    for start in range(0, QUARTER, TILE):
        idx = start + tl.arange(0, TILE)
        w0, w1, w2, w3 = _perturbed_quad(
            x_row, noise_row, seed, row, idx, QUARTER, V, LOAD_N, x_scale, inv_tau, HAS_NOISE, PADDED, FAST_MATH)
        s0, g0 = _grad_tile(dy_row, idx, 0, w0, m, log_d, QUARTER, V, LOAD_N, PADDED)
        _store_quarter(dx_row, idx, 0, s0 * (g0 - dot) * inv_tau, QUARTER, LOAD_N)
        s1, g1 = _grad_tile(dy_row, idx, 1, w1, m, log_d, QUARTER, V, LOAD_N, PADDED)
        _store_quarter(dx_row, idx, 1, s1 * (g1 - dot) * inv_tau, QUARTER, LOAD_N)
        s2, g2 = _grad_tile(dy_row, idx, 2, w2, m, log_d, QUARTER, V, LOAD_N, PADDED)
        _store_quarter(dx_row, idx, 2, s2 * (g2 - dot) * inv_tau, QUARTER, LOAD_N)
        s3, g3 = _grad_tile(dy_row, idx, 3, w3, m, log_d, QUARTER, V, LOAD_N, PADDED)
        _store_quarter(dx_row, idx, 3, s3 * (g3 - dot) * inv_tau, QUARTER, LOAD_N)


# --------------------------------------------------------------------------- host side


def _layout(n_cols: int) -> dict:
    """QUARTER (the noise layout), TILE (sub-tile width: a block is 4 sub-tiles) and num_warps."""
    quarter = -(-max(-(-n_cols // 4), 1) // _QUARTER_ALIGN) * _QUARTER_ALIGN
    config = launch_config(4 * quarter)
    return {"QUARTER": quarter, "TILE": max(config["BLOCK"] // 4, 1), "num_warps": config["num_warps"]}


def _normalize_seed(seed) -> int:
    # Kept in [0, 2**31): one kernel signature (no i32/i64 respecialisation) and a valid
    # torch.Generator seed.
    return int(seed) & 0x7FFFFFFF


def _draw_seed() -> int:
    # From torch's default generator, so torch.manual_seed makes seed=None reproducible.
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _row_args(x, noise):
    """Loadable columns for the tensors a launch reads row by row, and whether rows are padded."""
    load_n = common_loadable_cols(x, *([] if noise is None else [noise]))
    return load_n, load_n > x.shape[1]


def _gumbel_forward_triton(x: torch.Tensor, tau: float, hard: bool, seed: int, noise):
    n_rows, n_cols = x.shape
    ids = torch.empty(n_rows, dtype=torch.int64, device=x.device)
    row_max, row_logd = aligned_row_vectors(2, n_rows, x.device)  # base-2 row max, log2 sum-exp offset
    y = empty_rows_like(x)  # the kernel writes every element (the one-hot's zeros too)
    if n_rows:
        load_n, padded = _row_args(x, noise)
        layout = _layout(n_cols)
        noise_arg = x if noise is None else noise  # dummy pointer when the RNG is used
        launch(
            _gumbel_fwd_kernel, (n_rows,),
            x, x.stride(0), noise_arg, noise_arg.stride(0), y, y.stride(0), ids, row_max, row_logd,
            seed, n_cols, load_n, layout["QUARTER"], 1.0 / tau,
            HAS_NOISE=noise is not None, HARD=hard, PADDED=padded, FAST_MATH=not is_interpreted(_gumbel_fwd_kernel),
            TILE=layout["TILE"], num_warps=layout["num_warps"],
        )
    return ids, y, (row_max, row_logd)


def _gumbel_backward_triton(x, noise, stats, grad_y, tau: float, seed: int):
    dx = empty_rows_like(x)
    n_rows, n_cols = x.shape
    if n_rows:
        load_n = min(_row_args(x, noise)[0], loadable_cols(grad_y))
        layout = _layout(n_cols)
        noise_arg = x if noise is None else noise
        launch(
            _gumbel_bwd_kernel, (n_rows,),
            x, x.stride(0), noise_arg, noise_arg.stride(0), grad_y, grad_y.stride(0), dx, dx.stride(0), *stats,
            seed, n_cols, load_n, layout["QUARTER"], 1.0 / tau,
            HAS_NOISE=noise is not None, PADDED=load_n > n_cols, FAST_MATH=not is_interpreted(_gumbel_bwd_kernel),
            TILE=layout["TILE"], num_warps=layout["num_warps"],
        )
    return dx


class GumbelSoftmaxFunction(torch.autograd.Function):
    """Triton Gumbel-softmax: forward (ids, y); backward regenerates the noise."""

    @staticmethod
    def forward(ctx, logits, tau, hard, seed, noise):
        x = as_rows(logits)
        noise_rows = None if noise is None else as_rows(noise.to(torch.float32))
        ids, y, stats = _gumbel_forward_triton(x, tau, hard, seed, noise_rows)
        ctx.save_for_backward(x, noise_rows, *stats)
        ctx.tau, ctx.seed, ctx.shape = tau, seed, logits.shape
        ctx.mark_non_differentiable(ids)
        return ids.view(logits.shape[:-1]), y.view(logits.shape)

    @staticmethod
    def backward(ctx, _grad_ids, grad_y):
        x, noise_rows, *stats = ctx.saved_tensors
        dx = _gumbel_backward_triton(x, noise_rows, stats, as_rows(grad_y), ctx.tau, ctx.seed)
        return dx.view(ctx.shape), None, None, None, None


def _gumbel_softmax_triton(logits, tau=1.0, hard=True, seed=0, noise=None):
    """Triton path; ``noise`` (same shape as logits) replaces the in-kernel RNG (tests)."""
    return GumbelSoftmaxFunction.apply(logits, float(tau), bool(hard), _normalize_seed(seed), noise)


# --------------------------------------------------------------------------- torch reference


def _torch_generator(seed, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_normalize_seed(seed))


def _fill_gumbel_(out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """out <- G = -log(-log(U)) drawn from gen, in place."""
    torch.rand(out.shape, generator=gen, dtype=torch.float32, device=out.device, out=out)
    return out.clamp_min_(_TINY).log_().neg_().log_().neg_()


def _noise_chunk_rows(n_cols: int) -> int:
    return max(1, NOISE_CHUNK_ELEMENTS // max(n_cols, 1))


def _torch_gumbel_noise_chunks(n_rows: int, n_cols: int, seed, device):
    """(first row, G [rows, n_cols]) chunk after chunk: the torch backend's noise for an
    [n_rows, n_cols] problem, drawn row chunk by row chunk from one generator on ``device``.
    Every chunk reuses one buffer: copy a chunk to keep it."""
    device = torch.device(device)
    gen = _torch_generator(seed, device)
    chunk = _noise_chunk_rows(n_cols)
    buffer = torch.empty(min(chunk, n_rows), n_cols, dtype=torch.float32, device=device)
    for first in range(0, n_rows, chunk):
        rows = min(chunk, n_rows - first)
        yield first, _fill_gumbel_(buffer[:rows], gen)


def _torch_gumbel_noise(shape, seed, device) -> torch.Tensor:
    """The torch backend's noise for logits of ``shape``: G = -log(-log(U)), U from a
    torch.Generator on ``device`` seeded with ``seed``, drawn in row chunks (deterministic per seed,
    device type and shape)."""
    device = torch.device(device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    rows = out.view(-1, shape[-1])
    gen = _torch_generator(seed, device)
    chunk = _noise_chunk_rows(rows.shape[1])
    for first in range(0, rows.shape[0], chunk):
        _fill_gumbel_(rows[first:first + chunk], gen)
    return out


def _gumbel_softmax_with_noise(logits, gumbel_noise, tau=1.0, hard=True):
    """Reference semantics, written as the textbook formula (fp32 math, output in logits' dtype)."""
    z = torch.log_softmax(logits.float(), dim=-1) + gumbel_noise.float()
    soft = torch.softmax(z / tau, dim=-1)
    ids = z.argmax(dim=-1)
    if hard:
        one_hot = torch.zeros_like(soft).scatter_(-1, ids.unsqueeze(-1), 1.0)
        # one_hot + (s - s.detach()) is exactly one_hot in value (s - s == 0) with s's gradient;
        # the usual one_hot - s.detach() + s can round the 1 away from 1.
        y = one_hot + (soft - soft.detach())
    else:
        y = soft
    return ids, y.to(logits.dtype)


# --------------------------------------------------------------------------- public API


def check_logits(logits, tau) -> None:
    if not torch.is_floating_point(logits) or logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be a floating tensor [..., V] with V >= 1, got {tuple(logits.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def gumbel_softmax_sample(logits, tau=1.0, hard=True, seed=None, backend="auto"):
    """Sample ids ~ softmax(logits) per row with the Gumbel-max trick.

    Args:
        logits: [M, V] (or [..., V]) floating tensor.
        tau: temperature of the relaxed sample s = softmax((log_softmax(logits) + G) / tau).
        hard: True -> y is one_hot(ids) exactly, with s's gradient (straight-through);
            False -> y = s.
        seed: RNG seed (reduced to [0, 2**31)); None draws one from torch's default generator.
            The same seed gives the same sample on the same device and backend.
        backend: "auto" | "triton" | "torch" (see matekd_ds.kernels.dispatch).

    Returns:
        (ids, y): ids int64 [M], y [M, V] in logits' dtype.
    """
    check_logits(logits, tau)
    seed = _draw_seed() if seed is None else _normalize_seed(seed)
    if resolve_backend(backend, logits) == "triton":
        return _gumbel_softmax_triton(logits, tau, hard, seed)
    noise = _torch_gumbel_noise(logits.shape, seed, logits.device)
    return _gumbel_softmax_with_noise(logits, noise, tau, hard)
