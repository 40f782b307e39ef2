"""Fused distillation losses over logits: soft cross-entropy and KL(p_t || p_s).

With s' = s / T, t' = t / T, p = softmax(.) per row:
  soft CE_row = -sum p_t log p_s
  KL_row      =  sum p_t (log p_t - log p_s)          (0 * log 0 := 0)

Forward is one online pass over each row (one program per row, BLOCK loop over C) that keeps
the running max / rescaled sum-exp of both rows and two cross sums taken relative to the
running maxima, which keeps the loss free of the lse(s) - E[s] cancellation for huge logits:
  xs = sum e_t (s' - m_s),  xt = sum e_t (t' - m_t),  e_t = exp(t' - m_t),  d_* = sum exp(*' - m_*)
  => sum p_t log p_s = xs / d_t - log d_s,   sum p_t log p_t = xt / d_t - log d_t.
Only the row loss and each row's max and log-sum-exp offset ([N] floats each) are saved;
backward recomputes the probabilities from them. max and log(d) are kept apart because their fp32
sum rounds at ~1e-3 for |logits| ~ 1e4, which would put that error on every probability.
  d/ds = (p_s - p_t) / T                                    (both losses)
  d/dt = -(1/T) p_t (log p_s + CE_row)                      (soft CE)
  d/dt =  (1/T) p_t ((log p_t - log p_s) - KL_row)          (KL)
Both inputs get gradients when they require them: in MATE-KD's generator step the teacher's
logits carry gradient back to the generator too.

Rows of at most SMALL_C_MAX classes (GLUE's 2 or 3) take the small-C kernels instead: one thread
per row, 128 rows per program, nothing saved (the backward recomputes the row from the inputs).
"""

from __future__ import annotations

import torch

from .dispatch import constexpr, is_interpreted, jit, resolve_backend, tl
from .launch import aligned_row_vectors, as_rows, common_loadable_cols, empty_rows_like, launch, launch_config
from .rng import fast_log2

_CE, _KL = 0, 1
_LOG2E = constexpr(1.4426950408889634)
_LN2 = constexpr(0.6931471805599453)
# Rows of at most this many classes go to the small-C kernels: one thread per row, _SMALL_ROWS rows
# per program, instead of one program of warps per 2-4 element row.
SMALL_C_MAX = 8
_SMALL_ROWS = 128


# --------------------------------------------------------------------------- Triton kernels
# Everything runs in base 2 (a = s' * log2(e), exp2/log2: one MUFU instruction each on GPU); the
# loss and the log-probabilities are scaled back by ln 2 where they leave base 2.


@jit
def _scaled_block(ptr, cols, C, LOAD_N, scale, PADDED: tl.constexpr):
    """x * scale at cols, -inf outside [0, C). Loads are masked at LOAD_N (see launch.py)."""
    x = tl.load(ptr + cols, mask=cols < LOAD_N, other=float("-inf")).to(tl.float32) * scale
    if PADDED:
        x = tl.where(cols < C, x, float("-inf"))
    return x


@jit(do_not_specialize=["is_kl"])
def _divergence_fwd_kernel(
    STU, stride_s, TEA, stride_t, LOSS, M_S, LOGD_S, M_T, LOGD_T,
    C, LOAD_N, inv_temp, is_kl,
    PADDED: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = STU + row * stride_s
    t_row = TEA + row * stride_t
    scale = inv_temp * _LOG2E
    # Finite start for the maxima: exp2(m_old - m_new) stays defined when a block is all -inf.
    m_s = -1.0e30
    m_t = -1.0e30
    d_s = 0.0
    d_t = 0.0
    xs = 0.0
    xt = 0.0
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        s = _scaled_block(s_row, cols, C, LOAD_N, scale, PADDED)
        t = _scaled_block(t_row, cols, C, LOAD_N, scale, PADDED)
        m_s_new = tl.maximum(m_s, tl.max(s, 0))
        m_t_new = tl.maximum(m_t, tl.max(t, 0))
        a_t = tl.exp2(m_t - m_t_new)
        e_t = tl.exp2(t - m_t_new)
        # p_t == 0 entries (masked tail, -inf or underflowing teacher logits) contribute 0,
        # not 0 * -inf, when the student is masked there too.
        t_live = e_t > 0.0
        # Re-reference the old cross sums to the new maxima, then rescale them like d_t.
        xs = (xs - (m_s_new - m_s) * d_t) * a_t + tl.sum(e_t * tl.where(t_live, s - m_s_new, 0.0), 0)
        if is_kl:
            xt = (xt - (m_t_new - m_t) * d_t) * a_t + tl.sum(e_t * tl.where(t_live, t - m_t_new, 0.0), 0)
        d_t = d_t * a_t + tl.sum(e_t, 0)
        d_s = d_s * tl.exp2(m_s - m_s_new) + tl.sum(tl.exp2(s - m_s_new), 0)
        m_s = m_s_new
        m_t = m_t_new
    log_d_s = tl.log2(d_s)
    log_d_t = tl.log2(d_t)
    if is_kl:
        loss = ((xt - xs) / d_t + log_d_s - log_d_t) * _LN2
    else:
        loss = (log_d_s - xs / d_t) * _LN2
    tl.store(LOSS + row, loss)
    tl.store(M_S + row, m_s)
    tl.store(LOGD_S + row, log_d_s)
    tl.store(M_T + row, m_t)
    tl.store(LOGD_T + row, log_d_t)


@jit
def _teacher_grad(log_p_s, log_p_t, p_t, g, loss, is_kl):
    """dL/dt from base-2 log-probabilities, p_t, g = upstream gradient / T and the row loss."""
    # Zero the log-probs where p_t == 0 (masked tail, -inf teacher or student entries) so the
    # p_t * (...) product is 0 * finite, never 0 * -inf or -inf - -inf.
    live = p_t > 0.0
    log_p_s = tl.where(live, log_p_s, 0.0)
    if is_kl:
        inner = (tl.where(live, log_p_t, 0.0) - log_p_s) * _LN2 - loss
    else:
        inner = -(log_p_s * _LN2 + loss)
    return g * p_t * inner


# The loss kind and which inputs need a gradient are runtime flags, not constexprs: the branches are
# uniform across the launch and cost nothing per element, and one compiled variant serves all six
# combinations (fewer JIT compiles at start-up, a smaller ahead-of-time build).
@jit(do_not_specialize=["is_kl", "need_ds", "need_dt"])
def _divergence_bwd_kernel(
    STU, stride_s, TEA, stride_t, DS, stride_ds, DT, stride_dt,
    GRAD, LOSS, M_S, LOGD_S, M_T, LOGD_T,
    C, LOAD_N, inv_temp, is_kl, need_ds, need_dt,
    PADDED: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = STU + row * stride_s
    t_row = TEA + row * stride_t
    scale = inv_temp * _LOG2E
    g = tl.load(GRAD + row).to(tl.float32) * inv_temp  # chain rule through s' = s / T
    loss = tl.load(LOSS + row)
    m_s = tl.load(M_S + row)
    log_d_s = tl.load(LOGD_S + row)
    m_t = tl.load(M_T + row)
    log_d_t = tl.load(LOGD_T + row)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < LOAD_N
        log_p_s = (_scaled_block(s_row, cols, C, LOAD_N, scale, PADDED) - m_s) - log_d_s
        log_p_t = (_scaled_block(t_row, cols, C, LOAD_N, scale, PADDED) - m_t) - log_d_t
        p_t = tl.exp2(log_p_t)
        if need_ds:
            ds = g * (tl.exp2(log_p_s) - p_t)
            tl.store(DS + row * stride_ds + cols, ds.to(DS.dtype.element_ty), mask=mask)
        if need_dt:
            dt = _teacher_grad(log_p_s, log_p_t, p_t, g, loss, is_kl)
            tl.store(DT + row * stride_dt + cols, dt.to(DT.dtype.element_ty), mask=mask)


# Small C (GLUE's 2 or 3 classes): one thread per row, the C columns as C vectors of rows, so every
# per-row reduction stays in the thread's registers (no shuffles, no per-row work repeated across
# lanes). C is a constexpr (the columns are unrolled); the row statistics are recomputed in the
# backward instead of being saved.


@jit
def _small_column(PTR, rows, stride, c: tl.constexpr, live, scale):
    # Rows past N read 0: finite, never stored.
    return tl.load(PTR + rows * stride + c, mask=live, other=0.0).to(tl.float32) * scale


@jit
def _small_row_stats(STU, stride_s, TEA, stride_t, rows, live, scale, FAST_MATH: tl.constexpr, C: tl.constexpr):
    """Per row, base 2: max and log2 sum-exp of both rows, and the cross sums of the loss taken
    relative to the maxima and normalised: xs = sum p_t (s - m_s), xt = sum p_t (t - m_t)."""
    m_s = tl.full(rows.shape, float("-inf"), tl.float32)
    m_t = tl.full(rows.shape, float("-inf"), tl.float32)
    for c in tl.static_range(C):
        m_s = tl.maximum(m_s, _small_column(STU, rows, stride_s, c, live, scale))
        m_t = tl.maximum(m_t, _small_column(TEA, rows, stride_t, c, live, scale))
    d_s = tl.zeros(rows.shape, tl.float32)
    d_t = tl.zeros(rows.shape, tl.float32)
    xs = tl.zeros(rows.shape, tl.float32)
    xt = tl.zeros(rows.shape, tl.float32)
    for c in tl.static_range(C):
        s = _small_column(STU, rows, stride_s, c, live, scale) - m_s
        t = _small_column(TEA, rows, stride_t, c, live, scale) - m_t
        e_t = tl.exp2(t)
        t_live = e_t > 0.0  # p_t == 0 entries contribute 0, not 0 * -inf
        d_s += tl.exp2(s)
        d_t += e_t
        xs += e_t * tl.where(t_live, s, 0.0)
        xt += e_t * tl.where(t_live, t, 0.0)
    # d in [1, C]: lg2.approx's absolute error (~1e-7) is far below the losses' tolerances.
    return m_s, m_t, fast_log2(d_s, FAST_MATH), fast_log2(d_t, FAST_MATH), xs / d_t, xt / d_t


@jit
def _small_loss(log_d_s, log_d_t, xs, xt, is_kl):
    if is_kl:
        loss = ((xt - xs) + log_d_s - log_d_t) * _LN2
    else:
        loss = (log_d_s - xs) * _LN2
    return loss


@jit(do_not_specialize=["is_kl"])
def _divergence_small_fwd_kernel(
    STU, stride_s, TEA, stride_t, LOSS, N, inv_temp, is_kl,
    FAST_MATH: tl.constexpr, C: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < N
    _, _, log_d_s, log_d_t, xs, xt = _small_row_stats(STU, stride_s, TEA, stride_t, rows, live,
                                                      inv_temp * _LOG2E, FAST_MATH, C)
    tl.store(LOSS + rows, _small_loss(log_d_s, log_d_t, xs, xt, is_kl), mask=live)


@jit(do_not_specialize=["is_kl", "need_ds", "need_dt"])
def _divergence_small_bwd_kernel(
    STU, stride_s, TEA, stride_t, DS, stride_ds, DT, stride_dt, GRAD, N, inv_temp, is_kl, need_ds, need_dt,
    FAST_MATH: tl.constexpr, C: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < N
    scale = inv_temp * _LOG2E
    m_s, m_t, log_d_s, log_d_t, xs, xt = _small_row_stats(STU, stride_s, TEA, stride_t, rows, live, scale,
                                                          FAST_MATH, C)
    loss = _small_loss(log_d_s, log_d_t, xs, xt, is_kl)
    g = tl.load(GRAD + rows, mask=live, other=0.0).to(tl.float32) * inv_temp
    for c in tl.static_range(C):
        log_p_s = (_small_column(STU, rows, stride_s, c, live, scale) - m_s) - log_d_s
        log_p_t = (_small_column(TEA, rows, stride_t, c, live, scale) - m_t) - log_d_t
        p_t = tl.exp2(log_p_t)
        if need_ds:
            ds = g * (tl.exp2(log_p_s) - p_t)
            tl.store(DS + rows * stride_ds + c, ds.to(DS.dtype.element_ty), mask=live)
        if need_dt:
            dt = _teacher_grad(log_p_s, log_p_t, p_t, g, loss, is_kl)
            tl.store(DT + rows * stride_dt + c, dt.to(DT.dtype.element_ty), mask=live)


# --------------------------------------------------------------------------- host side


def _small_config(n_cols: int, kernel) -> dict:
    return {"C": n_cols, "ROWS": _SMALL_ROWS, "FAST_MATH": not is_interpreted(kernel), "num_warps": 4}


def _forward_triton(s, t, temperature: float, kind: int):
    n_rows, n_cols = s.shape
    if n_cols <= SMALL_C_MAX:
        (loss,) = aligned_row_vectors(1, n_rows, s.device)
        if n_rows:
            launch(
                _divergence_small_fwd_kernel, (-(-n_rows // _SMALL_ROWS),),
                s, s.stride(0), t, t.stride(0), loss, n_rows, 1.0 / temperature, int(kind == _KL),
                **_small_config(n_cols, _divergence_small_fwd_kernel),
            )
        return loss, []
    loss, *stats = aligned_row_vectors(5, n_rows, s.device)
    if n_rows:
        load_n = common_loadable_cols(s, t)
        launch(
            _divergence_fwd_kernel, (n_rows,),
            s, s.stride(0), t, t.stride(0), loss, *stats,
            n_cols, load_n, 1.0 / temperature, int(kind == _KL),
            PADDED=load_n > n_cols, **launch_config(n_cols),
        )
    return loss, stats


def _backward_triton(s, t, grad_rows, loss, stats, temperature, kind, need_ds, need_dt):
    ds = empty_rows_like(s) if need_ds else None
    dt = empty_rows_like(t) if need_dt else None
    n_rows, n_cols = s.shape
    if not n_rows or not (need_ds or need_dt):
        return ds, dt
    grad_rows = grad_rows.contiguous()
    ds_arg = s if ds is None else ds  # dummy pointer, never written (need_ds=0)
    dt_arg = t if dt is None else dt
    flags = (int(kind == _KL), int(need_ds), int(need_dt))
    if n_cols <= SMALL_C_MAX:
        launch(
            _divergence_small_bwd_kernel, (-(-n_rows // _SMALL_ROWS),),
            s, s.stride(0), t, t.stride(0), ds_arg, ds_arg.stride(0), dt_arg, dt_arg.stride(0), grad_rows,
            n_rows, 1.0 / temperature, *flags, **_small_config(n_cols, _divergence_small_bwd_kernel),
        )
        return ds, dt
    load_n = common_loadable_cols(s, t)
    launch(
        _divergence_bwd_kernel, (n_rows,),
        s, s.stride(0), t, t.stride(0), ds_arg, ds_arg.stride(0), dt_arg, dt_arg.stride(0),
        grad_rows, loss, *stats,
        n_cols, load_n, 1.0 / temperature, *flags,
        PADDED=load_n > n_cols, **launch_config(n_cols),
    )
    return ds, dt


class DivergenceFunction(torch.autograd.Function):
    """Per-row soft-CE or KL [N] in fp32; reductions are applied outside by torch."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, kind):
        s, t = as_rows(student), as_rows(teacher)
        loss, stats = _forward_triton(s, t, temperature, kind)
        ctx.save_for_backward(s, t, loss, *stats)
        ctx.temperature, ctx.kind = temperature, kind
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        s, t, loss, *stats = ctx.saved_tensors
        need_ds, need_dt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ds, dt = _backward_triton(s, t, grad_rows, loss, stats, ctx.temperature, ctx.kind, need_ds, need_dt)
        return ds, dt, None, None


def _per_row_loss_triton(student, teacher, temperature: float, kind: int) -> torch.Tensor:
    return DivergenceFunction.apply(student, teacher, float(temperature), kind)


# --------------------------------------------------------------------------- torch reference


def _per_row_loss_torch(student, teacher, temperature: float, kind: int) -> torch.Tensor:
    """Reference per-row loss in fp32, differentiable w.r.t. both inputs, NaN-free at p_t == 0."""
    log_p_s = torch.log_softmax(student.float() / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    p_t = log_p_t.exp()
    dead = p_t == 0
    # masked_fill (not torch.where) so the -inf / NaN in dead slots never meets a gradient.
    if kind == _KL:
        per_class = p_t * (log_p_t - log_p_s).masked_fill(dead, 0.0)
        return per_class.sum(-1)
    return -(p_t * log_p_s.masked_fill(dead, 0.0)).sum(-1)


# --------------------------------------------------------------------------- public API


def _check_pair(student, teacher, temperature):
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"student and teacher logits must both be [N, C], got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[1] < 2:
        raise ValueError("need C >= 2 classes (with C == 1 the softmax is constant: use MSE for regression)")
    if not (torch.is_floating_point(student) and torch.is_floating_point(teacher)):
        raise ValueError("logits must be floating point")
    if student.device != teacher.device:
        raise ValueError(f"student on {student.device} but teacher on {teacher.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _per_row_loss(student, teacher, temperature, kind, backend):
    _check_pair(student, teacher, temperature)
    if resolve_backend(backend, student, teacher) == "triton":
        return _per_row_loss_triton(student, teacher, temperature, kind)
    return _per_row_loss_torch(student, teacher, float(temperature), kind)


def soft_cross_entropy(student_logits, teacher_logits, temperature=1.0, reduction="mean", backend="auto"):
    """-sum softmax(t/T) * log_softmax(s/T) per row; reduction "mean" | "sum" | "none" ([N]).

    The loss is fp32 whatever the input dtype; gradients come back in each input's dtype.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    rows = _per_row_loss(student_logits, teacher_logits, temperature, _CE, backend)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()


def kl_div(student_logits, teacher_logits, temperature=1.0, reduction="batchmean", scale_t2=False, backend="auto"):
    """KL(softmax(t/T) || softmax(s/T)) per row.

    reduction: "batchmean" (sum / N), "sum", "mean" (sum / (N * C), like torch's kl_div) or
    "none" ([N]). scale_t2 multiplies by T**2 (Hinton et al.: keeps gradient scale independent
    of T). The loss is fp32; gradients come back in each input's dtype.
    """
    if reduction not in ("batchmean", "sum", "mean", "none"):
        raise ValueError(f"reduction must be 'batchmean', 'sum', 'mean' or 'none', got {reduction!r}")
    rows = _per_row_loss(student_logits, teacher_logits, temperature, _KL, backend)
    if scale_t2:
        rows = rows * (float(temperature) ** 2)
    n_rows, n_cols = student_logits.shape
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (n_rows if reduction == "batchmean" else n_rows * n_cols)
