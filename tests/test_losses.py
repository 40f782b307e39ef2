"""Loss definitions, the student-step weights, and the n_G/n_S cycle."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_batch, tiny_matekd, tiny_tokenizer

from matekd_ds.data.batching import doubled
from matekd_ds.losses import divergence, task_loss
from matekd_ds.methods.matekd import count_student_steps, cycle_role, steps_holding_student_steps


def test_divergence_is_the_official_soft_cross_entropy():
    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, 1.0, 3.0]])
    p_t = torch.softmax(t / 2.0, -1)
    expected = -(p_t * torch.log_softmax(s / 2.0, -1)).sum()
    torch.testing.assert_close(divergence(s, t, 2.0, regression=False), expected)


def test_divergence_is_mse_for_regression():
    s, t = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [1.0]])
    assert divergence(s, t, 1.0, regression=True).item() == pytest.approx((1 + 4) / 2)


def test_task_loss():
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    torch.testing.assert_close(task_loss(logits, labels, False), F.cross_entropy(logits, labels))
    assert task_loss(torch.tensor([[0.5], [2.0]]), torch.tensor([1.0, 2.0]), True).item() == pytest.approx(0.125)


@pytest.mark.parametrize("weights", [(1 / 3, 1 / 3, 1 / 3), (1.0, 0.0, 0.0), (0.2, 0.5, 0.3)])
def test_student_step_loss_is_the_weighted_sum(weights):
    tokenizer, examples = tiny_tokenizer()
    method = tiny_matekd(0, weights=weights)
    for module in (method.student.module, method.generator.module):
        module.eval()  # no dropout, so the loss can be recomputed independently
    batch = tiny_batch(tokenizer, examples)
    mb = method.perturber.mask_batch(batch, seed=9)
    perturbed = method.perturber.sample_perturbed_ids(method.generator.module, mb, seed=10)
    with torch.no_grad():
        both = doubled(batch, perturbed)
        s_clean, s_pert = method.student.module(**both).logits.chunk(2)
        t_clean, t_pert = method.teacher.module(**both).logits.chunk(2)

    def soft_ce(s, t):
        return -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean()

    expected = (weights[0] * F.cross_entropy(s_clean, batch["labels"])
                + weights[1] * soft_ce(s_clean, t_clean) + weights[2] * soft_ce(s_pert, t_pert))
    out = method.student_micro_step(batch, seed=9)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)


def test_generator_step_maximises_the_divergence():
    tokenizer, examples = tiny_tokenizer()
    method = tiny_matekd(0, generator_lr=0.0)  # lr 0: the step reports, changes nothing
    batch = tiny_batch(tokenizer, examples)
    out = method.generator_micro_step(batch, seed=3)
    assert out["gen_div"].item() > 0 and out["masked_tokens"].item() >= 1


def test_cycle_role_follows_n_g_then_n_s():
    phases = [cycle_role(step, 2, 3) for step in range(10)]
    assert phases == ["generator"] * 2 + ["student"] * 3 + ["generator"] * 2 + ["student"] * 3
    assert all(cycle_role(s, 0, 5) == "student" for s in range(10))
    assert [cycle_role(s, 10, 100) for s in (0, 9, 10, 109, 110)] == \
        ["generator", "generator", "student", "student", "generator"]


def test_count_student_steps():
    for total in range(0, 40):
        assert count_student_steps(total, 3, 5) == sum(cycle_role(s, 3, 5) == "student" for s in range(total))


def test_steps_holding_student_steps_is_the_fewest_that_do():
    for n_g, n_s in ((3, 5), (10, 100), (0, 4)):
        for target in range(1, 60):
            total = steps_holding_student_steps(target, n_g, n_s)
            assert count_student_steps(total, n_g, n_s) == target
            assert count_student_steps(total - 1, n_g, n_s) < target


def test_cached_clean_teacher_logits_give_the_same_student_step():
    from matekd_ds.evaluation import predict

    tokenizer, examples = tiny_tokenizer()
    losses = {}
    for cached in (False, True):
        method = tiny_matekd(0)
        method.student.module.eval()
        method.generator.module.eval()
        batch = tiny_batch(tokenizer, examples, n=6)
        if cached:  # the table holds the clean logits of every example, indexed like the batch
            from matekd_ds.data.batching import encode
            data = encode(examples[:6], tokenizer, 32, regression=False)
            table = predict(method.teacher.module, data, 4, tokenizer.pad_token_id, torch.device("cpu"))
            method.teacher.clean_table = torch.from_numpy(table)
        losses[cached] = method.student_micro_step(batch, seed=9)
    for key in ("loss", "ce", "div_clean", "div_perturbed"):
        torch.testing.assert_close(losses[True][key], losses[False][key], rtol=1e-5, atol=1e-6)
