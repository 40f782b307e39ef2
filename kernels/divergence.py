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
"""

from __future__ import annotations

import torch

from .dispatch import ensure_launchable, jit, next_power_of_2, resolve_backend, tl

_MAX_BLOCK = 4096
_CE, _KL = 0, 1


# --------------------------------------------------------------------------- Triton kernels


@jit
def _scaled_block(ptr, cols, mask, inv_temp):
    return tl.load(ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp


@jit
def _divergence_fwd_kernel(
    STU, stride_s, TEA, stride_t, LOSS, M_S, LOGD_S, M_T, LOGD_T,
    C, inv_temp,
    IS_KL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = STU + row * stride_s
    t_row = TEA + row * stride_t
    # Finite start for the maxima: exp(m_old - m_new) stays defined when a block is all -inf.
    m_s = -1.0e30
    m_t = -1.0e30
    d_s = 0.0
    d_t = 0.0
    xs = 0.0
    xt = 0.0
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < C
        s = _scaled_block(s_row, cols, mask, inv_temp)
        t = _scaled_block(t_row, cols, mask, inv_temp)
        m_s_new = tl.maximum(m_s, tl.max(s, 0))
        m_t_new = tl.maximum(m_t, tl.max(t, 0))
        a_t = tl.exp(m_t - m_t_new)
        e_t = tl.exp(t - m_t_new)
        # p_t == 0 entries (masked tail, -inf or underflowing teacher logits) contribute 0,
        # not 0 * -inf, when the student is masked there too.
        t_live = e_t > 0.0
        # Re-reference the old cross sums to the new maxima, then rescale them like d_t.
        xs = (xs - (m_s_new - m_s) * d_t) * a_t + tl.sum(e_t * tl.where(t_live, s - m_s_new, 0.0), 0)
        if IS_KL:
            xt = (xt - (m_t_new - m_t) * d_t) * a_t + tl.sum(e_t * tl.where(t_live, t - m_t_new, 0.0), 0)
        d_t = d_t * a_t + tl.sum(e_t, 0)
        d_s = d_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s - m_s_new), 0)
        m_s = m_s_new
        m_t = m_t_new
    log_d_s = tl.log(d_s)
    log_d_t = tl.log(d_t)
    if IS_KL:
        loss = (xt - xs) / d_t + log_d_s - log_d_t
    else:
        loss = log_d_s - xs / d_t
    tl.store(LOSS + row, loss)
    tl.store(M_S + row, m_s)
    tl.store(LOGD_S + row, log_d_s)
    tl.store(M_T + row, m_t)
    tl.store(LOGD_T + row, log_d_t)


@jit
def _divergence_bwd_kernel(
    STU, stride_s, TEA, stride_t, DS, stride_ds, DT, stride_dt,
    GRAD, LOSS, M_S, LOGD_S, M_T, LOGD_T,
    C, inv_temp,
    IS_KL: tl.constexpr, NEED_DS: tl.constexpr, NEED_DT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = STU + row * stride_s
    t_row = TEA + row * stride_t
    g = tl.load(GRAD + row).to(tl.float32) * inv_temp  # chain rule through s' = s / T
    loss = tl.load(LOSS + row)
    m_s = tl.load(M_S + row)
    log_d_s = tl.load(LOGD_S + row)
    m_t = tl.load(M_T + row)
    log_d_t = tl.load(LOGD_T + row)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < C
        s = _scaled_block(s_row, cols, mask, inv_temp)
        t = _scaled_block(t_row, cols, mask, inv_temp)
        log_p_s = (s - m_s) - log_d_s
        log_p_t = (t - m_t) - log_d_t
        p_s = tl.exp(log_p_s)
        p_t = tl.exp(log_p_t)
        if NEED_DS:
            tl.store(DS + row * stride_ds + cols, (g * (p_s - p_t)).to(DS.dtype.element_ty), mask=mask)
        if NEED_DT:
            # Zero the log-probs where p_t == 0 (masked tail, -inf teacher or student entries) so
            # the p_t * (...) product below is 0 * finite, never 0 * -inf or -inf - -inf.
            live = p_t > 0.0
            log_p_s = tl.where(live, log_p_s, 0.0)
            if IS_KL:
                inner = (tl.where(live, log_p_t, 0.0) - log_p_s) - loss
            else:
                inner = -(log_p_s + loss)
            tl.store(DT + row * stride_dt + cols, (g * p_t * inner).to(DT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- host side


def _launch_config(n_cols: int) -> dict:
    block = min(next_power_of_2(n_cols), _MAX_BLOCK)
    return {"BLOCK": block, "num_warps": 4 if block <= 1024 else 8}


def _forward_triton(s, t, temperature: float, kind: int):
    ensure_launchable(_divergence_fwd_kernel, s)
    n_rows, n_cols = s.shape
    loss, *stats = torch.empty(5, n_rows, dtype=torch.float32, device=s.device).unbind(0)
    if n_rows:
        _divergence_fwd_kernel[(n_rows,)](
            s, s.stride(0), t, t.stride(0), loss, *stats,
            n_cols, 1.0 / temperature,
            IS_KL=kind == _KL, **_launch_config(n_cols),
        )
    return loss, stats


def _backward_triton(s, t, grad_rows, loss, stats, temperature, kind, need_ds, need_dt):
    ds = torch.empty_like(s) if need_ds else None
    dt = torch.empty_like(t) if need_dt else None
    n_rows, n_cols = s.shape
    if n_rows and (need_ds or need_dt):
        grad_rows = grad_rows.contiguous()
        ds_arg = s if ds is None else ds  # dummy pointer, never written (NEED_DS=False)
        dt_arg = t if dt is None else dt
        _divergence_bwd_kernel[(n_rows,)](
            s, s.stride(0), t, t.stride(0), ds_arg, ds_arg.stride(0), dt_arg, dt_arg.stride(0),
            grad_rows, loss, *stats,
            n_cols, 1.0 / temperature,
            IS_KL=kind == _KL, NEED_DS=need_ds, NEED_DT=need_dt, **_launch_config(n_cols),
        )
    return ds, dt


class DivergenceFunction(torch.autograd.Function):
    """Per-row soft-CE or KL [N] in fp32; reductions are applied outside by torch."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, kind):
        s, t = student.contiguous(), teacher.contiguous()
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


# --------------------------------------------------------------------------- torch reference


def _rows_torch(student, teacher, temperature: float, kind: int) -> torch.Tensor:
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


def _rows(student, teacher, temperature, kind, backend):
    _check_pair(student, teacher, temperature)
    if resolve_backend(backend, student, teacher) == "triton":
        return DivergenceFunction.apply(student, teacher, float(temperature), kind)
    return _rows_torch(student, teacher, float(temperature), kind)


def soft_cross_entropy(student_logits, teacher_logits, temperature=1.0, reduction="mean", backend="auto"):
    """-sum softmax(t/T) * log_softmax(s/T) per row; reduction "mean" | "sum" | "none" ([N]).

    The loss is fp32 whatever the input dtype; gradients come back in each input's dtype.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    rows = _rows(student_logits, teacher_logits, temperature, _CE, backend)
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
    rows = _rows(student_logits, teacher_logits, temperature, _KL, backend)
    if scale_t2:
        rows = rows * (float(temperature) ** 2)
    n_rows, n_cols = student_logits.shape
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (n_rows if reduction == "batchmean" else n_rows * n_cols)
