"""The generator step must train the generator only, and the student step the student only:
bit-identical parameters, gradients, optimizer and scheduler state of the other engine, at every
ZeRO stage (at stage 3 with the teacher as a ZeRO-3 inference engine, parameters compared as the
rank's partitions). tests/zero3_probe.py checks the same at stage 3 on 2 ranks."""

import pytest
import torch
from helpers import assert_same, param_tensors, snapshot_engine, tiny_batch, tiny_matekd, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_and_examples():
    return tiny_tokenizer()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_generator_step_leaves_student_untouched(stage, tokenizer_and_examples):
    tokenizer, examples = tokenizer_and_examples
    method = tiny_matekd(stage)
    batch = tiny_batch(tokenizer, examples)
    method.student_micro_step(batch, seed=1)  # the student has optimizer state and a schedule now
    before_student = snapshot_engine(method.student)
    before_generator = snapshot_engine(method.generator)

    method.generator_micro_step(batch, seed=2)

    assert_same(before_student, snapshot_engine(method.student), "student")
    assert all(p.requires_grad for p in method.student.module.parameters()), "student left frozen"
    # ...and the step did train the generator.
    changed = [n for n, p in param_tensors(method.generator.module).items()
               if not torch.equal(p, before_generator["params"][n])]
    assert changed, "the generator step did not update the generator"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_student_step_leaves_generator_untouched(stage, tokenizer_and_examples):
    tokenizer, examples = tokenizer_and_examples
    method = tiny_matekd(stage)
    batch = tiny_batch(tokenizer, examples)
    method.generator_micro_step(batch, seed=3)
    before_generator = snapshot_engine(method.generator)
    before_student = snapshot_engine(method.student)

    method.student_micro_step(batch, seed=4)

    assert_same(before_generator, snapshot_engine(method.generator), "generator")
    changed = [n for n, p in param_tensors(method.student.module).items()
               if not torch.equal(p, before_student["params"][n])]
    assert changed, "the student step did not update the student"


@pytest.mark.parametrize("stage", [0, 3])
def test_teacher_is_frozen_and_in_eval_mode(stage, tokenizer_and_examples):
    tokenizer, examples = tokenizer_and_examples
    method = tiny_matekd(stage)
    before = param_tensors(method.teacher.module)
    batch = tiny_batch(tokenizer, examples)
    method.generator_micro_step(batch, seed=5)
    method.student_micro_step(batch, seed=6)
    assert not method.teacher.module.training
    after = param_tensors(method.teacher.module)
    for n, p in method.teacher.module.named_parameters():
        assert not p.requires_grad and p.grad is None and torch.equal(after[n], before[n])
