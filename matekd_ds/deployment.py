"""The numbers a distilled student exists for: how much smaller and faster than its teacher it
is, and how much of the teacher's accuracy it keeps. `matekd train` records them in
metrics.json as "deployment" (rank 0 measures, once the student is exported); `matekd eval RUN
--latency` measures them again on the machine it runs on.

    student_params, teacher_params       parameter counts (teacher: null when the run has none)
    student_bytes, teacher_bytes         the weight files on disk (a teacher without a folder of
                                         its own, e.g. an untrained builtin: its tensors' bytes
                                         when it was loaded, else null)
    latency_ms                           the student's, {"batch_1": {"p50", "p90", "n"}, "batch_32": ...}
    teacher_latency_ms                   the teacher's, measured the same way
    throughput_per_s, teacher_throughput_per_s   examples per second at the p50 latency, per batch
    speedup_vs_teacher                   teacher p50 / student p50 at batch 32
    params_ratio                         teacher params / student params
    accuracy_kept                        student / teacher dev main metric (first dev split)
    settings                             what the times mean: CPU name, torch threads, fp32, the
                                         run's max length, warm-up and timed iterations
    teacher_not_timed                    why the teacher has no latency (a ZeRO-3 teacher: see for_run)

With eval.deployment_latency false only sizes are recorded, and no model is loaded again.

Latency is CPU inference in fp32 on full-length rows (data.max_length, every position real), a
forward only (no tokenization), after warm-up iterations, p50 and p90 over the timed ones. The
number of threads is torch's at the time (torch.get_num_threads()): a run started with
OMP_NUM_THREADS=1 per rank measures one thread.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

BATCH_SIZES = (1, 32)
SPEEDUP_BATCH = 32  # speedup_vs_teacher compares the p50 latencies at this batch size
MIN_TIMED = 3  # a measurement that runs out of budget still times at least this many forwards
BUDGET_SECONDS = 10.0  # per model and batch size: a large model stops timing early (`n` says how many)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# ---------------------------------------------------------------------------------------------
# Size


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_bytes(folder: str | Path) -> int:
    """Bytes of a model folder's weight files (tokenizer, config and card not counted)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights in memory, each tensor once (tied weights share one)."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict().values():
        seen.setdefault(tensor.untyped_storage().data_ptr(), tensor.numel() * tensor.element_size())
    return sum(seen.values())


def model_bytes(model: nn.Module, spec: str) -> int:
    """The weight files of `spec` when it is a folder holding some, else the tensors' bytes."""
    folder = Path(spec).expanduser()
    on_disk = weights_bytes(folder) if folder.is_dir() else 0
    return on_disk or tensor_bytes(model)


# ---------------------------------------------------------------------------------------------
# Latency


def full_length_inputs(vocab_size: int, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`batch` rows of `length` token ids (fixed seed: every model sees the same rows), no padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def forward_seconds(model: nn.Module, inputs: dict[str, torch.Tensor], warmup: int, iterations: int,
                    budget_s: float = BUDGET_SECONDS) -> list[float]:
    """Seconds per forward over `iterations` timed forwards after `warmup` untimed ones (caches,
    allocator, thread pool). `budget_s` bounds both for a large model: warm-up stops after one
    forward past half of it, timing after MIN_TIMED forwards past all of it. Sorted."""
    started = time.perf_counter()
    for _ in range(warmup):
        model(**inputs)
        if time.perf_counter() - started > budget_s / 2:
            break
    times: list[float] = []
    for _ in range(iterations):
        begin = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - begin)
        if len(times) >= MIN_TIMED and time.perf_counter() - started > budget_s:
            break
    return sorted(times)


def percentile(sorted_times: list[float], q: float) -> float:
    """The nearest-rank percentile (q in (0, 1]) of ascending values: one that was measured."""
    rank = max(1, math.ceil(q * len(sorted_times)))
    return sorted_times[rank - 1]


def latency_ms(sorted_times: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(sorted_times, 0.5) * 1e3, 4), "p90": round(percentile(sorted_times, 0.9) * 1e3, 4),
            "n": len(sorted_times)}


def throughput(batch: int, p50_ms: float) -> float:
    """Examples per second at batch size `batch`, one forward taking p50_ms."""
    return round(batch / (p50_ms / 1e3), 2) if p50_ms > 0 else math.inf


def measure_latency(model: nn.Module, length: int, warmup: int, iterations: int) -> dict[str, dict[str, Any]]:
    """{"latency_ms": {"batch_B": {p50, p90, n}}, "throughput_per_s": {"batch_B": examples/s}}
    for each of BATCH_SIZES, on the CPU in fp32."""
    model = model.float().eval().to("cpu")
    vocab = model.get_input_embeddings().weight.shape[0]
    latency, speed = {}, {}
    for batch in BATCH_SIZES:
        times = forward_seconds(model, full_length_inputs(vocab, batch, length), warmup, iterations)
        latency[f"batch_{batch}"] = latency_ms(times)
        speed[f"batch_{batch}"] = throughput(batch, latency[f"batch_{batch}"]["p50"])
    return {"latency_ms": latency, "throughput_per_s": speed}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def settings(length: int, warmup: int, iterations: int) -> dict[str, Any]:
    return {"device": "cpu", "cpu": cpu_name(), "threads": torch.get_num_threads(), "dtype": "fp32",
            "max_length": length, "warmup": warmup, "iterations": iterations, "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------
# The record


def accuracy_kept(metrics: dict[str, Any]) -> float | None:
    """The student's final dev main metric over the teacher's (first dev split), from a run's
    metrics; None without both (or when the teacher's is not positive)."""
    student = next(iter((metrics.get("final") or {}).values()), {}).get("main")
    teacher = next(iter(((metrics.get("teacher") or {}).get("dev") or {}).values()), {}).get("main")
    if student is None or teacher is None or teacher <= 0:
        return None
    return round(student / teacher, 4)


@dataclass
class ModelNumbers:
    """One model's part of the record: its size and, when timed, its latency and throughput."""

    spec: str
    params: int | None
    bytes: int | None
    timing: dict[str, Any] | None = None  # {"latency_ms": ..., "throughput_per_s": ...}


def load_for_timing(role: str, spec: str, cfg, tokenizer) -> nn.Module:
    from matekd_ds import models
    from matekd_ds.data.tasks import task_spec

    task = task_spec(cfg)
    with torch.random.fork_rng():  # a builtin model is built from the RNG: leave the run's alone
        torch.manual_seed(0)
        return models.load_classifier(role, spec, task.num_labels, tokenizer, task.is_regression).eval()


def sizes_only(spec: str, params: int | None) -> ModelNumbers:
    """Without loading the model: its weight files' bytes when it is a folder."""
    folder = Path(spec).expanduser()
    return ModelNumbers(spec, params, weights_bytes(folder) if folder.is_dir() else None)


def numbers_of(role: str, spec: str, cfg, tokenizer, timing: tuple[int, int] | None,
               known_params: int | None = None) -> ModelNumbers:
    """A model's numbers; it is loaded (whole, on the CPU) only when timed or its parameter count
    is not known."""
    if timing is None and known_params is not None:
        return sizes_only(spec, known_params)
    model = load_for_timing(role, spec, cfg, tokenizer)
    measured = measure_latency(model, cfg.data.max_length, *timing) if timing is not None else None
    return ModelNumbers(spec, count_params(model), model_bytes(model, spec), measured)


def record(student: ModelNumbers, teacher: ModelNumbers | None, timing_settings: dict[str, Any] | None,
           kept: float | None) -> dict[str, Any]:
    """The "deployment" object (module docstring) from each model's numbers."""
    t = teacher or ModelNumbers("", None, None)
    out: dict[str, Any] = {
        "student_params": student.params, "teacher_params": t.params,
        "student_bytes": student.bytes, "teacher_bytes": t.bytes, "teacher": teacher.spec if teacher else None,
        "params_ratio": round(t.params / student.params, 4) if t.params and student.params else None,
    }
    if student.timing is not None:
        out.update(student.timing)
        out["teacher_latency_ms"] = (t.timing or {}).get("latency_ms")
        out["teacher_throughput_per_s"] = (t.timing or {}).get("throughput_per_s")
        out["speedup_vs_teacher"] = speedup(student.timing["latency_ms"], out["teacher_latency_ms"])
        out["settings"] = timing_settings
    out["accuracy_kept"] = kept
    return out


def speedup(student_ms: dict[str, Any], teacher_ms: dict[str, Any] | None) -> float | None:
    key = f"batch_{SPEEDUP_BATCH}"
    if teacher_ms is None:
        return None
    return round(teacher_ms[key]["p50"] / student_ms[key]["p50"], 4)


# ---------------------------------------------------------------------------------------------
# Where the models come from


def teacher_spec_of_run(run_path: Path, cfg) -> str | None:
    """The run's teacher as deployed: its fine-tuned teacher/, else models.teacher when the method
    used one (an untrained builtin teacher is rebuilt: its shape, hence its cost, is the same)."""
    folder = run_path / "teacher"
    if (folder / "config.json").is_file():
        return str(folder)
    uses_teacher = cfg.method != "ft" or cfg.models.student_init_from_teacher_layers is not None
    return cfg.models.teacher if uses_teacher else None


def timing_of(cfg) -> tuple[int, int] | None:
    e = cfg.eval
    return (e.latency_warmup, e.latency_iterations) if e.deployment_latency else None


def for_run(run_path: Path, cfg, tokenizer, metrics: dict[str, Any], student: str = "student") -> dict[str, Any]:
    """A run's exported `student` against its teacher, with the accuracy kept from `metrics`. A
    teacher the run partitioned over its ranks (deepspeed.teacher) is not loaded whole on one to
    be timed: its sizes are recorded, and `matekd eval RUN --latency` times it where it fits."""
    timing = timing_of(cfg)
    mine = numbers_of("student", str(run_path / student), cfg, tokenizer, timing,
                      (metrics.get("student") or {}).get("params"))
    teacher_spec, partitioned = teacher_spec_of_run(run_path, cfg), cfg.deepspeed.teacher != "none"
    teacher_params = (metrics.get("teacher") or {}).get("params")
    theirs = None
    if teacher_spec is not None:
        theirs = (sizes_only(teacher_spec, teacher_params) if partitioned
                  else numbers_of("teacher", teacher_spec, cfg, tokenizer, timing, teacher_params))
    out = record(mine, theirs, settings(cfg.data.max_length, *timing) if timing else None, accuracy_kept(metrics))
    if teacher_spec is not None and timing and partitioned:
        out["teacher_not_timed"] = "partitioned over the ranks (deepspeed.teacher); `matekd eval RUN --latency`"
    return out


def for_eval_target(target: str, config: str | None, overrides: list[str]) -> dict[str, Any]:
    """`matekd eval TARGET --latency`: the model against its run's teacher (none for a model
    outside a run), both loaded and timed, with the run's iteration counts (or the command line's)."""
    from matekd_ds import evaluation_cli as ev

    resolved = ev.resolve_target(target)
    cfg = ev.target_config(resolved, config, overrides)
    cfg.eval.deployment_latency = True
    teacher = teacher_spec_of_run(resolved.run.path, cfg) if resolved.run is not None else None
    if teacher is not None and Path(teacher).expanduser().resolve() == Path(resolved.model).expanduser().resolve():
        teacher = None  # the run's teacher itself: nothing to compare it with
    tokenizer, timing = ev.load_target_tokenizer(resolved), timing_of(cfg)
    mine = numbers_of("model", resolved.model, cfg, tokenizer, timing)
    theirs = numbers_of("teacher", teacher, cfg, tokenizer, timing) if teacher else None
    kept = accuracy_kept(resolved.run.read_metrics()) if resolved.is_run else None
    return record(mine, theirs, settings(cfg.data.max_length, *timing), kept)


# ---------------------------------------------------------------------------------------------
# For people


def _size(n_bytes: int | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**20:.2f} MiB"


def _latency_cells(latency: dict[str, Any] | None) -> list[str]:
    cells = []
    for batch in BATCH_SIZES:
        entry = (latency or {}).get(f"batch_{batch}")
        cells.append("-" if entry is None else f"{entry['p50']:.2f} / {entry['p90']:.2f}")
    return cells


def table_rows(deployment: dict[str, Any]) -> list[list[str]]:
    """Header and one row per model: params, size, p50 / p90 ms per batch size, examples/s."""
    header = ["model", "params", "size", *(f"ms p50 / p90 @{b}" for b in BATCH_SIZES), f"examples/s @{BATCH_SIZES[-1]}"]
    rows = [header]
    for who, prefix in (("teacher", "teacher_"), ("student", "")):
        params = deployment.get(f"{who}_params")
        if params is None:
            continue
        speed = (deployment.get(f"{prefix}throughput_per_s") or {}).get(f"batch_{BATCH_SIZES[-1]}")
        rows.append([who, f"{params / 1e6:.2f}M", _size(deployment.get(f"{who}_bytes")),
                     *_latency_cells(deployment.get(f"{prefix}latency_ms")), "-" if speed is None else f"{speed:.0f}"])
    return rows


def headline(deployment: dict[str, Any]) -> str:
    """One sentence: the speed-up, the size ratio and the accuracy kept (what is known)."""
    parts = []
    if deployment.get("speedup_vs_teacher") is not None:
        parts.append(f"{deployment['speedup_vs_teacher']:.2f}x the teacher's speed at batch {SPEEDUP_BATCH}")
    if deployment.get("params_ratio") is not None:
        parts.append(f"{deployment['params_ratio']:.2f}x fewer parameters")
    if deployment.get("accuracy_kept") is not None:
        parts.append(f"keeps {deployment['accuracy_kept']:.1%} of the teacher's dev metric")
    return "student: " + ", ".join(parts) if parts else "student only: no teacher to compare with"


def settings_line(deployment: dict[str, Any]) -> str:
    s = deployment.get("settings")
    if not s:
        return "CPU inference: not timed (eval.deployment_latency: false)"
    return (f"CPU inference ({s['dtype']}, length {s['max_length']}, {s['threads']} thread(s), {s['cpu']}; "
            f"ms per forward, {s['warmup']} warm-up + up to {s['iterations']} timed)")


def format_lines(deployment: dict[str, Any]) -> list[str]:
    """The deployment numbers as the end-of-run summary and `matekd eval --latency` print them."""
    rows = table_rows(deployment)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [settings_line(deployment), line(rows[0]), line(["-" * w for w in widths]),
            *(line(r) for r in rows[1:]), headline(deployment)]
