#!/usr/bin/env python
"""Per-rank memory (parameters, gradients, optimizer state) and throughput of MATE-KD training
against world size and ZeRO stage, and the ZeRO-3 teacher's parameter bytes per rank.

    python benchmarks/bench_scale.py --preset cpu|gpu [--worlds 1,2] [--stages 0,1,2,3]
        [--cycles N] [--out DIR | --no-save] [KEY=VALUE ...]

For each world size W the script launches one `deepspeed --num_gpus W` job (a plain process for
W=1) of itself in worker mode; on a machine without GPUs the ranks are CPU processes (gloo). The
worker, for each ZeRO stage S, builds the student and generator engines at stage S (same random
weights on every rank) and the teacher (a plain frozen module below stage 3; at stage 3 a ZeRO-3
inference engine, deepspeed.teacher=teacher-inference), then:

* parameters: bytes each rank holds after the engines are built (matekd_ds.partition.param_bytes:
  a ZeRO-3 parameter counts its partition plus any full copy resident at that moment);
* gradients: bytes of gradient storage each rank holds right before the optimizer step (the
  engine's .step is wrapped): .grad tensors plus the ZeRO optimizer's gradient buffers and
  partitions, counted once per storage; DeepSpeed's reduction buckets (ipg_buffer, up to
  reduce_bucket_size elements: for a model smaller than a bucket, every gradient) apart;
* optimizer state: bytes after the first step: AdamW moments plus the fp32 master copies that
  ZeRO (or bf16) keeps, counted once per storage;
* the teacher as a ZeRO-3 inference engine, always, for its per-rank parameter bytes;
* throughput: `--cycles` MATE-KD cycles (1 generator : 4 student steps) after one warm-up
  cycle, global samples/s (every rank runs micro_batch_size examples per step).
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
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from harness import RESULTS, apply_overrides, device_slug, provenance, pyplot, release_memory, save_json, today

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "models": {"vocab_size": 8000, "teacher": [4, 256, 4, 1024], "student": [2, 128, 2, 512],
                   "generator": [2, 128, 2, 512],  # layers, hidden, heads, ffn
                   "load_teacher": [8, 1024, 16, 4096]},  # 108M parameters, 433 MB in fp32
        "train": {"micro_batch_size": 8, "seq_len": 64, "dtype": "fp32", "lr": 1e-4, "clip": 5.0},
        "bench": {"cycles": 2, "worlds": [1, 2], "stages": [0, 1, 2, 3], "threads": 1, "shard_mb": 100},
    },
    "gpu": {
        "models": {"vocab_size": 50265, "teacher": [24, 1024, 16, 4096], "student": [6, 768, 12, 3072],
                   "generator": [6, 768, 12, 3072],  # roberta-large teacher, distilroberta-size student
                   "load_teacher": [48, 1536, 16, 6144]},  # 1.4B parameters
        "train": {"micro_batch_size": 32, "seq_len": 128, "dtype": "bf16", "lr": 2e-5, "clip": 5.0},
        "bench": {"cycles": 3, "worlds": [1, 2, 4, 8], "stages": [0, 1, 2, 3], "threads": 0, "shard_mb": 2000},
    },
}
SPECIAL = {"pad": 0, "cls": 1, "sep": 2, "mask": 3}
N_G, N_S = 1, 4  # generator : student steps per timed cycle


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
        length = (t.numel() if t.is_contiguous() else t.untyped_storage().nbytes() // t.element_size()) * t.element_size()
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


def bert_config(config: dict, shape):
    from transformers import BertConfig

    layers, hidden, heads, ffn = shape
    return BertConfig(vocab_size=config["models"]["vocab_size"], hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=ffn, pad_token_id=SPECIAL["pad"],
                      max_position_embeddings=512, num_labels=2)


def build_models(config: dict, zero3: dict | None = None) -> dict:
    """Random-weight teacher, student and generator. `zero3`: role -> the ZeRO-3 config to build
    that model straight into its partitions with (the product's path for ZeRO-3 models)."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    from matekd_ds.zero3_load import build_partitioned, init_missing

    m, zero3 = config["models"], zero3 or {}
    classes = {"teacher": AutoModelForSequenceClassification, "student": AutoModelForSequenceClassification,
               "generator": AutoModelForMaskedLM}
    torch.manual_seed(0)  # the same weights on every rank
    out = {}
    for role, auto in classes.items():
        factory = (lambda a=auto, r=role: a.from_config(bert_config(config, m[r])))
        if role in zero3:
            out[role] = build_partitioned(factory, zero3[role])
            init_missing(out[role], [name for name, _ in out[role].named_parameters()])
        else:
            out[role] = factory()
    return out


def save_sharded_teacher(config: dict, folder: Path) -> int:
    """The big teacher of the construction measurement, saved as several safetensors shards;
    returns its parameter bytes."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(bert_config(config, config["models"]["load_teacher"]))
    model.save_pretrained(folder, max_shard_size=f"{config['bench']['shard_mb']}MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure_teacher_load(config: dict, folder: Path) -> dict:
    """Host memory of building the ZeRO-3 (teacher-inference) teacher from its sharded
    checkpoint through the product's loader: peak RSS during construction minus RSS before."""
    from harness import PeakMemory, rss_bytes, trim_malloc
    from transformers import AutoModelForSequenceClassification

    from matekd_ds import distributed, models
    from matekd_ds.ds_config import finalize_teacher_ds_config, read_ds_config
    from matekd_ds.partition import param_bytes

    t = config["train"]
    ds = finalize_teacher_ds_config(read_ds_config("teacher-inference"), micro_batch=t["micro_batch_size"],
                                    world_size=distributed.world_size(), dtype=t["dtype"])
    # warm-up: a tiny model of the same class through the same path, so that the code transformers
    # and DeepSpeed import on first use (about 200 MiB here) is not counted as the teacher's
    warm = folder.parent / "warm_up_teacher"
    if distributed.is_main():
        tiny = bert_config(config, [1, 32, 2, 64])
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


def make_batches(config: dict, n: int, rank: int, device) -> list[dict]:
    t, vocab = config["train"], config["models"]["vocab_size"]
    g = torch.Generator().manual_seed(1000 + rank)
    batches = []
    for i in range(n):
        b, seq = t["micro_batch_size"], t["seq_len"]
        lengths = torch.randint(seq // 2, seq + 1, (b,), generator=g)
        ids = torch.randint(len(SPECIAL), vocab, (b, seq), generator=g)
        attention = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids[:, 0] = SPECIAL["cls"]
        ids[torch.arange(b), lengths - 1] = SPECIAL["sep"]
        ids = ids.masked_fill(attention == 0, SPECIAL["pad"])
        batch = {"input_ids": ids, "attention_mask": attention, "labels": torch.randint(0, 2, (b,), generator=g),
                 "index": torch.arange(i * b, (i + 1) * b)}
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def measure_stage(config: dict, stage: int, device) -> dict:
    from matekd_ds import distributed
    from matekd_ds.ds_config import finalize_ds_config, finalize_teacher_ds_config, read_ds_config
    from matekd_ds.engines import EngineSpec, build_engine, build_teacher_engine, place_frozen_teacher
    from matekd_ds.methods import MateKD
    from matekd_ds.partition import param_bytes
    from matekd_ds.perturb import Perturber
    from matekd_ds.teacher import Teacher

    from harness import PeakMemory, rss_bytes, trim_malloc

    t = config["train"]
    world, dtype = distributed.world_size(), t["dtype"]
    spec = f"zero{stage}" + ("+bf16" if dtype == "bf16" else "+fp16" if dtype == "fp16" else "")

    def ds(clip):
        return finalize_ds_config(read_ds_config(spec), micro_batch=t["micro_batch_size"], grad_accum=1,
                                  world_size=world, clip=clip, dtype=dtype, zero_stage=None)

    teacher_ds = finalize_teacher_ds_config(read_ds_config("teacher-inference"), micro_batch=t["micro_batch_size"],
                                            world_size=world, dtype=dtype)
    trim_malloc()
    rss_start = rss_bytes()
    construction = PeakMemory(torch.device("cpu")).__enter__()
    zero3 = {"teacher": teacher_ds, "student": ds(t["clip"]), "generator": ds(t["clip"])} if stage == 3 else None
    models = build_models(config, zero3)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    never = 10**9
    student = build_engine(models["student"], EngineSpec("student", ds(t["clip"]), t["lr"], 0.01, never))
    generator = build_engine(models["generator"], EngineSpec("generator", ds(t["clip"]), t["lr"], 0.0, never,
                                                             schedule="constant"))
    teacher_engine = None
    if stage == 3:
        teacher_engine = build_teacher_engine(models["teacher"], teacher_ds)
        teacher = teacher_engine.module
    else:
        teacher = place_frozen_teacher(models["teacher"], dtype, device)
    memory: dict[str, dict[str, int]] = {role: {"params": param_bytes(module)["rank_bytes"]}
                                         for role, module in (("teacher", teacher), ("student", student.module),
                                                              ("generator", generator.module))}
    memory["teacher"]["full"] = param_bytes(teacher)["full_bytes"]

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
    perturber = Perturber(sorted(SPECIAL.values()), SPECIAL["mask"], 0.3, 1.0)
    project_teacher = Teacher(teacher, engine=teacher_engine)
    method = MateKD(student, generator, project_teacher, perturber, regression=False,
                    temperature=1.0, loss_weights=[1 / 3] * 3, generator_steps=N_G, student_steps=N_S)
    cycle = N_G + N_S
    batches = make_batches(config, cycle, distributed.rank(), device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_cycle(start: int) -> None:
        for i, batch in enumerate(batches):
            step = start + i
            method.train_step([batch], step, [step * 7919 + distributed.rank()])

    construction.__exit__(None, None, None)
    rss_built = rss_bytes()
    with PeakMemory(torch.device("cpu")) as training:
        run_cycle(0)  # warm-up; also fills the memory figures
        sync()
        distributed.barrier()
        started = time.perf_counter()
        for c in range(config["bench"]["cycles"]):
            run_cycle((c + 1) * cycle)
        sync()
        distributed.barrier()
        seconds = time.perf_counter() - started
    steps = config["bench"]["cycles"] * cycle
    # what stays resident between steps (ZeRO-3: partitions plus any full copy still gathered)
    project_teacher.release()  # as after every generator step
    for role, module in (("teacher", teacher), ("student", student.module), ("generator", generator.module)):
        memory[role]["params_between_steps"] = param_bytes(module)["rank_bytes"]
    memory["host"] = {"rss_construction_peak_growth": construction.peak_extra,
                      "rss_training_peak_growth": rss_built - rss_start + training.peak_extra}
    out = {
        "stage": stage, "world_size": world, "memory": memory,
        "samples_per_s": steps * t["micro_batch_size"] * world / seconds, "step_seconds": seconds / steps,
        "peak_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    # the ZeRO-3 teacher's bytes per rank, whatever the stage of the trained engines
    if teacher_engine is None:
        probe = build_teacher_engine(build_models(config, {"teacher": teacher_ds})["teacher"], teacher_ds)
        out["teacher_zero3_rank_bytes"] = param_bytes(probe.module)["rank_bytes"]  # at rest: no steps here
        probe.destroy()
    else:
        out["teacher_zero3_rank_bytes"] = memory["teacher"]["params_between_steps"]
    for engine in (student, generator, teacher_engine):
        if engine is not None:
            engine.destroy()
    del method, student, generator, teacher, project_teacher, teacher_engine, models
    release_memory(device)
    return out


def worker(config: dict, out: Path) -> None:
    from matekd_ds import distributed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    if config["bench"]["threads"]:
        torch.set_num_threads(config["bench"]["threads"])
    distributed.init()
    device = distributed.device()
    load = measure_teacher_load(config, Path(config["bench"]["load_teacher_dir"]))
    per_rank = distributed.gather_objects(load)
    results = {"teacher_load": {key: max(r[key] for r in per_rank) for key in load} | {"per_rank": per_rank},
               "stages": []}
    for stage in config["bench"]["stages"]:
        result = measure_stage(config, stage, device)
        # the maximum over ranks of every byte count
        gathered = distributed.gather_objects(result)
        for role in result["memory"]:
            for key, value in result["memory"][role].items():
                if isinstance(value, int):
                    result["memory"][role][key] = max(r["memory"][role][key] for r in gathered)
        result["teacher_zero3_rank_bytes"] = max(r["teacher_zero3_rank_bytes"] for r in gathered)
        results["stages"].append(result)
        if distributed.is_main():
            print(f"[bench] world {result['world_size']} stage {stage}: {result['samples_per_s']:.1f} samples/s", flush=True)
    if distributed.is_main():
        out.write_text(json.dumps(results, indent=2))
    distributed.shutdown()


# ---------------------------------------------------------------------------------------------
# Driver


def launch_world(config: dict, world: int, folder: Path) -> dict:
    cfg_path, out = folder / f"config_{world}.json", folder / f"world_{world}.json"
    cfg_path.write_text(json.dumps(config))
    script = [str(Path(__file__).resolve()), "--worker", str(cfg_path), str(out)]
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
        cols = lambda role, keys: "/".join(mib(m[role].get(k)) for k in keys)  # noqa: E731
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
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--worlds", help="comma-separated world sizes (default: the preset's, capped at the GPUs)")
    parser.add_argument("--stages", help="comma-separated ZeRO stages (default 0,1,2,3)")
    parser.add_argument("--cycles", type=int, help="timed MATE-KD cycles per stage")
    parser.add_argument("--out", type=Path, help="folder for the JSON and plot (default on a GPU: benchmarks/results/)")
    parser.add_argument("--no-save", action="store_true", help="print only; write no JSON or plot")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker[0]).read_text()), Path(args.worker[1]))
        return
    config = apply_overrides(PRESETS[args.preset], args.overrides)
    on_gpu = torch.cuda.is_available()
    if args.worlds:
        config["bench"]["worlds"] = [int(w) for w in args.worlds.split(",")]
    elif on_gpu:
        config["bench"]["worlds"] = [w for w in config["bench"]["worlds"] if w <= torch.cuda.device_count()]
    if args.stages:
        config["bench"]["stages"] = [int(s) for s in args.stages.split(",")]
    if args.cycles is not None:
        config["bench"]["cycles"] = args.cycles
    if config["train"]["dtype"] != "fp32" and not on_gpu:
        raise SystemExit(f"preset {args.preset} runs in {config['train']['dtype']}: it needs a GPU (use --preset cpu)")
    out_dir = None if args.no_save else (args.out or (RESULTS if on_gpu else None))
    if not args.no_save and out_dir is None:
        raise SystemExit("on a CPU give --out DIR (CPU results are not committed under benchmarks/results/) or --no-save")
    rows: list[dict] = []
    loads: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "load_teacher"
        teacher_bytes = save_sharded_teacher(config, checkpoint)
        config["bench"]["load_teacher_dir"] = str(checkpoint)
        print(f"[bench] sharded teacher checkpoint: {teacher_bytes / 2**20:.0f} MiB in "
              f"{len(list(checkpoint.glob('*.safetensors')))} safetensors shards", flush=True)
        for world in config["bench"]["worlds"]:
            result = launch_world(config, world, Path(tmp))
            rows.extend(result["stages"])
            loads[world] = result["teacher_load"]
    print_table(rows)
    print_load_table(loads, teacher_bytes)
    by_world = {r["world_size"]: r["teacher_zero3_rank_bytes"] for r in rows}
    ratio = by_world[2] / by_world[1] if 1 in by_world and 2 in by_world else float("nan")
    rss_ratio = (loads[2]["rss_peak_growth"] / loads[1]["rss_peak_growth"]) if 1 in loads and 2 in loads else float("nan")
    payload = {
        **provenance(preset=args.preset), "config": config,
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
