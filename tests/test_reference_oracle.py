"""The project's MATE-KD step against the eager reference of the official formulation
(benchmarks/reference_matekd.py), on identical weights, batch and perturbation.

The perturbation is forced: the mask comes from the project's Perturber.mask_batch(batch, seed),
and the reference's B x L x V Gumbel noise carries, at the masked rows, exactly the noise the
project's torch backend draws for its [M, V] masked-row logits (kernels.gumbel._torch_gumbel_noise
with seed + 1); the other rows get unrelated noise, which must not matter.

Tolerances (fp32, CPU, dropout off):
* losses: rtol 1e-5;
* gradients before clipping: |project - reference| <= 1e-5 * max|gradient| + 1e-4 * |gradient|;
* AdamW's first moment after the step, i.e. (1 - beta1) x the clipped gradient: as gradients;
* parameters after one AdamW step, where |gradient| > 1e-3 * max|gradient|:
  |project - reference| <= 1e-3 * lr (an Adam step moves each weight by about lr, so this is a
  0.1 % disagreement of the update; measured: <= 6e-5 * lr).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import load_benchmark_script, tiny_run_config

from matekd_ds import models
from matekd_ds.assembly import build_run, run_inputs
from matekd_ds.data import synthetic
from matekd_ds.data.batching import collate, encode
from matekd_ds.data.tokenizer import train_wordpiece
from matekd_ds.kernels.gumbel import _torch_gumbel_noise
from matekd_ds.methods import MateKD

# CLIP is below the tiny models' gradient norms (measured: student 6.1, generator 0.29) so that
# clipping acts (checked through AdamW's first moment: one Adam step from zero state is invariant
# to the gradient's scale).
STUDENT_LR, GENERATOR_LR, WEIGHT_DECAY, CLIP = 1e-3, 1e-3, 0.01, 0.1
CLIP_LR = {"student": STUDENT_LR, "generator": GENERATOR_LR}
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_SCALE_ATOL = 1e-4, 1e-5
PARAM_ATOL_IN_LR = 1e-3
MEANINGFUL_GRAD_IN_SCALE = 1e-3


reference = load_benchmark_script("reference_matekd.py")


@pytest.fixture(scope="module")
def tokenizer_and_batch():
    examples = synthetic.generate(300, seed=5)
    tokenizer = train_wordpiece([t for ex in examples for t in ex.texts], 500)
    data = encode(examples[:8], tokenizer, 32, regression=False)
    return tokenizer, collate(data, list(range(8)), tokenizer.pad_token_id)


# The project side as `matekd train` builds it (assembly.build_run) with these hyper-parameters.
PROJECT_RUN = (f"train.lr={STUDENT_LR}", f"train.weight_decay={WEIGHT_DECAY}", f"train.clip={CLIP}",
               f"matekd.generator_lr={GENERATOR_LR}", f"matekd.generator_clip={CLIP}", "train.micro_batch_size=8",
               "deepspeed.student=zero0", "deepspeed.generator=zero0")


def tiny_models(tokenizer) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    built = {"teacher": models.load_classifier("teacher", "builtin:bert-L2-H32-A2", 2, tokenizer, False),
             "student": models.load_classifier("student", "builtin:bert-L1-H32-A2", 2, tokenizer, False),
             "generator": models.load_generator("builtin:bert-L1-H32-A2", tokenizer)}
    for model in built.values():
        spread_weights(model)
        model.eval()  # no dropout: both sides deterministic
    return built


def make_reference(built: dict[str, torch.nn.Module], tokenizer):
    for model in built.values():
        model.eval()  # no dropout: both sides deterministic
    return reference.ReferenceMateKD(
        built["teacher"], built["student"], built["generator"], mask_token_id=tokenizer.mask_token_id,
        special_ids=tokenizer.all_special_ids, student_lr=STUDENT_LR, generator_lr=GENERATOR_LR,
        weight_decay=WEIGHT_DECAY, clip=CLIP, generator_clip=CLIP, generator_steps=1, student_steps=1)


def build_pair(tokenizer, cached_teacher: bool = False):
    """The project's MateKD (built by assembly.build_run on ZeRO-0 engines) and the reference, from
    identical weights. `cached_teacher`: the project looks the teacher's clean logits up in the
    table the run computes over its training rows (the test batch is the first 8 of them)."""
    inputs = run_inputs(tiny_run_config(*PROJECT_RUN, f"train.cache_teacher_logits={cached_teacher}"))
    built = {"teacher": inputs.models.teacher, "student": inputs.models.student, "generator": inputs.models.generator}
    for model in built.values():
        spread_weights(model)
    ref = make_reference({**built, "student": copy.deepcopy(built["student"]),
                          "generator": copy.deepcopy(built["generator"])}, tokenizer)
    _, project = build_run(inputs)
    for engine in project.engines.values():
        engine.module.eval()  # no dropout: both sides deterministic
    assert (project.teacher.clean_table is not None) == cached_teacher
    return project, ref


def spread_weights(model: torch.nn.Module, std: float = 0.3) -> None:
    """Wider random matrices than BERT's 0.02 init: the tiny models' logits would otherwise be
    ~0, every divergence ln 2 and the generator's gradient ~1e-9, which would test nothing."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, std)


def forced_perturbation(project: MateKD, batch, seed: int):
    """The project's mask for `seed`, and at its masked rows the noise its Gumbel sampler draws."""
    mb = project.perturber.mask_batch(batch, seed)
    vocab = project.generator.module.get_output_embeddings().weight.shape[0]
    noise = reference.gumbel_noise((*batch["input_ids"].shape, vocab), torch.device("cpu"),
                                   torch.Generator().manual_seed(12345))  # unrelated elsewhere
    noise[mb.mask] = _torch_gumbel_noise((int(mb.mask.sum()), vocab), seed + 1, torch.device("cpu"))
    return mb, reference.Perturbation(mb.mask, noise)


def capture_engine_gradients(engine) -> dict[str, torch.Tensor]:
    """Copies of the engine's gradients right after its backward (its step zeroes them)."""
    grads: dict[str, torch.Tensor] = {}
    backward = engine.backward

    def recording_backward(loss, *args, **kwargs):
        out = backward(loss, *args, **kwargs)
        grads.update({n: p.grad.detach().clone() for n, p in engine.module.named_parameters() if p.grad is not None})
        return out

    engine.backward = recording_backward
    return grads


def capture_reference_gradients(ref, role: str) -> dict[str, torch.Tensor]:
    grads: dict[str, torch.Tensor] = {}
    model = getattr(ref, role)

    def record(stepped_role: str) -> None:
        if stepped_role == role:
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    ref.after_backward = record
    return grads


def assert_losses_match(project_out: dict, ref_out: dict, keys: list[str]) -> None:
    for key in keys:
        torch.testing.assert_close(project_out[key], ref_out[key], rtol=LOSS_RTOL, atol=0.0, msg=key)


def assert_gradients_match(project_grads: dict, ref_grads: dict) -> None:
    assert project_grads and project_grads.keys() == ref_grads.keys()
    scale = max(g.abs().max().item() for g in ref_grads.values())
    assert scale > 0
    for name, grad in project_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=GRAD_RTOL, atol=GRAD_SCALE_ATOL * scale, msg=name)


def assert_updates_match(before: dict, project_model, ref_model, ref_grads: dict, lr: float) -> None:
    """Same parameters after the step where the gradient is above 1e-3 of the largest one.
    Below that Adam's first update g / (|g| + eps) amplifies rounding: a ~1e-8 gradient (e.g.
    of an attention key bias, whose true gradient is 0 by softmax shift invariance, or a sum that
    cancels to ~1e-7) moves its weight by any amount in [-lr, lr]."""
    scale = max(g.abs().max().item() for g in ref_grads.values())
    ref_params = dict(ref_model.named_parameters())
    for name, p_project in project_model.named_parameters():
        meaningful = ref_grads[name].abs() > MEANINGFUL_GRAD_IN_SCALE * scale
        difference = (p_project.detach() - ref_params[name].detach()).abs()[meaningful]
        assert difference.numel() == 0 or difference.max().item() <= PARAM_ATOL_IN_LR * lr, name
    assert any(not torch.equal(p, before[n]) for n, p in project_model.named_parameters()), "nothing moved"


def gradient_norm(grads: dict[str, torch.Tensor]) -> float:
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()


def first_moments(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """AdamW's exp_avg after its first step: (1 - beta1) x the CLIPPED gradient."""
    return {n: optimizer.state[p]["exp_avg"].clone() for n, p in model.named_parameters() if p in optimizer.state}


def run_both(project: MateKD, ref, role: str, batch, seed: int) -> None:
    """One `role` step on each side from identical weights, then compare everything."""
    engine, ref_model = getattr(project, role), getattr(ref, role)
    project_step = project.student_micro_step if role == "student" else project.generator_micro_step
    ref_step = ref.student_step if role == "student" else ref.generator_step
    ref_optimizer = ref.student_optimizer if role == "student" else ref.generator_optimizer
    keys = ["ce", "div_clean", "div_perturbed", "loss"] if role == "student" else ["gen_div", "masked_tokens"]
    mb, forced = forced_perturbation(project, batch, seed)
    assert mb.mask.any()
    project_ids = project.perturber.sample_perturbed_ids(project.generator.module, mb, seed + 1)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    project_grads = capture_engine_gradients(engine)
    ref_grads = capture_reference_gradients(ref, role)

    project_out = project_step(batch, seed)
    ref_out = ref_step(batch, perturbation=forced)

    assert torch.equal(ref_out["perturbed_ids"], project_ids), "the forced perturbation differs"
    assert_losses_match(project_out, ref_out, keys)
    assert_gradients_match(project_grads, ref_grads)
    # CLIP is below the gradient norm: equal first moments mean equal clipping.
    assert gradient_norm(ref_grads) > CLIP, gradient_norm(ref_grads)
    assert_gradients_match(first_moments(engine.optimizer, engine.module), first_moments(ref_optimizer, ref_model))
    assert_updates_match(before, engine.module, ref_model, ref_grads, CLIP_LR[role])


@pytest.mark.parametrize("cached_teacher", [False, True], ids=["teacher-forward", "teacher-table"])
def test_student_step_matches_reference(tokenizer_and_batch, cached_teacher):
    tokenizer, batch = tokenizer_and_batch
    project, ref = build_pair(tokenizer, cached_teacher)
    run_both(project, ref, "student", batch, seed=11)


def test_generator_step_matches_reference(tokenizer_and_batch):
    tokenizer, batch = tokenizer_and_batch
    project, ref = build_pair(tokenizer)
    run_both(project, ref, "generator", batch, seed=23)


def test_reference_draws_its_own_perturbation(tokenizer_and_batch):
    """Unforced (the benchmark's path): masks only real tokens, trains the right model."""
    tokenizer, batch = tokenizer_and_batch
    ref = make_reference(tiny_models(tokenizer), tokenizer)
    perturbation = ref.draw_perturbation(batch, seed=3)
    special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert perturbation.mask.any() and not perturbation.mask[special | (batch["attention_mask"] == 0)].any()
    generator_before = [p.detach().clone() for p in ref.generator.parameters()]
    out = ref.train_step(batch, step=1, seed=3)  # step 1 of a 1:1 cycle is a student step
    assert set(out) >= {"loss", "ce", "div_clean", "div_perturbed"}
    assert all(torch.isfinite(v).all() for v in out.values())
    assert all(torch.equal(a, b) for a, b in zip(generator_before, ref.generator.parameters()))
    out = ref.train_step(batch, step=0, seed=4)
    assert torch.isfinite(out["gen_div"]) and not all(
        torch.equal(a, b) for a, b in zip(generator_before, ref.generator.parameters()))
