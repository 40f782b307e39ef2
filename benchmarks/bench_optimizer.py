#!/usr/bin/env python
"""The student engine's backward and optimizer step at world size 1, per DeepSpeed config, on
the student of a benchmark preset as `matekd train` builds it (assembly.run_inputs, then
RunEngines.student: the product's build_engine).

    python benchmarks/bench_optimizer.py --preset gpu-base [--configs zero2,zero1,...]
        [--steps N] [--profile] [--no-save | --out-dir DIR] [KEY=VALUE ...]

Why: on an H200 (benchmarks/results/train_gpu-base_nvidia-h200_20261204.json) DeepSpeed's
ZeRO-2 bf16 step took 26.7 ms of a 90.4 ms student step where the eager reference's AdamW took
6.2 ms. The single-rank fast path (engines.single_rank_ds_config) then covered fp32 only. This
measured which engine a single-rank bf16 run should get (BF16_Optimizer, since), and what each
costs in accuracy.

Configs (default: all of these, in this order):
  zero2, zero1, zero0    DeepSpeed's own engine for the preset (deepspeed.single_rank_fast_path
                         false), with the run's precision as `matekd train` resolves it
  zero1+fp32-grads       the same for ZeRO-1 with data_types.grad_accum_dtype fp32: DeepSpeed's
                         BF16_Optimizer in bf16
  product                the run config's deepspeed.student with its single-rank fast path: the
                         engine `matekd train` trains with (bf16: BF16_Optimizer; fp32: ZeRO-0)
  torch-amp              no DeepSpeed: fp32 weights, autocast to the run's dtype, clip + fused
                         AdamW (the eager reference's optimizer)
Each config starts from the same weights and runs the same `--steps` batches with the same
dropout seeds: a KD-free student step (cross-entropy on random labels: the optimizer's cost does
not depend on the loss). Per config:
  backward_ms   median of engine.backward(loss) (forward excluded)
  step_ms       median of engine.step()
  peak_mib      peak allocated memory above the start (GPU only)
  drift         ‖θ − θ_first‖ / ‖θ_first − θ0‖ after the steps: how far this config's weights
                end from the first config's, relative to how far the first config moved them
                (0 = the same update; rounding in a different order shows as a few 1e-3)
  wrapper       the optimizer class DeepSpeed wrapped around AdamW
With --profile, torch.profiler's top operators (self CPU and self device time) of one step of
the first config. Printed last: `step_ms_<config>: X` per config; JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_train import load_preset, on_device, run_batches, with_random_rows
from harness import (
    REPO,
    RESULTS,
    device_slug,
    elapsed_ms,
    provenance,
    quiet_libraries,
    release_memory,
    save_json,
    synchronizer,
    today,
)

from matekd_ds.data.batching import model_inputs
from matekd_ds.errors import MatekdError

DEFAULT_CONFIGS = ("zero2", "zero1", "zero0", "zero1+fp32-grads", "product", "torch-amp")
PRODUCT = "product"
# data_types.grad_accum_dtype fp32 with ZeRO-1 and bf16: DeepSpeed picks BF16_Optimizer
FP32_GRADS = {"data_types": {"grad_accum_dtype": "fp32"}}
PLAIN_TORCH = "torch-amp"


@dataclasses.dataclass
class Measured:
    backward_ms: list[float]
    step_ms: list[float]
    losses: list[float]
    weights: torch.Tensor  # fp32, flat, after the steps
    peak_mib: float | None
    wrapper: str


def resolve_config(name: str, folder: Path) -> str:
    """A deepspeed.student value: `fp32-grads` stands for a JSON written to `folder`."""
    parts = []
    for part in name.split("+"):
        if part == "fp32-grads":
            path = folder / "fp32-grads.json"
            path.write_text(json.dumps(FP32_GRADS))
            part = str(path)
        parts.append(part)
    return "+".join(parts)


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters() if p.requires_grad])


def student_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**model_inputs(batch)).logits
    return F.cross_entropy(logits.float(), batch["labels"])


class PlainTorch:
    """The eager reference's optimizer: fp32 weights, autocast, clip_grad_norm_, fused AdamW, with
    the learning-rate schedule the student's engine gets."""

    def __init__(self, model, engines, dtype: torch.dtype | None, device):
        from matekd_ds.engines import build_optimizer, linear_schedule

        t = engines.cfg.train
        self.module, self.clip, self.dtype, self.device = model.to(device), t.clip, dtype, device
        self.optimizer = build_optimizer(model, t.lr, t.weight_decay, device.type == "cuda")
        total = max(1, engines.student_optimizer_steps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_schedule(total, int(t.warmup_ratio * total)))

    def __call__(self, **inputs):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.module(**inputs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_student(inputs, config: str, student: torch.nn.Module, device):
    from matekd_ds.ds_config import resolve_run_ds_configs
    from matekd_ds.engines import TORCH_DTYPES, RunEngines

    cfg = inputs.cfg
    if config == PLAIN_TORCH:
        engines = RunEngines(cfg, inputs.ds_configs, inputs.dtype, inputs.batches_per_epoch)
        return PlainTorch(student, engines, TORCH_DTYPES[inputs.dtype] if inputs.dtype != "fp32" else None, device)
    if config != PRODUCT:  # DeepSpeed's own engine for the named config
        cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, student=config,
                                                                     single_rank_fast_path=False))
    ds_configs, dtype = resolve_run_ds_configs(cfg, 1, with_teacher=False)
    return RunEngines(cfg, ds_configs, dtype, inputs.batches_per_epoch).student(student)


def measure(inputs, config: str, student, batches, device) -> Measured:
    engine = build_student(inputs, config, student, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    backward_ms, step_ms, losses = [], [], []
    for n, batch in enumerate(batches):
        torch.manual_seed(inputs.cfg.train.seed + n)  # the same dropout masks in every config
        loss = student_loss(engine, batch)
        backward_ms.append(elapsed_ms(partial(engine.backward, loss), device))
        step_ms.append(elapsed_ms(engine.step, device))
        losses.append(loss.item())
    peak = (torch.cuda.max_memory_allocated(device) - start) / 2**20 if device.type == "cuda" else None
    wrapper = type(getattr(engine, "optimizer", None)).__name__
    return Measured(backward_ms[1:], step_ms[1:], losses, flat_weights(engine.module), peak, wrapper)


def profile_steps(inputs, config: str, student, batches, device, rows: int = 15) -> dict[str, str]:
    """torch.profiler's top operators of one engine.step (after an untimed first step)."""
    from torch.profiler import ProfilerActivity, profile

    engine = build_student(inputs, config, student, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for n, batch in enumerate(batches[:2]):
        engine.backward(student_loss(engine, batch))
        if n == 0:
            engine.step()
            continue
        with profile(activities=activities) as prof:
            engine.step()
            synchronizer(device)()
    averages = prof.key_averages()
    tables = {"self_cpu": averages.table(sort_by="self_cpu_time_total", row_limit=rows)}
    if device.type == "cuda":
        tables["self_device"] = averages.table(sort_by="self_cuda_time_total", row_limit=rows)
    return tables


def summarise(measured: dict[str, Measured], initial: torch.Tensor) -> dict[str, dict]:
    first = next(iter(measured.values())).weights
    moved = (first - initial).norm().item()
    return {name: {"backward_ms": statistics.median(m.backward_ms), "step_ms": statistics.median(m.step_ms),
                   "peak_mib": m.peak_mib, "drift": (m.weights - first).norm().item() / max(moved, 1e-30),
                   "wrapper": m.wrapper, "losses": m.losses} for name, m in measured.items()}


def slug(config: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in config)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="comma-separated deepspeed.student values")
    parser.add_argument("--steps", type=int, default=12, help="steps per config (the first is not timed)")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler top operators of the first config's step")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    quiet_libraries()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.steps < 2 or not configs:
        raise SystemExit("bench_optimizer: error: --steps must be at least 2 and --configs non-empty")
    try:
        from matekd_ds.assembly import cut_student, run_inputs

        cfg = load_preset(args.preset, list(args.overrides))
        if cfg.train.dtype != "fp32" and device.type != "cuda":
            raise MatekdError(f"preset {args.preset} runs in {cfg.train.dtype}: it needs a GPU (or train.dtype=fp32)")
        inputs = run_inputs(dataclasses.replace(cfg, method="kd"))
        student = inputs.models.student
        if student is None:  # cut from the teacher, as build_run would
            student = cut_student(inputs, inputs.models.teacher)
        models = dataclasses.replace(inputs.models, student=student)
        inputs = with_random_rows(dataclasses.replace(inputs, models=models), args.steps)
        batches = on_device(run_batches(inputs, args.steps, pad_to_multiple=cfg.data.max_length), device)
        initial = flat_weights(student)
        with tempfile.TemporaryDirectory() as folder:
            resolved = {c: resolve_config(c, Path(folder)) for c in configs}
            measured, failed = {}, {}
            for name, config in resolved.items():
                try:
                    measured[name] = measure(inputs, config, copy.deepcopy(student).train(), batches, device)
                except Exception as exc:  # one engine DeepSpeed refuses must not cost the others' numbers
                    failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    print(f"[bench] {name}: failed: {failed[name]}", flush=True)
                release_memory(device)
            if not measured:
                raise MatekdError("every config failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
            tables = (profile_steps(inputs, resolved[configs[0]], copy.deepcopy(student).train(), batches, device)
                      if args.profile else {})
    except MatekdError as err:
        raise SystemExit(f"bench_optimizer: error: {err}") from None
    figures = summarise(measured, initial)
    millions = sum(p.numel() for p in student.parameters()) / 1e6
    print(f"[bench] {args.preset}, {device.type}, {inputs.dtype}, {millions:.1f}M student parameters, "
          f"batch {cfg.train.micro_batch_size} x {cfg.data.max_length}, {args.steps} steps")
    print(f"{'config':<22}{'wrapper':<26}{'backward ms':>12}{'step ms':>10}{'peak MiB':>10}{'drift':>10}")
    for name, f in figures.items():
        peak = f"{f['peak_mib']:.0f}" if f["peak_mib"] is not None else "n/a"
        print(f"{name:<22}{f['wrapper']:<26}{f['backward_ms']:>12.2f}{f['step_ms']:>10.2f}{peak:>10}{f['drift']:>10.2e}")
    for title, table in tables.items():
        print(f"\n[profile] {configs[0]} engine.step, sorted by {title}\n{table}")
    if not args.no_save:
        save_json(f"optimizer_{args.preset}_{device_slug(device)}_{today()}",
                  {**provenance(device, preset=args.preset), "config": cfg.to_dict(), "figures": figures,
                   "failed": failed, "profile": tables}, args.out_dir)
    for name, f in figures.items():
        print(f"step_ms_{slug(name)}: {f['step_ms']:.2f}")


if __name__ == "__main__":
    main()
