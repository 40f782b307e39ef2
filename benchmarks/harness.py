"""What every benchmark shares: where results go and where they came from, the device, random-token
training rows, timing, memory and per-model profiling. A benchmark script only says what it
measures; what it runs is built from a run config by matekd_ds/assembly.py.

Import it from a script in benchmarks/ (the folder is put on sys.path by running the script):
    from harness import provenance, save_json, median_ms, ...
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# ---------------------------------------------------------------------------------------------
# Provenance: device, versions, commit, date


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        tracked = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                 capture_output=True, text=True, timeout=10)
        # "+dirty": the result was measured on uncommitted changes to tracked files on top of HEAD
        return (out.stdout.strip() or "unknown") + ("+dirty" if tracked.stdout.strip() else "")
    except Exception:  # no git, not a checkout: the result still gets written
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of the stack; a library that does not import is reported, not fatal."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("deepspeed", "transformers", "triton"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # not installed, or broken: reported, not fatal
            out[name] = f"unavailable ({type(exc).__name__})"
    return out


def default_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device | None = None) -> str:
    device = device or default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads)")


def device_slug(device: torch.device | None = None) -> str:
    """'nvidia-h100-80gb-hbm3' or 'cpu': the device part of a result's file name."""
    device = device or default_device()
    if device.type != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(device).lower()).strip("-")


def today() -> str:
    return datetime.datetime.now().strftime("%Y%m%d")


def provenance(device: torch.device | None = None, **extra: Any) -> dict[str, Any]:
    """The header of every result file."""
    return {"device": device_name(device), "versions": versions(), "git_commit": git_commit(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:], **extra}


def save_json(name: str, payload: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"[bench] wrote {path}", flush=True)
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when it is not installed:
    plots are an extra (pip install -e '.[bench]'), results never depend on them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # not installed, or broken: no plot, the results are unaffected
        print(f"[bench] no plot: matplotlib is not importable ({type(exc).__name__}); pip install -e '.[bench]'")
        return None
    return plt


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------
# Random-token training rows


def random_token_rows(rows: int, max_length: int, vocab: int, special_ids, cls_id: int, sep_id: int,
                      num_labels: int, seed: int, mean_fraction: float = 0.45, sigma: float = 0.5,
                      min_length: int = 8):
    """`rows` training rows of random non-special token ids: [CLS] ... [SEP], lengths log-normal
    around mean_fraction x max_length (GLUE-like: most rows much shorter than the maximum),
    random labels. A matekd_ds Encoded split: the trainer's collate pads it, the teacher's
    clean-logit table indexes it."""
    from matekd_ds.data.batching import Encoded

    rng = torch.Generator().manual_seed(seed)
    special = set(special_ids)
    regular = torch.tensor([i for i in range(vocab) if i not in special])
    lengths = torch.exp(torch.randn(rows, generator=rng) * sigma + math.log(mean_fraction * max_length))
    lengths = lengths.round().long().clamp(min(min_length, max_length), max_length).tolist()
    ids = [[cls_id, *regular[torch.randint(len(regular), (n - 2,), generator=rng)].tolist(), sep_id] for n in lengths]
    labels = torch.randint(num_labels, (rows,), generator=rng).tolist()
    return Encoded(ids, None, labels, regression=False)


# ---------------------------------------------------------------------------------------------
# Timing


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def elapsed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """One call of fn: CUDA events on a GPU, the wall clock on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1e3


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int,
              setup: Callable[[], Any] | None = None) -> float:
    """Median of `repeats` timed calls after `warmup` untimed ones; `setup` runs untimed before each."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    samples = []
    for _ in range(repeats):
        if setup:
            setup()
        samples.append(elapsed_ms(fn, device))
    return statistics.median(samples)


def interleaved(sides: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Each side's result for `repeats` rounds, run A, B, A, B, ...: on a shared, noisy machine
    a slow patch hits both sides instead of one."""
    out: dict[str, list[Any]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            out[name].append(run())
    return out


# ---------------------------------------------------------------------------------------------
# Memory


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def trim_malloc() -> None:
    """Hand freed heap back to the OS so that the next RSS peak starts from a clean floor."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory above the starting point while the block runs: CUDA max_memory_allocated on
    a GPU, RSS sampled every 5 ms on a CPU (approximate). `peak_extra` after the block."""

    def __init__(self, device: torch.device):
        self.device, self.peak_extra, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self._start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            trim_malloc()
            self._start = self._peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_extra = torch.cuda.max_memory_allocated() - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_extra = max(self._peak, rss_bytes()) - self._start
        return False


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Profiling: per-model forward/backward spans with hooks, and named sections


class Marks:
    """Timestamps of hook events within one step, (role, kind, seconds), and section totals.
    On a GPU every mark synchronises: profiled steps are for attribution, not for throughput."""

    def __init__(self, sync: Callable[[], None]):
        self.sync, self.events, self.sections = sync, [], {}

    def mark(self, role: str, kind: str) -> None:
        self.sync()
        self.events.append((role, kind, time.perf_counter()))

    @contextlib.contextmanager
    def section(self, name: str):
        self.sync()
        began = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.sections[name] = self.sections.get(name, 0.0) + time.perf_counter() - began

    def reset(self) -> None:
        self.events, self.sections = [], {}

    def forward_seconds(self, role: str) -> float:
        starts = [t for r, k, t in self.events if r == role and k == "fwd_start"]
        ends = [t for r, k, t in self.events if r == role and k == "fwd_end"]
        return sum(e - s for s, e in zip(starts, ends))

    def backward_seconds(self, role: str) -> float:
        starts = [t for r, k, t in self.events if r == role and k == "bwd_start"]
        ends = [t for r, k, t in self.events if r == role and k == "bwd_end"]
        return max(ends) - min(starts) if starts and ends else 0.0


def _output_tensor(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def hook_model(role: str, first: nn.Module, last: nn.Module, embeddings: nn.Module, marks: Marks) -> list:
    """Forward: `first`'s pre-hook to `last`'s hook. Backward: the gradient reaching `last`'s
    output to the gradient reaching the embeddings' output. Returns removable handles."""
    def on_output(module, inputs, output):
        marks.mark(role, "fwd_end")
        tensor = _output_tensor(output)
        if tensor.requires_grad:
            tensor.register_hook(lambda grad: marks.mark(role, "bwd_start"))

    def on_embeddings(module, inputs, output):
        if output.requires_grad:
            output.register_hook(lambda grad: marks.mark(role, "bwd_end"))

    return [first.register_forward_pre_hook(lambda module, inputs: marks.mark(role, "fwd_start")),
            last.register_forward_hook(on_output), embeddings.register_forward_hook(on_embeddings)]


@dataclass
class Restore:
    """Undo an instance attribute patch (a handle like a hook's)."""

    owner: Any
    name: str
    value: Any = None  # None: the patch shadowed a class attribute, so deleting it restores that

    def remove(self) -> None:
        if self.value is None:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.value)


def time_method_as_section(owner: Any, method_name: str, marks: Marks, section: str) -> Restore:
    """Patch `owner.method_name` on the instance so that every call is timed as `section`."""
    original = getattr(owner, method_name)

    def timed(*args, **kwargs):
        with marks.section(section):
            return original(*args, **kwargs)

    setattr(owner, method_name, timed)
    return Restore(owner, method_name)
