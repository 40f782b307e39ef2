"""`matekd experiment SPEC.yaml`: FT, KD and MATE-KD students over tasks and seeds, one table.

Per task, in order:
  1. the teacher: fine-tuned once (a `matekd train method=ft` run of the teacher model), or a
     fine-tuned checkpoint given in the spec;
  2. the generator: warmed up once with MLM on the task's text (`matekd warmup-generator`), if
     the spec asks for it; every MATE-KD seed then starts from the same warmed generator. It
     reads the text the teacher was fine-tuned on: the teacher.finetune `data` overrides apply
     to the warm-up too (not the students' smaller transfer sets);
  3. the students: every method x seed, each its own `matekd train` run directory; with
     `transfer_sizes`, every method x seed x size N, each distilled on the first N training
     examples (data.max_train_examples = N: nested sets, 500 of them inside the 1000) in
     <out>/<task>/n<N>/<method>-seed<k>, while teacher and generator are prepared once per task.

Each run is a separate process (optionally under a launcher such as `deepspeed --num_gpus 8`),
logs to logs/<run>.log beside its run directory, and is skipped when its metrics.json says
"completed", so rerunning the same command resumes an interrupted sweep (an interrupted run
continues from its checkpoint). SIGTERM or Ctrl-C to the runner reaches the running job too: it
checkpoints and stops, and the runner exits with 128 + the signal. Order: teachers and generators
first, then seed by seed (within a seed, smaller transfer sets first), so that a sweep cut short
still covers every task. At the end: <out>/results.json (task -> method -> per-seed best dev
main metric, in percent), results.md (mean ± std, and the students' mean training time),
details.json (teacher scores, curves, times) and dev_curves.png. With `transfer_sizes`, each
task and size is its own row, `<task>@<N>` (sst2@1000), every size of a task with the same
teacher. `--only REGEX` runs part of a sweep (the runs whose label matches, with the teacher and
generator they need); the report still covers every finished run of the spec.

Spec (YAML):
    output_dir: runs/minilm-glue
    report_dir: runs/minilm-glue      # optional; where results.* go (default: output_dir)
    tasks: {sst2: {data: {path: ../shared/data/glue/SST-2, max_train_examples: 2000}}, ...}
           # the key names the task's directory and report row, and is the run config's `task`
           # unless its overrides say otherwise: subj: {task: custom, data: {train_file: ...}}
    methods: [ft, kd, matekd]
    seeds: [1, 2, 3]
    base: {...}                       # run-config keys shared by every run
    method_overrides: {matekd: {...}} # run-config keys per method
    teacher: {model: PATH, finetune: {...run-config keys of the teacher's ft run...}}
             # or finetuned: {sst2: PATH, ...} to skip fine-tuning
    generator: {model: PATH, mlm_warmup: {matekd: {generator_mlm_warmup_steps: 300}}}
               # needed by the matekd variants that use one: not by a variant whose base or
               # overrides say matekd.perturbation: random (random tokens, no generator)
    transfer_sizes: [500, 1000, 2000] # optional; students per size, e.g. with a teacher trained
                                      # on everything: teacher.finetune.data.max_train_examples: null
    extends: transfer_sets.yaml       # optional; this spec deep-merged over that one (path relative
                                      # to this file): mappings merge key by key, lists replace

The package, one job per module: spec.py reads a spec (extends:, ${VAR}, checks), plan.py turns it
into the ordered runs, runner.py runs them, report.py writes results.* and details.json from
their metrics.json, plot.py draws dev_curves.png.
"""

from __future__ import annotations

import re
import sys

from matekd_ds.errors import MatekdError

# aliased so that the name `plan` here stays the submodule, not its function
from matekd_ds.experiment.plan import plan as plan_runs
from matekd_ds.experiment.report import write_report
from matekd_ds.experiment.runner import SweepStopped, run_all
from matekd_ds.experiment.spec import read_spec

__all__ = ["main"]


def select(runs: list, only: str | None) -> list:
    """The runs whose label (`sst2/n1000/kd-seed1`, `subj/teacher`) matches the regular expression
    `only`, with the teacher and generator runs they need: part of a sweep, e.g. one task or one arm
    first. None: every run."""
    if only is None:
        return runs
    try:
        pattern = re.compile(only)
    except re.error as err:
        raise MatekdError(f"--only {only!r} is not a regular expression: {err}") from None
    chosen = {run.label for run in runs if pattern.search(run.label)}
    if not chosen:
        raise MatekdError(f"--only {only!r} matches none of the spec's runs (e.g. {runs[0].label})")
    needed = {f"{run.task}/{need}" for run in runs if run.label in chosen for need in run.needs}
    return [run for run in runs if run.label in chosen or run.label in needed]


def main(spec_path: str, dry_run: bool = False, launcher: str | None = None, report_only: bool = False,
         only: str | None = None) -> int:
    spec = read_spec(spec_path)
    runs = plan_runs(spec)
    selected = select(runs, only)
    if dry_run:
        for run in selected:
            state = "done" if run.completed() else "todo"
            print(f"[{state}] {run.label:28s} {run.command} -> {run.run_dir}")
        return 0
    try:
        problems = [] if report_only else run_all(selected, launcher)
    except SweepStopped as stop:
        print(f"matekd: {stop}", file=sys.stderr)
        return stop.exit_code
    write_report(spec, runs)  # every finished run of the spec, selected or not
    if problems:
        print("[experiment] not finished: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0
