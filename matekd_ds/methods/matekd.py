"""MATE-KD (Rashid et al., ACL 2021): a min-max game between a masked-LM generator and the student.

Each cycle: `generator_steps` generator (max) steps, then `student_steps` student (min) steps.

  generator step:  y = GumbelST(generator(masked x))           masked rows only
                   loss_G = −div(student(x ⊕ y·E_s), teacher(x ⊕ y·E_t))      student frozen
                   (y·E inside each model's word-embedding forward: ZeRO-3 gathers E there)
  student step:    x' = x with masked rows ← sampled ids       no gradient
                   loss_S = w₀·CE(student(x), labels) + w₁·div(student(x), teacher(x))
                                                      + w₂·div(student(x'), teacher(x'))

Control arms (matekd.perturbation, generator_steps): with generator_steps 0 the generator is
never trained (a frozen masked LM); method kd-aug is that arm without the generator's engine
(`frozen_generator`, no optimizer state); with perturbation random there is no generator at all,
the masked rows take uniform random tokens (perturb.RandomTokens). Without a generator engine
`engines` holds the student alone. The student step is the same in every arm.
matekd.adversary_probe (adversary.py) measures the generator after each generator phase.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from matekd_ds.data.batching import doubled, model_inputs
from matekd_ds.losses import divergence, task_loss
from matekd_ds.methods.base import autocast_to, frozen
from matekd_ds.partition import release_backward_leftovers
from matekd_ds.perturb import Perturber, RandomTokens, soft_embeddings
from matekd_ds.teacher import Teacher

if TYPE_CHECKING:
    from matekd_ds.adversary import AdversaryProbe


def cycle_role(step: int, generator_steps: int, student_steps: int) -> str:
    """The first `generator_steps` of every cycle train the generator, the rest the student."""
    return "generator" if step % (generator_steps + student_steps) < generator_steps else "student"


def count_student_steps(total_steps: int, generator_steps: int, student_steps: int) -> int:
    cycle = generator_steps + student_steps
    full, rest = divmod(total_steps, cycle)
    return full * student_steps + max(0, rest - generator_steps)


def steps_holding_student_steps(student_target: int, generator_steps: int, student_steps: int) -> int:
    """The fewest cycle steps that hold `student_target` student steps: every started block of
    student steps comes after its cycle's generator steps."""
    return student_target + generator_steps * -(-student_target // student_steps)


class MateKD:
    name = "matekd"

    def __init__(self, student_engine, generator_engine, teacher: Teacher, perturber: Perturber, *,
                 regression: bool, temperature: float, loss_weights: list[float],
                 generator_steps: int, student_steps: int, frozen_dtype: torch.dtype | None = None,
                 random_tokens: RandomTokens | None = None, probe: AdversaryProbe | None = None,
                 frozen_generator: torch.nn.Module | None = None):
        """`generator_engine` None: no generator step; the masks are filled by `random_tokens`
        (the random-token arm) or sampled from `frozen_generator` (kd-aug). `probe`: the
        adversary probe, run after each generator phase."""
        if generator_engine is None and ((random_tokens is None) == (frozen_generator is None) or generator_steps > 0):
            raise ValueError("MATE-KD without a generator engine needs random tokens or a frozen generator (one), "
                             "and generator_steps 0")
        if frozen_generator is not None:
            self.name = "kd-aug"
        self.student, self.generator, self.teacher = student_engine, generator_engine, teacher
        self.frozen_generator = frozen_generator
        self.perturber = perturber  # the masks (and the generator's samples)
        self.sampler = random_tokens if random_tokens is not None else perturber  # the student step's tokens
        self.regression, self.temperature = regression, temperature
        self.weights = loss_weights
        self.generator_steps, self.student_steps = generator_steps, student_steps
        self.frozen_dtype = frozen_dtype  # the student step's no-grad forwards under autocast (None: off)
        self.probe = probe

    @property
    def engines(self) -> dict:
        if self.generator is None:
            return {"student": self.student}
        return {"student": self.student, "generator": self.generator}

    def trains(self, step: int) -> str:
        return cycle_role(step, self.generator_steps, self.student_steps)

    def ends_generator_phase(self, step: int) -> bool:
        """Whether `step` is the last generator step of its cycle."""
        cycle = self.generator_steps + self.student_steps
        return self.generator_steps > 0 and step % cycle == self.generator_steps - 1

    # -- what the loop keeps besides the engines: the probe's records (metrics.json "adversary")

    @property
    def adversary_records(self) -> list[dict] | None:
        return self.probe.records if self.probe is not None else None

    def state_dict(self) -> dict:
        return {"adversary": self.probe.records} if self.probe is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.probe is not None:
            self.probe.records = list(state.get("adversary", []))

    def div(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return divergence(student_logits, teacher_logits, self.temperature, self.regression)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], step: int,
                   seeds: list[int]) -> dict[str, torch.Tensor]:
        micro_step = self.generator_micro_step if self.trains(step) == "generator" else self.student_micro_step
        sums: dict[str, torch.Tensor] = {}
        for batch, seed in zip(micro_batches, seeds):
            for key, value in micro_step(batch, seed).items():
                sums[key] = sums.get(key, 0.0) + value.detach()
        losses = {k: v / len(micro_batches) for k, v in sums.items()}
        if self.probe is not None and self.ends_generator_phase(step):  # logged beside gen_div
            device = micro_batches[0]["input_ids"].device
            losses.update(self.probe.measure(step + 1, self.student.module, self.generator.module, device))
            self.student.empty_partition_cache()  # ZeRO-3: the probe's forwards gathered the student
        return losses

    # -- the max step -------------------------------------------------------------------------

    def generator_micro_step(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        mb = self.perturber.mask_batch(batch, seed)
        y = self.perturber.sample_straight_through(self.generator.module, mb, seed + 1)
        inputs = dict(mb.model_kwargs(), input_ids=mb.input_ids)
        student = self.student.module  # the bare module: the student engine must not see this backward
        with frozen(student), soft_embeddings(student, mb.mask, y):
            student_logits = student(**inputs).logits
        with soft_embeddings(self.teacher.module, mb.mask, y):
            teacher_logits = self.teacher.logits(**inputs)
        adversarial = self.div(student_logits, teacher_logits)
        loss = -adversarial  # the generator maximises the divergence
        self.generator.backward(loss)
        release_backward_leftovers(self.student)  # ZeRO-3: the word embeddings gathered for y @ E
        self.teacher.release()
        self.generator.step()
        return {"gen_div": adversarial, "masked_tokens": mb.mask.sum().float()}

    # -- the min step -------------------------------------------------------------------------

    def student_micro_step(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        mb = self.perturber.mask_batch(batch, seed)
        with torch.no_grad(), autocast_to(self.frozen_dtype, batch["input_ids"].device.type):
            generator = self.generator.module if self.generator is not None else self.frozen_generator
            perturbed_ids = self.sampler.sample_perturbed_ids(generator, mb, seed + 1)
            teacher_clean = self.teacher.clean_logits(batch)
            teacher_perturbed = self.teacher.logits(**dict(model_inputs(batch), input_ids=perturbed_ids))
        if self.frozen_dtype is not None:  # the losses in the student's precision
            teacher_clean, teacher_perturbed = teacher_clean.float(), teacher_perturbed.float()
        # one student forward over clean ⊕ perturbed
        student_clean, student_perturbed = self.student(**doubled(batch, perturbed_ids)).logits.chunk(2)
        ce = task_loss(student_clean, batch["labels"], self.regression)
        div_clean = self.div(student_clean, teacher_clean)
        div_perturbed = self.div(student_perturbed, teacher_perturbed)
        w_ce, w_clean, w_perturbed = self.weights
        loss = w_ce * ce + w_clean * div_clean + w_perturbed * div_perturbed
        self.student.backward(loss)
        self.student.step()
        return {"loss": loss, "ce": ce, "div_clean": div_clean, "div_perturbed": div_perturbed}
