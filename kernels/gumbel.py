"""Fused Gumbel-softmax sampling: ids ~ softmax(logits), plus a (straight-through) sample.

MATE-KD's generator turns masked-LM logits [M, V] into token ids with the Gumbel trick and
keeps a differentiable relaxation for the backward pass. Done eagerly that needs an M x V
uniform tensor, the noise, log_softmax, softmax and a one-hot: ~6 passes over M x V floats.
The Triton path instead draws the noise inside the kernel from a counter-based RNG (Philox,
keyed by ``seed`` with counter ``row * V + col``), so nothing M x V is stored besides the
output, and the backward regenerates the same noise from (seed, counter) instead of keeping it.

Math (z = log_softmax(x) + G, s = softmax(z / tau)):
  * ids = argmax(z) = argmax(x + G): log_softmax only shifts a row by a constant.
  * s = softmax((x + G) / tau) for the same reason, so the kernel never needs lse(x).
  * dL/dz = s * (g - <g, s>) / tau. log_softmax's Jacobian maps that to
    dL/dz - softmax(x) * sum(dL/dz), and sum(dL/dz) = 0, hence dL/dx = dL/dz
    (checked against torch autograd in tests/test_kernels_gumbel.py).
  * hard=True returns one_hot(ids) exactly with the gradient of s (straight-through).
"""

from __future__ import annotations

import torch

from .dispatch import ensure_launchable, jit, next_power_of_2, resolve_backend, tl

# Larger blocks mean fewer loop trips (and far fewer interpreter steps on CPU); 4096 fp32
# values per program keeps registers reasonable with 8 warps on GPU.
_MAX_BLOCK = 4096
# Uniforms are clamped away from 0 so the noise stays finite; u == 0 has probability 2**-31.
_TINY = 1.0e-20


# --------------------------------------------------------------------------- Triton kernels


@jit
def _gumbel_noise(seed, offsets):
    u = tl.maximum(tl.rand(seed, offsets), 1.0e-20)
    return -tl.log(-tl.log(u))


@jit
def _perturbed_block(x_row, noise_row, seed, row_start, cols, mask, inv_tau, HAS_NOISE: tl.constexpr):
    """(x + G) / tau for one block of a row, -inf on the masked tail."""
    x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_NOISE:  # test hook: explicit noise so the kernel can be compared with the reference
        g = tl.load(noise_row + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        g = _gumbel_noise(seed, row_start + cols)
    return tl.where(mask, (x + g) * inv_tau, float("-inf"))


@jit(do_not_specialize=["seed"])
def _gumbel_fwd_kernel(
    X, stride_x, NOISE, stride_noise, Y, stride_y, IDS, ROW_MAX, ROW_LOGD,
    seed, V, inv_tau,
    HAS_NOISE: tl.constexpr, WRITE_SOFT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    noise_row = NOISE + row * stride_noise
    row_start = row * V  # RNG counter of this row's first element
    # One online pass: running max/argmax and rescaled sum-exp of w = (x + G) / tau.
    # Start from a finite max so exp(m_old - m_new) is defined even for an all -inf block.
    m = -1.0e30
    d = 0.0
    best = 0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        w = _perturbed_block(x_row, noise_row, seed, row_start, cols, mask, inv_tau, HAS_NOISE)
        blk_max = tl.max(w, 0)
        # Strict '>' across blocks + tie_break_left inside one: first maximal index, like torch.argmax.
        best = tl.where(blk_max > m, start + tl.argmax(w, 0, tie_break_left=True), best)
        m_new = tl.maximum(m, blk_max)
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(w - m_new), 0)
        m = m_new
    log_d = tl.log(d)
    tl.store(IDS + row, best.to(tl.int64))
    # max and log(d) stay separate: their fp32 sum rounds at ~1e-3 once |w| ~ 1e4.
    tl.store(ROW_MAX + row, m)
    tl.store(ROW_LOGD + row, log_d)
    if WRITE_SOFT:  # hard=True needs no soft values in forward: the host writes the one-hot
        y_row = Y + row * stride_y
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            w = _perturbed_block(x_row, noise_row, seed, row_start, cols, mask, inv_tau, HAS_NOISE)
            tl.store(y_row + cols, tl.exp((w - m) - log_d).to(Y.dtype.element_ty), mask=mask)


@jit(do_not_specialize=["seed"])
def _gumbel_bwd_kernel(
    X, stride_x, NOISE, stride_noise, DY, stride_dy, DX, stride_dx, ROW_MAX, ROW_LOGD,
    seed, V, inv_tau,
    HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    noise_row = NOISE + row * stride_noise
    dy_row = DY + row * stride_dy
    dx_row = DX + row * stride_dx
    row_start = row * V
    m = tl.load(ROW_MAX + row)
    log_d = tl.load(ROW_LOGD + row)
    # Pass 1: <g, s>, with s rebuilt from the regenerated noise and the saved row stats.
    dot = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        w = _perturbed_block(x_row, noise_row, seed, row_start, cols, mask, inv_tau, HAS_NOISE)
        s = tl.exp((w - m) - log_d)
        g = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(s * g, 0)
    # Pass 2: dx = s * (g - <g, s>) / tau (see module docstring for why no softmax(x) term).
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        w = _perturbed_block(x_row, noise_row, seed, row_start, cols, mask, inv_tau, HAS_NOISE)
        s = tl.exp((w - m) - log_d)
        g = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_row + cols, (s * (g - dot) * inv_tau).to(DX.dtype.element_ty), mask=mask)


@jit(do_not_specialize=["seed"])
def _gumbel_noise_kernel(OUT, stride_out, seed, V, BLOCK: tl.constexpr):
    """Materialise the in-kernel noise (tests only: feeds the torch reference the same G)."""
    row = tl.program_id(0).to(tl.int64)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        tl.store(OUT + row * stride_out + cols, _gumbel_noise(seed, row * V + cols), mask=mask)


# --------------------------------------------------------------------------- host side


def _launch_config(n_cols: int) -> dict:
    block = min(next_power_of_2(n_cols), _MAX_BLOCK)
    return {"BLOCK": block, "num_warps": 4 if block <= 1024 else 8}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., V] -> contiguous [M, V] (kernels assume unit stride along V)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _normalize_seed(seed) -> int:
    # Kept in [0, 2**31): one kernel signature (no i32/i64 respecialisation) and a valid
    # torch.Generator seed.
    return int(seed) & 0x7FFFFFFF


def _draw_seed() -> int:
    # From torch's default generator, so torch.manual_seed makes seed=None reproducible.
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _gumbel_forward_triton(x: torch.Tensor, tau: float, hard: bool, seed: int, noise):
    ensure_launchable(_gumbel_fwd_kernel, x)
    n_rows, n_cols = x.shape
    ids = torch.empty(n_rows, dtype=torch.int64, device=x.device)
    stats = torch.empty(2, n_rows, dtype=torch.float32, device=x.device)  # row max, log-sum-exp offset
    y = torch.zeros_like(x) if hard else torch.empty_like(x)
    if n_rows:
        noise_arg = x if noise is None else noise  # dummy pointer when the RNG is used
        _gumbel_fwd_kernel[(n_rows,)](
            x, x.stride(0), noise_arg, noise_arg.stride(0), y, y.stride(0), ids, stats[0], stats[1],
            seed, n_cols, 1.0 / tau,
            HAS_NOISE=noise is not None, WRITE_SOFT=not hard, **_launch_config(n_cols),
        )
    if hard:
        y.scatter_(1, ids.unsqueeze(1), 1)
    return ids, y, stats


def _gumbel_backward_triton(x, noise, stats, grad_y, tau: float, seed: int):
    grad_y = grad_y.contiguous()
    dx = torch.empty_like(x)
    n_rows, n_cols = x.shape
    if n_rows:
        noise_arg = x if noise is None else noise
        _gumbel_bwd_kernel[(n_rows,)](
            x, x.stride(0), noise_arg, noise_arg.stride(0), grad_y, grad_y.stride(0), dx, dx.stride(0),
            stats[0], stats[1],
            seed, n_cols, 1.0 / tau,
            HAS_NOISE=noise is not None, **_launch_config(n_cols),
        )
    return dx


class GumbelSoftmaxFunction(torch.autograd.Function):
    """Triton Gumbel-softmax: forward (ids, y); backward regenerates the noise."""

    @staticmethod
    def forward(ctx, logits, tau, hard, seed, noise):
        x = _rows(logits)
        noise_rows = None if noise is None else _rows(noise.to(torch.float32))
        ids, y, stats = _gumbel_forward_triton(x, tau, hard, seed, noise_rows)
        ctx.save_for_backward(x, stats, noise_rows)
        ctx.tau, ctx.seed, ctx.shape = tau, seed, logits.shape
        ctx.mark_non_differentiable(ids)
        return ids.view(logits.shape[:-1]), y.view(logits.shape)

    @staticmethod
    def backward(ctx, _grad_ids, grad_y):
        x, stats, noise_rows = ctx.saved_tensors
        dx = _gumbel_backward_triton(x, noise_rows, stats, _rows(grad_y), ctx.tau, ctx.seed)
        return dx.view(ctx.shape), None, None, None, None


def _gumbel_softmax_triton(logits, tau=1.0, hard=True, seed=0, noise=None):
    """Triton path; ``noise`` (same shape as logits) replaces the in-kernel RNG (tests)."""
    return GumbelSoftmaxFunction.apply(logits, float(tau), bool(hard), _normalize_seed(seed), noise)


def _triton_gumbel_noise(shape, seed, device) -> torch.Tensor:
    """The exact fp32 noise the Triton kernels draw for ``seed`` (tests only)."""
    out = torch.empty(shape, dtype=torch.float32, device=device)
    rows = out.view(-1, shape[-1])
    ensure_launchable(_gumbel_noise_kernel, out)
    if rows.shape[0]:
        block = _launch_config(shape[-1])["BLOCK"]
        _gumbel_noise_kernel[(rows.shape[0],)](rows, rows.stride(0), _normalize_seed(seed), shape[-1], BLOCK=block)
    return out


# --------------------------------------------------------------------------- torch reference


def _torch_gumbel_noise(shape, seed, device) -> torch.Tensor:
    """G = -log(-log(U)) from a CPU torch.Generator: deterministic per seed on every device."""
    gen = torch.Generator(device="cpu").manual_seed(_normalize_seed(seed))
    u = torch.rand(shape, generator=gen, dtype=torch.float32).clamp_min_(_TINY)
    return (-(-u.log_()).log_()).to(device)


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
    if not torch.is_floating_point(logits) or logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be a floating tensor [..., V] with V >= 1, got {tuple(logits.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    seed = _draw_seed() if seed is None else _normalize_seed(seed)
    if resolve_backend(backend, logits) == "triton":
        return _gumbel_softmax_triton(logits, tau, hard, seed)
    noise = _torch_gumbel_noise(logits.shape, seed, logits.device)
    return _gumbel_softmax_with_noise(logits, noise, tau, hard)
