#!/usr/bin/env python
"""Per-rank memory (parameters, gradients, optimizer state) and throughput of MATE-KD training
against world size and ZeRO stage, and the ZeRO-3 teacher's parameter bytes per rank.

    python benchmarks/bench_scale.py --preset cpu|gpu [--worlds 1,2] [--stages 0,1,2,3]
        [--cycles N] [--out DIR | --no-save] [KEY=VALUE ...]

The preset is a run config, benchmarks/presets/scale-<preset>.yaml, and KEY=VALUE are run-config
overrides on top of it. For each world size W the script launches one `deepspeed --num_gpus W`
job (a plain process for W=1) of itself in worker mode; on a machine without GPUs the ranks are
CPU processes (gloo). The worker, for each ZeRO stage S, builds the run as `matekd train` does
(matekd_ds/assembly.py: run_inputs, then build_run) with deepspeed.student and
deepspeed.generator = zero<S> and, at stage 3, deepspeed.teacher = teacher-inference (a ZeRO-3
inference engine; below it the teacher is a plain frozen module); every model is built straight
into its partitions where its engine is ZeRO-3, with the same random weights on every rank; then:

* parameters: bytes each rank holds after the engines are built (matekd_ds.partition.param_bytes:
  a ZeRO-3 parameter counts its partition plus any full copy resident at that moment);
* gradients: bytes of gradient storage each rank holds right before the optimizer step (the
  engine's .step is wrapped): .grad tensors plus the ZeRO optimizer's gradient buffers and
  partitions, counted once per storage; DeepSpeed's reduction buckets (ipg_buffer, up to
  reduce_bucket_size elements: for a model smaller than a bucket, every gradient) apart;
* optimizer state: bytes after the first step: AdamW moments plus the fp32 master copies that
  ZeRO (or bf16) keeps, counted once per storage;
* the teacher as a ZeRO-3 inference engine, always, for its per-rank parameter bytes;
* throughput: `--cycles` MATE-KD cycles (the preset's n_G : n_S, 1 : 4) after one warm-up
  cycle on random-token rows drawn as the trainer draws them, global samples/s (every rank runs
  micro_batch_size examples per step).
On a GPU it also records torch.cuda.max_memory_allocated per stage.

Memory is the maximum over ranks. Output: a table, JSON and a plot (per-rank bytes and
throughput against world size, one line per stage). On a GPU they go to benchmarks/results/
by default; on a CPU only to a folder given with --out (CPU results are not committed), or
nowhere with --no-save. The last line printed is exactly
`teacher_param_bytes_ratio_2v1: X.XX` (the ZeRO-3 teacher's bytes per rank at 2 ranks over 1
rank; needs 1 and 2 in --worlds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from harness import RESULTS, device_slug, provenance, pyplot, release_memory, save_json, today

PRESETS = Path(__file__).resolve().parent / "presets"


@dataclass(frozen=True)
class ScaleSettings:
    """What a preset's measurement needs beyond its run config."""

    cycles: int
    worlds: tuple[int, ...]
    stages: tuple[int, ...]
    threads: int  # torch intra-op threads per rank, 0 = torch's default
    shard_mb: int  # shard size of the big teacher's checkpoint (the construction measurement)
    load_teacher: tuple[int, int, int, int, int]  # its layers, hidden, heads, ffn, vocabulary


SETTINGS = {
    "cpu": ScaleSettings(2, (1, 2), (0, 1, 2, 3), 1, 100, (8, 1024, 16, 4096, 8000)),  # 108M parameters, 433 MB in fp32
    "gpu": ScaleSettings(3, (1, 2, 4, 8), (0, 1, 2, 3), 0, 2000, (48, 1536, 16, 6144, 50265)),  # 1.4B parameters
}


def load_preset(name: str, overrides: list[str]):
    from matekd_ds.config import load_config

    return load_config(PRESETS / f"scale-{name}.yaml", overrides)


def stage_overrides(stage: int) -> list[str]:
    teacher = "teacher-inference" if stage == 3 else "none"
    return [f"deepspeed.student=zero{stage}", f"deepspeed.generator=zero{stage}", f"deepspeed.teacher={teacher}"]


# ---------------------------------------------------------------------------------------------
# Worker: one world size, every stage


def _storage_bytes(tensors) -> int:
    """Bytes of memory the tensors cover: for each storage, the union of the byte ranges its
    views cover (a flat buffer and views into it count once; a view counts its own extent, not
    its whole storage)."""
    spans: dict[tuple, list[tuple[int, int]]] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        start = t.storage_offset() * t.element_size()
        length = (t.numel() if t.is_contiguous() else t.untyped_storage().nbytes() // t.element_size()) \
            * t.element_size()
        spans.setdefault((t.device, t.untyped_storage().data_ptr()), []).append((start, start + length))
    total = 0
    for ranges in spans.values():
        ranges.sort()
        end = -1
        for a, b in ranges:
            if a >= end:
                total += b - a
            elif b > end:
                total += b - end
            end = max(end, b)
    return total


def _tensors_in(obj, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, depth + 1)


GRAD_ATTRS = ("averaged_gradients", "grad_partitions_flat_buffer", "ipg_buffer", "fp32_groups_gradients_flat",
              "fp32_groups_gradient_flat_partition", "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")
MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def grad_bytes(engine) -> dict[str, Any]:
    """Gradient storage: `grads` = .grad tensors and the ZeRO optimizer's gradient buffers and
    partitions, `buckets` = DeepSpeed's reduction staging (ipg_buffer), each storage once;
    `by_holder` = the same per holder (overlapping where they share storage)."""
    holders = {".grad": [p.grad for p in engine.module.parameters() if p.grad is not None]}
    for attr in GRAD_ATTRS:
        tensors = list(_tensors_in(getattr(engine.optimizer, attr, None)))
        if tensors:
            holders[attr.rsplit("__", 1)[-1]] = tensors
    buckets = holders.get("ipg_buffer", [])
    in_buckets = {(t.device, t.untyped_storage().data_ptr()) for t in buckets if t.numel()}
    rest = [t for k, ts in holders.items() if k != "ipg_buffer" for t in ts
            if t is not None and t.numel() and (t.device, t.untyped_storage().data_ptr()) not in in_buckets]
    return {"grads": _storage_bytes(rest), "buckets": _storage_bytes(buckets),
            "by_holder": {k: _storage_bytes(ts) for k, ts in holders.items()}}


def optimizer_bytes(engine) -> int:
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    tensors = list(_tensors_in(list(getattr(base, "state", {}).values())))
    for attr in MASTER_ATTRS:
        tensors.extend(_tensors_in(getattr(opt, attr, None)))
    return _storage_bytes(tensors)


def bert_config(shape: tuple[int, int, int, int, int]) -> Any:
    from transformers import BertConfig

    layers, hidden, heads, ffn, vocab_size = shape
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=ffn, max_position_embeddings=512, num_labels=2)


def save_sharded_teacher(settings: ScaleSettings, folder: Path) -> int:
    """The big teacher of the construction measurement, saved as several safetensors shards;
    returns its parameter bytes."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(bert_config(settings.load_teacher))
    model.save_pretrained(folder, max_shard_size=f"{settings.shard_mb}MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure_teacher_load(cfg, folder: Path) -> dict:
    """Host memory of building the ZeRO-3 (teacher-inference) teacher from its sharded
    checkpoint through the product's loader: peak RSS during construction minus RSS before."""
    from harness import PeakMemory, rss_bytes, trim_malloc
    from transformers import AutoModelForSequenceClassification

    from matekd_ds import distributed, models
    from matekd_ds.ds_config import finalize_teacher_ds_config, read_ds_config
    from matekd_ds.partition import param_bytes

    ds = finalize_teacher_ds_config(read_ds_config("teacher-inference"), micro_batch=cfg.train.micro_batch_size,
                                    world_size=distributed.world_size(), dtype=cfg.train.dtype)
    # warm-up: a tiny model of the same class through the same path, so that the code transformers
    # and DeepSpeed import on first use (about 200 MiB here) is not counted as the teacher's
    warm = folder.parent / "warm_up_teacher"
    if distributed.is_main():
        tiny = bert_config((1, 32, 2, 64, 64))
        AutoModelForSequenceClassification.from_config(tiny).save_pretrained(warm)
    distributed.barrier()
    models.load_classifier("teacher", str(warm), 2, None, False, zero3_config=ds)
    trim_malloc()
    before = rss_bytes()
    distributed.barrier()
    with PeakMemory(torch.device("cpu")) as peak:
        model = models.load_classifier("teacher", str(folder), 2, None, False, zero3_config=ds)
    distributed.barrier()
    held = param_bytes(model)
    after = rss_bytes()
    del model
    trim_malloc()
    return {"rss_before": before, "rss_peak_growth": peak.peak_extra, "rss_growth_after": after - before,
            "param_rank_bytes": held["rank_bytes"], "param_full_bytes": held["full_bytes"]}


def rank_batches(inputs, count: int) -> list[dict]:
    """This rank's first `count` micro-batches of random-token rows, drawn as the trainer draws
    them (every rank holds the same rows; rank r takes slice r of each global batch)."""
    from harness import random_token_rows

    from matekd_ds import distributed
    from matekd_ds.data.batching import TrainStream, collate, to_device

    cfg, tokenizer = inputs.cfg, inputs.tokenizer
    world, micro = distributed.world_size(), cfg.train.micro_batch_size
    vocab = models_vocab(inputs)
    rows = random_token_rows(count * world * micro, cfg.data.max_length, vocab, tokenizer.all_special_ids,
                             tokenizer.cls_token_id, tokenizer.sep_token_id, inputs.data.spec.num_labels,
                             seed=cfg.train.seed + 1, mean_fraction=0.75, sigma=0.2)
    stream = TrainStream.over(rows, micro, distributed.rank(), world, cfg.train.seed).batches()
    return rows, [to_device(collate(rows, next(stream), inputs.pad_id), distributed.device()) for _ in range(count)]


def models_vocab(inputs) -> int:
    from matekd_ds.inputs import structure
    from matekd_ds.models import vocab_size

    return vocab_size(structure(inputs.models.generator))


def measure_stage(base_overrides: list[str], preset: str, settings: ScaleSettings, stage: int, device) -> dict:
    from harness import PeakMemory, rss_bytes, trim_malloc

    from matekd_ds import distributed
    from matekd_ds.assembly import build_run, run_engines, run_inputs
    from matekd_ds.partition import param_bytes
    from matekd_ds.trainer import micro_seeds

    cfg = load_preset(preset, [*base_overrides, *stage_overrides(stage)])
    world, cycle = distributed.world_size(), cfg.matekd.generator_steps + cfg.matekd.student_steps
    trim_malloc()
    rss_start = rss_bytes()
    construction = PeakMemory(torch.device("cpu")).__enter__()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    inputs = run_inputs(cfg)
    rows, batches = rank_batches(inputs, cycle)
    inputs = dataclasses.replace(inputs, train=rows)
    _, method = build_run(inputs)
    student, generator, teacher = method.student, method.generator, method.teacher
    memory: dict[str, dict[str, int]] = {role: {"params": param_bytes(module)["rank_bytes"]}
                                         for role, module in (("teacher", teacher.module), ("student", student.module),
                                                              ("generator", generator.module))}
    memory["teacher"]["full"] = param_bytes(teacher.module)["full_bytes"]

    # gradients right before the first optimizer step, optimizer state right after it
    for role, engine in (("student", student), ("generator", generator)):
        original = engine.step

        def step(*args, _role=role, _engine=engine, _original=original, **kwargs):
            if "grads" not in memory[_role]:
                found = grad_bytes(_engine)
                memory[_role]["grads"], memory[_role]["grad_buckets"] = found["grads"], found["buckets"]
                memory[_role]["grads_by_holder"] = found["by_holder"]
            out = _original(*args, **kwargs)
            memory[_role].setdefault("optimizer", optimizer_bytes(_engine))
            return out

        engine.step = step
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_cycle(method, start: int) -> None:  # method passed in: it is deleted below
        for i, batch in enumerate(batches):
            step = start + i
            method.train_step([batch], step, micro_seeds(cfg.train.seed, "student", step, distributed.rank(), 1))

    construction.__exit__(None, None, None)
    rss_built = rss_bytes()
    with PeakMemory(torch.device("cpu")) as training:
        run_cycle(method, 0)  # warm-up; also fills the memory figures
        sync()
        distributed.barrier()
        started = time.perf_counter()
        for c in range(settings.cycles):
            run_cycle(method, (c + 1) * cycle)
        sync()
        distributed.barrier()
        seconds = time.perf_counter() - started
    steps = settings.cycles * cycle
    # what stays resident between steps (ZeRO-3: partitions plus any full copy still gathered)
    teacher.release()  # as after every generator step
    for role, module in (("teacher", teacher.module), ("student", student.module), ("generator", generator.module)):
        memory[role]["params_between_steps"] = param_bytes(module)["rank_bytes"]
    memory["host"] = {"rss_construction_peak_growth": construction.peak_extra,
                      "rss_training_peak_growth": rss_built - rss_start + training.peak_extra}
    out = {
        "stage": stage, "world_size": world, "memory": memory,
        "samples_per_s": steps * cfg.train.micro_batch_size * world / seconds, "step_seconds": seconds / steps,
        "peak_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    # the ZeRO-3 teacher's bytes per rank, whatever the stage of the trained engines
    if teacher.engine is None:
        probe_inputs = run_inputs(load_preset(preset, [*base_overrides, "deepspeed.teacher=teacher-inference"]))
        probe = run_engines(probe_inputs).frozen_teacher(probe_inputs.models.teacher, device)
        out["teacher_zero3_rank_bytes"] = param_bytes(probe.module)["rank_bytes"]  # at rest: no steps here
        probe.engine.destroy()
        del probe, probe_inputs
    else:
        out["teacher_zero3_rank_bytes"] = memory["teacher"]["params_between_steps"]
    for engine in (student, generator, teacher.engine):
        if engine is not None:
            engine.destroy()
    del method, student, generator, teacher, inputs
    release_memory(device)
    return out


@dataclass(frozen=True)
class Job:
    """What the driver hands every world's worker: the preset, its overrides, the settings and
    the big teacher's checkpoint."""

    preset: str
    overrides: list[str]
    settings: ScaleSettings
    load_teacher_dir: str

    @classmethod
    def from_json(cls, text: str) -> Job:
        data = json.loads(text)
        return cls(data["preset"], data["overrides"], ScaleSettings(**{
            k: tuple(v) if isinstance(v, list) else v for k, v in data["settings"].items()}), data["load_teacher_dir"])


def worker(job: Job, out: Path) -> None:
    from matekd_ds import distributed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    if job.settings.threads:
        torch.set_num_threads(job.settings.threads)
    distributed.init()
    device = distributed.device()
    load = measure_teacher_load(load_preset(job.preset, job.overrides), Path(job.load_teacher_dir))
    per_rank = distributed.gather_objects(load)
    results = {"teacher_load": {key: max(r[key] for r in per_rank) for key in load} | {"per_rank": per_rank},
               "stages": []}
    for stage in job.settings.stages:
        result = measure_stage(job.overrides, job.preset, job.settings, stage, device)
        # the maximum over ranks of every byte count
        gathered = distributed.gather_objects(result)
        for role in result["memory"]:
            for key, value in result["memory"][role].items():
                if isinstance(value, int):
                    result["memory"][role][key] = max(r["memory"][role][key] for r in gathered)
        result["teacher_zero3_rank_bytes"] = max(r["teacher_zero3_rank_bytes"] for r in gathered)
        results["stages"].append(result)
        if distributed.is_main():
            print(f"[bench] world {result['world_size']} stage {stage}: {result['samples_per_s']:.1f} samples/s",
                  flush=True)
    if distributed.is_main():
        out.write_text(json.dumps(results, indent=2))
    distributed.shutdown()


# ---------------------------------------------------------------------------------------------
# Driver


def launch_world(job: Job, world: int, folder: Path) -> dict:
    job_path, out = folder / f"job_{world}.json", folder / f"world_{world}.json"
    job_path.write_text(json.dumps(dataclasses.asdict(job)))
    script = [str(Path(__file__).resolve()), "--worker", str(job_path), str(out)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if world == 1:
        command = [sys.executable, *script]
    else:
        from matekd_ds.distributed import _free_port

        launcher = str(Path(sys.executable).parent / "deepspeed")
        command = [launcher, "--num_gpus", str(world), "--master_port", str(_free_port()), *script]
    print(f"[bench] world size {world}: {' '.join(command)}", flush=True)
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"[bench] the world-size-{world} run failed (exit {proc.returncode})")
    for line in proc.stdout.splitlines():
        if line.startswith("[bench]"):
            print(line, flush=True)
    return json.loads(out.read_text())


def print_load_table(loads: dict[int, dict], teacher_bytes: int) -> None:
    print(f"building the ZeRO-3 teacher from its sharded checkpoint ({teacher_bytes / 2**20:.0f} MiB of parameters); "
          "per-rank MiB, max over ranks: RSS peak growth during construction, RSS growth after it, parameters held")
    print(f"{'W':>3} {'RSS peak':>10} {'RSS after':>10} {'params':>10} {'peak / teacher':>15}")
    for world, load in sorted(loads.items()):
        print(f"{world:>3} {mib(load['rss_peak_growth']):>10} {mib(load['rss_growth_after']):>10} "
              f"{mib(load['param_rank_bytes']):>10} {load['rss_peak_growth'] / teacher_bytes:>15.2f}")


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def print_table(rows: list[dict]) -> None:
    print("per-rank MiB (max over ranks): p = parameters after building, p' = parameters resident between "
          "steps, g = gradients before the optimizer step, b = reduction buckets, o = optimizer state after it")
    head = ("W", "ZeRO", "student p/p'/g/b/o", "generator p/p'/g/b/o", "teacher p/p'", "samples/s")
    print(f"{head[0]:>3} {head[1]:>5} {head[2]:>32} {head[3]:>32} {head[4]:>14} {head[5]:>10}")
    for r in rows:
        m = r["memory"]

        def cols(role, keys, m=m):
            return "/".join(mib(m[role].get(k)) for k in keys)

        full = ("params", "params_between_steps", "grads", "grad_buckets", "optimizer")
        print(f"{r['world_size']:>3} {r['stage']:>5} {cols('student', full):>32} {cols('generator', full):>32} "
              f"{cols('teacher', full[:2]):>14} {r['samples_per_s']:>10.1f}")


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    stages = sorted({r["stage"] for r in rows})
    panels = [("student params", lambda r: r["memory"]["student"]["params"]),
              ("student grads", lambda r: r["memory"]["student"].get("grads", 0)),
              ("student optimizer state", lambda r: r["memory"]["student"].get("optimizer", 0)),
              ("teacher params", lambda r: r["memory"]["teacher"]["params_between_steps"]),
              ("samples/s (global)", lambda r: r["samples_per_s"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (title, value) in zip(axes, panels):
        for stage in stages:
            points = sorted((r["world_size"], value(r)) for r in rows if r["stage"] == stage)
            scale = 1 if "samples" in title else 1 / 2**20
            ax.plot([w for w, _ in points], [v * scale for _, v in points], marker="o", label=f"ZeRO-{stage}")
        ax.set_title(title if "samples" in title else f"{title}, MiB per rank", fontsize=9)
        ax.set_xlabel("world size")
        ax.set_xticks(sorted({r["world_size"] for r in rows}))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"[bench] plot: {path}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(SETTINGS), default="cpu",
                        help="benchmarks/presets/scale-<preset>.yaml, a run config")
    parser.add_argument("--worlds", help="comma-separated world sizes (default: the preset's, capped at the GPUs)")
    parser.add_argument("--stages", help="comma-separated ZeRO stages (default 0,1,2,3)")
    parser.add_argument("--cycles", type=int, help="timed MATE-KD cycles per stage")
    parser.add_argument("--out", type=Path, help="folder for the JSON and plot (default on a GPU: benchmarks/results/)")
    parser.add_argument("--no-save", action="store_true", help="print only; write no JSON or plot")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(Job.from_json(Path(args.worker[0]).read_text()), Path(args.worker[1]))
        return
    from matekd_ds.errors import MatekdError

    try:
        cfg = load_preset(args.preset, args.overrides)  # a bad override: one line, before any rank starts
    except MatekdError as err:
        raise SystemExit(f"bench_scale: error: {err}") from None
    settings = SETTINGS[args.preset]
    on_gpu = torch.cuda.is_available()
    worlds = tuple(int(w) for w in args.worlds.split(",")) if args.worlds else \
        tuple(w for w in settings.worlds if not on_gpu or w <= torch.cuda.device_count())
    stages = tuple(int(s) for s in args.stages.split(",")) if args.stages else settings.stages
    settings = dataclasses.replace(settings, worlds=worlds, stages=stages,
                                   cycles=settings.cycles if args.cycles is None else args.cycles)
    if cfg.train.dtype != "fp32" and not on_gpu:
        raise SystemExit(f"preset {args.preset} runs in {cfg.train.dtype}: it needs a GPU (use --preset cpu)")
    out_dir = None if args.no_save else (args.out or (RESULTS if on_gpu else None))
    if not args.no_save and out_dir is None:
        raise SystemExit("on a CPU give --out DIR (CPU results are not committed under benchmarks/results/) "
                         "or --no-save")
    rows: list[dict] = []
    loads: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "load_teacher"
        teacher_bytes = save_sharded_teacher(settings, checkpoint)
        job = Job(args.preset, list(args.overrides), settings, str(checkpoint))
        print(f"[bench] sharded teacher checkpoint: {teacher_bytes / 2**20:.0f} MiB in "
              f"{len(list(checkpoint.glob('*.safetensors')))} safetensors shards", flush=True)
        for world in settings.worlds:
            result = launch_world(job, world, Path(tmp))
            rows.extend(result["stages"])
            loads[world] = result["teacher_load"]
    print_table(rows)
    print_load_table(loads, teacher_bytes)
    by_world = {r["world_size"]: r["teacher_zero3_rank_bytes"] for r in rows}
    ratio = by_world[2] / by_world[1] if 1 in by_world and 2 in by_world else float("nan")
    rss_ratio = (loads[2]["rss_peak_growth"] / loads[1]["rss_peak_growth"]) if 1 in loads and 2 in loads \
        else float("nan")
    payload = {
        **provenance(preset=args.preset), "config": cfg.to_dict(), "settings": dataclasses.asdict(settings),
        "rows": rows, "teacher_zero3_rank_bytes_by_world": by_world, "teacher_param_bytes_ratio_2v1": ratio,
        "teacher_load": {"checkpoint_param_bytes": teacher_bytes, "by_world": loads},
        "teacher_load_peak_rss_ratio_2v1": rss_ratio,
    }
    if out_dir is not None:
        path = save_json(f"scale_{args.preset}_{device_slug()}_{today()}", payload, out_dir)
        plot(rows, path.with_suffix(".png"))
    print(f"teacher_param_bytes_ratio_2v1: {ratio:.2f}")
    print(f"teacher_load_peak_rss_ratio_2v1: {rss_ratio:.2f}")


if __name__ == "__main__":
    main()
