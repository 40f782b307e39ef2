"""The price of MATE-KD against KD, lever by lever: `matekd_over_kd_time` of each cheaper variant
of the shipped MATE-KD step, all measured in one process, interleaved step by step.

Every side is built by the run factory that `matekd train` uses (bench_train.project_side ->
matekd_ds.assembly), on the same models (deep copies of one set), the same batches of the
preset's own data and the same seeds; KD is the same preset with `method=kd` (cached teacher
logits, as `matekd train` runs it). One round times step n of every side before step n + 1 of
any, so a burst of load from another process falls on all of them alike; each figure is the
median over the rounds. MATE-KD's time is a whole cycle (its generator steps on top, as
`matekd.extra_generator_steps` counts them), KD's the same number of student steps.

    python benchmarks/bench_matekd_cost.py                       # minilm-sst2, every variant
    python benchmarks/bench_matekd_cost.py --variants base,bf16-g2 --rounds 5

Prints one line per variant: `<name> matekd_over_kd_time: X` with its generator and student step
times. The quality of each variant (MATE-KD − KD on dev and held-out text) is in docs/results.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # the sibling benchmark: presets, batches and the shipped step

from matekd_ds.assembly import cut_student, run_inputs
from matekd_ds.errors import MatekdError

VARIANTS: dict[str, list[str]] = {
    "base": [],  # the shipped default: the generator's last layer at masked rows only, fp32
    "all-rows": ["matekd.generator_last_layer_masked_rows=false"],
    "bf16": ["train.frozen_forward_dtype=bf16"],
    "g3": ["matekd.generator_layers=3"],
    "g2": ["matekd.generator_layers=2"],
    "bf16-g3": ["train.frozen_forward_dtype=bf16", "matekd.generator_layers=3"],
    "bf16-g2": ["train.frozen_forward_dtype=bf16", "matekd.generator_layers=2"],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    presets = sorted(p.stem for p in bench_train.PRESETS.glob("*.yaml"))
    parser.add_argument("--preset", default="minilm-sst2", choices=presets)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of one cycle each (default 3)")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants or args.rounds < 1:
        parser.error(f"unknown variant {unknown[0]}" if unknown else "give variants and --rounds >= 1")
    return args


def shared_inputs(preset: str):
    """The preset's inputs, with the student cut from the teacher (when the preset says so) once
    for every side."""
    inputs = run_inputs(bench_train.load_preset(preset, []))
    if not inputs.cfg.models.student_init_from_teacher_layers:
        return inputs
    student = cut_student(inputs, inputs.models.teacher)
    return dataclasses.replace(inputs, models=dataclasses.replace(inputs.models, student=student))


def build_side(inputs, preset: str, name: str, overrides: list[str], with_generator: bool):
    """One side of the comparison, on copies of the shared models, through the run factory."""
    cfg = bench_train.load_preset(preset, overrides)
    models = copy.deepcopy({"teacher": inputs.models.teacher, "student": inputs.models.student,
                            "generator": inputs.models.generator if with_generator else None})
    for role in ("student", "generator"):
        if models[role] is not None:
            models[role].train()
    return bench_train.project_side(dataclasses.replace(inputs, cfg=cfg, models=dataclasses.replace(inputs.models,
                                                                                                   **models)), name)


def time_rounds(sides: dict, batches: list, cfg, rounds: int) -> dict[str, list[float]]:
    """Median seconds of each step of the cycle, per side, interleaved step by step."""
    for side in sides.values():  # warm-up: one generator and one student step
        for n in (0, 1):
            side.step(batches[n], n, bench_train.step_seed(cfg, n))
    times = {name: [[] for _ in batches] for name in sides}
    for _ in range(rounds):
        for n, batch in enumerate(batches):
            for name, side in sides.items():
                started = time.perf_counter()
                side.step(batch, n, bench_train.step_seed(cfg, n))
                times[name][n].append(time.perf_counter() - started)
    return {name: [statistics.median(step) for step in steps] for name, steps in times.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    os.chdir(bench_train.REPO)  # presets name data relative to the repository
    torch.manual_seed(0)
    inputs = shared_inputs(args.preset)
    cfg = bench_train.load_preset(args.preset, [])
    sides = {name: build_side(inputs, args.preset, name, VARIANTS[name], True) for name in args.variants}
    sides["kd"] = build_side(inputs, args.preset, "kd", ["method=kd"], False)
    length = bench_train.cycle_length(cfg)
    generator_steps = sum(bench_train.cycle_role(cfg, n) == "generator" for n in range(length))
    batches = bench_train.run_batches(inputs, length)
    medians = time_rounds(sides, batches, cfg, args.rounds)
    kd = statistics.mean(medians["kd"][generator_steps:]) * (length - generator_steps)
    print(f"{args.preset}: {length - generator_steps} student steps + {generator_steps} generator step(s) per "
          f"cycle, {args.rounds} round(s), {torch.get_num_threads()} thread(s); KD student step "
          f"{kd / (length - generator_steps) * 1e3:.0f} ms")
    for name in args.variants:
        steps = medians[name]
        generator_ms = statistics.mean(steps[:generator_steps]) * 1e3
        student_ms = statistics.mean(steps[generator_steps:]) * 1e3
        print(f"{name:9s} generator step {generator_ms:6.0f} ms  student step {student_ms:6.0f} ms  "
              f"matekd_over_kd_time: {sum(steps) / kd:.2f}")


if __name__ == "__main__":
    try:
        main()
    except MatekdError as err:  # a variant the preset's models cannot take (g2 on a 1-layer generator)
        sys.exit(f"bench_matekd_cost.py: error: {err}")
