"""Soft cross-entropy / KL kernels: reference vs torch.nn.functional, Triton vs reference
(forward and gradients to BOTH student and teacher), reductions, temperatures, dtypes, masked
and extreme logits.

Without CUDA the Triton path runs in the Triton interpreter, which must be switched on before
the kernel modules are imported (triton.jit reads TRITON_INTERPRET when it decorates).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F

from matekd_ds.kernels import kl_div, soft_cross_entropy
from matekd_ds.kernels import launch as launch_mod

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOSSES = {"ce": soft_cross_entropy, "kl": kl_div}
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def _pair(rows, classes, dtype=torch.float32, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, classes, generator=gen) * scale
    teacher = torch.randn(rows, classes, generator=gen) * scale
    return student.to(DEVICE, dtype), teacher.to(DEVICE, dtype)


def _loss_and_grads(fn, student, teacher, grad_out=None, student_grad=True, teacher_grad=True):
    s = student.detach().clone().requires_grad_(student_grad)
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = fn(s, t)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out)
    return loss.detach(), s.grad, t.grad


def _assert_close_all(got, want, tol):
    for a, b in zip(got, want):
        if b is None:
            assert a is None
            continue
        assert torch.isfinite(a.float()).all()
        torch.testing.assert_close(a, b, **tol)


def _compare(kind, student, teacher, tol=None, grad_out=None, **kwargs):
    """Triton vs torch backend of one loss: value and both gradients (returned for extra checks)."""
    fn = LOSSES[kind]
    got = _loss_and_grads(lambda s, t: fn(s, t, backend="triton", **kwargs), student, teacher, grad_out)
    want = _loss_and_grads(lambda s, t: fn(s, t, backend="torch", **kwargs), student, teacher, grad_out)
    assert got[1].dtype == student.dtype and got[2].dtype == teacher.dtype
    _assert_close_all(got, want, tol or TOL[student.dtype])
    return got


# --------------------------------------------------------------------------- the reference itself


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("scale_t2", [False, True])
def test_reference_kl_matches_torch_kl_div(reduction, scale_t2):
    student, teacher, temp = *_pair(5, 11), 2.5

    def official(s, t):
        out = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), reduction=reduction, log_target=True)
        out = out.sum(-1) if reduction == "none" else out
        return out * temp**2 if scale_t2 else out

    got = _loss_and_grads(lambda s, t: kl_div(s, t, temp, reduction, scale_t2, backend="torch"), student, teacher)
    _assert_close_all(got, _loss_and_grads(official, student, teacher), dict(atol=1e-6, rtol=1e-5))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_ce_matches_torch_cross_entropy(reduction):
    student, teacher, temp = *_pair(5, 11), 0.7

    def official(s, t):
        return F.cross_entropy(s / temp, F.softmax(t / temp, -1), reduction=reduction)

    got = _loss_and_grads(lambda s, t: soft_cross_entropy(s, t, temp, reduction, backend="torch"), student, teacher)
    _assert_close_all(got, _loss_and_grads(official, student, teacher), dict(atol=1e-6, rtol=1e-5))


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_reference_gradients_match_closed_form(kind):
    # The formulas the backward kernel implements, checked against autograd of the reference.
    student, teacher, temp = *_pair(4, 9), 1.7
    grad_rows = torch.randn(4).to(DEVICE)
    loss, ds, dt = _loss_and_grads(lambda s, t: LOSSES[kind](s, t, temp, reduction="none", backend="torch"),
                                   student, teacher, grad_rows)
    log_p_s, log_p_t = F.log_softmax(student / temp, -1), F.log_softmax(teacher / temp, -1)
    p_s, p_t, g = log_p_s.exp(), log_p_t.exp(), grad_rows[:, None] / temp
    inner = (log_p_t - log_p_s) - loss[:, None] if kind == "kl" else -(log_p_s + loss[:, None])
    torch.testing.assert_close(ds, g * (p_s - p_t), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dt, g * p_t * inner, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- Triton vs reference


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("classes", [2, 3, 7, 1000, 4097])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_triton_matches_reference_fp32(kind, classes, temperature):
    student, teacher = _pair(4, classes)
    grad_rows = torch.randn(4).to(DEVICE)  # distinct per-row upstream gradients
    _compare(kind, student, teacher, grad_out=grad_rows, temperature=temperature, reduction="none")


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("scale_t2", [False, True])
def test_triton_kl_reductions(reduction, scale_t2):
    _compare("kl", *_pair(5, 37), temperature=3.0, reduction=reduction, scale_t2=scale_t2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_ce_reductions(reduction):
    _compare("ce", *_pair(5, 37), temperature=0.5, reduction=reduction)


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_reference_half(kind, dtype):
    _compare(kind, *_pair(4, 1000, dtype), temperature=2.0)


def test_mixed_dtypes_keep_each_gradient_dtype():
    student, teacher = _pair(3, 100)
    _compare("kl", student.to(torch.bfloat16), teacher, tol=TOL[torch.bfloat16], temperature=2.0)


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_vocab_50265(kind):
    _compare(kind, *_pair(3, 50265), temperature=2.0, reduction="sum")


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_many_blocks_with_moving_max(kind, monkeypatch):
    # BLOCK=16 over C=200 with ramps: both running maxima move in every block, exercising the
    # re-referencing of the cross sums.
    monkeypatch.setattr(launch_mod, "MAX_BLOCK", 16)
    ramp = torch.linspace(-30.0, 30.0, 200, device=DEVICE)
    student, teacher = _pair(3, 200)
    _compare(kind, student + ramp, teacher + ramp.flip(0) * 0.5, temperature=1.3)


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_only_one_side_requires_grad(kind):
    student, teacher = _pair(3, 50)
    fn = LOSSES[kind]
    for s_req, t_req in ((True, False), (False, True)):
        got = _loss_and_grads(lambda s, t: fn(s, t, backend="triton"), student, teacher, None, s_req, t_req)
        want = _loss_and_grads(lambda s, t: fn(s, t, backend="torch"), student, teacher, None, s_req, t_req)
        _assert_close_all(got, want, TOL[torch.float32])


def test_non_contiguous_inputs():
    student, teacher = _pair(40, 6)
    _compare("kl", student.t(), teacher.t(), temperature=2.0)  # [6, 40] views with stride (1, 6)


def test_identical_logits_give_zero_kl_and_gradient():
    student, _ = _pair(3, 300, scale=1e3)
    loss, ds, dt = _compare("kl", student, student.clone(), reduction="none")
    assert torch.equal(loss, torch.zeros_like(loss))
    assert ds.abs().max() < 1e-6 and dt.abs().max() < 1e-6


# --------------------------------------------------------------------------- numerics at the edges


def _edge_pair():
    student, teacher = _pair(5, 300)
    student[0, 3], teacher[0, 3] = 1e4, 1e4  # huge shared winner
    student[1, :100], teacher[1, 200:] = -1e4, 1e4  # disagreeing extremes
    student[2, ::4] = teacher[2, ::4] = float("-inf")  # vocabulary masked in both
    teacher[3, 1::2] = float("-inf")  # teacher-only mask: p_t = 0, log p_t = -inf
    teacher[4, 10:] = -1e4  # p_t underflows to exactly 0 on most entries
    return student, teacher


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_extreme_and_masked_logits(kind, temperature):
    student, teacher = _edge_pair()
    loss, _, dt = _compare(kind, student, teacher, temperature=temperature, reduction="none")
    assert torch.isfinite(loss).all()
    assert torch.equal(dt[2, ::4], torch.zeros_like(dt[2, ::4]))  # no gradient into masked slots
    assert torch.equal(dt[3, 1::2], torch.zeros_like(dt[3, 1::2]))


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_extreme_logits_in_small_blocks(kind, monkeypatch):
    monkeypatch.setattr(launch_mod, "MAX_BLOCK", 32)  # masked / huge entries straddle many blocks
    _compare(kind, *_edge_pair(), temperature=2.0, reduction="sum")


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_zero_gradient_rows(kind):
    student, teacher = _edge_pair()
    grad_rows = torch.tensor([1.0, 0.0, -2.0, 0.0, 0.5], device=DEVICE)
    _, ds, dt = _compare(kind, student, teacher, grad_out=grad_rows, reduction="none")
    for row in (1, 3):
        assert torch.equal(ds[row], torch.zeros_like(ds[row])) and torch.equal(dt[row], torch.zeros_like(dt[row]))


# --------------------------------------------------------------------------- small C and row layouts


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("classes", [2, 3, 8])
def test_small_classes_across_programs(kind, classes):
    # 300 rows: three programs of 128 rows, the last one mostly past N.
    student, teacher = _pair(300, classes)
    grad_rows = torch.randn(300).to(DEVICE)
    _compare(kind, student, teacher, grad_out=grad_rows, temperature=1.5, reduction="none")


def _small_edge_pair():
    student, teacher = _pair(5, 3)
    student[0, 1], teacher[0, 1] = 1e4, 1e4  # huge shared winner
    student[1, 0], teacher[1, 2] = -1e4, 1e4  # disagreeing extremes
    student[2, 2] = teacher[2, 2] = float("-inf")  # a class masked in both
    teacher[3, 0] = float("-inf")  # teacher-only mask: p_t = 0
    teacher[4, 1:] = -1e4  # p_t underflows to exactly 0
    return student, teacher


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_small_classes_extreme_and_masked(kind, temperature):
    student, teacher = _small_edge_pair()
    loss, _, dt = _compare(kind, student, teacher, temperature=temperature, reduction="none")
    assert torch.isfinite(loss).all()
    assert dt[2, 2] == 0 and dt[3, 0] == 0


def test_small_classes_identical_logits_give_zero_kl_and_gradient():
    student, _ = _pair(7, 3, scale=1e3)
    loss, ds, dt = _compare("kl", student, student.clone(), reduction="none")
    assert torch.equal(loss, torch.zeros_like(loss))
    assert ds.abs().max() < 1e-6 and dt.abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("classes", [3, 1000])
def test_padded_row_stride(kind, classes):
    # Rows padded to a multiple of 16 (as a head writing into [N, C_pad] would leave them): the
    # kernels may load the padding (filled with poison here) and must ignore it.
    student, teacher = _pair(4, classes)
    width = -(-classes // 16) * 16 + 16
    s_buf = torch.full((4, width), 1e4, device=DEVICE)
    t_buf = torch.full((4, width), float("nan"), device=DEVICE)
    s_buf[:, :classes], t_buf[:, :classes] = student, teacher
    s_buf.requires_grad_(True)
    t_buf.requires_grad_(True)
    s_view, t_view = s_buf[:, :classes], t_buf[:, :classes]
    assert s_view.stride(0) == width  # the wrapper receives the padded layout
    loss = LOSSES[kind](s_view, t_view, 2.0, reduction="none", backend="triton")
    loss.backward(torch.arange(1.0, 5.0, device=DEVICE))
    want = _loss_and_grads(lambda s, t: LOSSES[kind](s, t, 2.0, reduction="none", backend="torch"), student, teacher,
                           grad_out=torch.arange(1.0, 5.0, device=DEVICE))
    _assert_close_all((loss.detach(), s_buf.grad[:, :classes], t_buf.grad[:, :classes]), want, TOL[torch.float32])
    assert (s_buf.grad[:, classes:] == 0).all() and (t_buf.grad[:, classes:] == 0).all()


# --------------------------------------------------------------------------- API


def test_rejects_bad_arguments():
    s, t = _pair(2, 5)
    with pytest.raises(ValueError, match="MSE"):
        kl_div(s[:, :1], t[:, :1])
    with pytest.raises(ValueError):
        kl_div(s, t[:, :4])
    with pytest.raises(ValueError):
        kl_div(s, t, reduction="avg")
    with pytest.raises(ValueError):
        soft_cross_entropy(s, t, reduction="batchmean")
    with pytest.raises(ValueError):
        soft_cross_entropy(s, t, temperature=0.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_is_fp32_for_half_inputs(backend):
    s, t = _pair(2, 5, torch.bfloat16)
    assert kl_div(s, t, backend=backend).dtype == torch.float32
    assert soft_cross_entropy(s, t, backend=backend, reduction="none").shape == (2,)
