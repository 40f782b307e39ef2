"""Ahead-of-time builds of every kernel for GPUs that are not here: sm_80 and sm_90, on a CPU.

The interpreter checks the maths; this checks what the GPU compiler does with the code (compile
errors, register spills, alignment specialisation, instruction counts), with no GPU and no driver:

  * a stand-in Triton driver reports a fixed ``GPUTarget("cuda", 80|90, 32)``;
  * the real host wrappers run on CPU tensors, and ``launch.compile_only_hook`` turns each launch
    into ``kernel.warmup(...)`` with exactly the arguments, constexprs and options the launch
    would get, so integer and pointer-alignment specialisation is the launch code's own;
  * the ptxas bundled with Triton assembles the cubin (its log gives registers and spills) and the
    bundled ``cuobjdump -sass`` gives the instruction stream.

Each target builds in a process of its own (the driver swap and non-interpreted kernels must not
meet the interpreter the CPU tests use), with a fresh Triton cache so ptxas always runs:

    python -m matekd_ds.kernels.aot [--targets sm_80,sm_90] [--jobs 2] [--json PATH]

prints a summary and exits 1 on a compile error, a spill, a variant that depends on the row count's
alignment, or SASS whose loops do not match the kernel's passes. ``estimate()`` turns a build into
H100 time estimates (benchmarks/bench_kernels.py --aot).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from . import divergence, gumbel, sample_ids
from . import launch as launch_module
from .dispatch import HAS_TRITON, TRITON_IMPORT_ERROR, is_interpreted, triton

TARGETS = {"sm_80": 80, "sm_90": 90}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCAB = (2, 3, 30522, 50265, 128256)
ROWS = (8, 7)  # a multiple of 4 and not: scratch alignment must not add variants
MIXED_PAIRS = (("bf16", "fp32"), ("fp16", "fp32"))  # student, teacher: half logits against fp32 ones
PADDED_VOCAB = 50265  # also built with its row stride padded to a multiple of 16 (vector loads)
PADDED_DTYPE = "bf16"

# H100 SXM: HBM bandwidth, SMs, warp instructions issued per clock per SM (4 schedulers), boost clock.
H100 = {"hbm_bytes_per_s": 3.35e12, "sms": 132, "issue_per_clock_per_sm": 4, "clock_hz": 1.98e9}
ESTIMATE_ROWS, ESTIMATE_COLS = 1229, 50265  # masked rows of a 32 x 128 batch at 30 %, RoBERTa's vocabulary
SMALL_ESTIMATE_COLS = (2, 3)  # the small-C divergence at GLUE's class counts


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- kernels and their work


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """What one launch of a kernel does, to turn its SASS into per-element costs.

    loops: passes over a row, i.e. the loops its SASS must have (checked);
    trips(constexprs, n_cols): iterations of each loop per program;
    programs(constexprs, n_rows): programs per launch;
    bytes_moved(constexprs, element_sizes, n_rows, n_cols): bytes read and written per launch,
        every pass counted (no cache assumed); element_sizes maps tensor parameters to bytes.
    """

    group: str
    loops: Callable[[dict], int]
    trips: Callable[[dict, int], int]
    programs: Callable[[dict, int], int]
    bytes_moved: Callable[[dict, dict, int, int], float]


def _one_program_per_row(_c, n_rows):
    return n_rows


def _quarter_trips(c, n_cols):
    return _cdiv(gumbel._layout(n_cols)["QUARTER"], c["TILE"])


def _block_trips(c, n_cols):
    return _cdiv(n_cols, c["BLOCK"])


def _gradient_bytes(c, es, n, v):
    # need_ds / need_dt are runtime flags (one variant serves all): count MATE-KD's generator step,
    # where both inputs need a gradient, i.e. the most bytes.
    return n * v * (es["DS"] + es["DT"])


SPECS = {
    "_gumbel_fwd_kernel": KernelSpec(
        "straight-through", lambda c: 1 if c["HARD"] else 2, _quarter_trips, _one_program_per_row,
        lambda c, es, n, v: n * v * ((1 if c["HARD"] else 2) * es["X"] + es["Y"]) + 16 * n),
    "_gumbel_bwd_kernel": KernelSpec(
        "straight-through", lambda c: 2, _quarter_trips, _one_program_per_row,
        lambda c, es, n, v: n * v * (2 * es["X"] + 2 * es["DY"] + es["DX"]) + 8 * n),
    "_sample_ids_kernel": KernelSpec(
        "ids", lambda c: 1, _block_trips, _one_program_per_row,
        lambda c, es, n, v: n * (v + min(v, c["BLOCK"])) * es["X"] + 8 * n),  # + the winning block, re-read
    "_divergence_fwd_kernel": KernelSpec(
        "divergence", lambda c: 1, _block_trips, _one_program_per_row,
        lambda c, es, n, v: n * v * (es["STU"] + es["TEA"]) + 20 * n),
    "_divergence_bwd_kernel": KernelSpec(
        "divergence", lambda c: 1, _block_trips, _one_program_per_row,
        lambda c, es, n, v: n * v * (es["STU"] + es["TEA"]) + _gradient_bytes(c, es, n, v) + 24 * n),
    "_divergence_small_fwd_kernel": KernelSpec(
        "divergence", lambda c: 0, lambda c, v: 0, lambda c, n: _cdiv(n, c["ROWS"]),
        lambda c, es, n, v: n * v * (es["STU"] + es["TEA"]) + 4 * n),
    "_divergence_small_bwd_kernel": KernelSpec(
        "divergence", lambda c: 0, lambda c, v: 0, lambda c, n: _cdiv(n, c["ROWS"]),
        lambda c, es, n, v: n * v * (es["STU"] + es["TEA"]) + _gradient_bytes(c, es, n, v) + 4 * n),
}


# --------------------------------------------------------------------------- the production launches


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a production host wrapper: op, dtypes, row length, rows, layout."""

    op: str
    dtypes: tuple[str, ...]
    n_cols: int
    n_rows: int
    padded: bool = False

    @property
    def name(self) -> str:
        return f"{self.op}/{'+'.join(self.dtypes)}/V={self.n_cols}/M={self.n_rows}{'/padded' if self.padded else ''}"

    @property
    def inspected(self) -> bool:
        """Whether this case's variants get their SASS read (cuobjdump costs ~0.3 s a call): the row
        lengths that are estimated (V = 50265, and C = 2, 3 for the small-C divergence)."""
        return self.n_cols in (ESTIMATE_COLS, *SMALL_ESTIMATE_COLS)

    @property
    def shape_free_name(self) -> str:
        """The name without the row count: cases that must share their variants."""
        return f"{self.op}/{'+'.join(self.dtypes)}/V={self.n_cols}{'/padded' if self.padded else ''}"


def production_cases(dtypes=tuple(DTYPES), vocab=VOCAB, rows=ROWS, mixed=MIXED_PAIRS, padded=True) -> list[Case]:
    """Every combination the public API can send to a kernel: the straight-through sample (hard
    and soft, forward and backward), the ids-only sampler, and both divergences with every
    combination of inputs that need a gradient, per dtype (and student/teacher dtype pair)."""
    cases = []
    pairs = [(d, d) for d in dtypes] + [tuple(p) for p in mixed if set(p) <= set(dtypes)]
    for n_rows in rows:
        for v in vocab:
            layouts = [False, True] if padded and v == PADDED_VOCAB else [False]
            for pad in layouts:
                for d in dtypes:
                    if pad and d != PADDED_DTYPE:
                        continue
                    cases += [Case("gumbel_hard", (d,), v, n_rows, pad), Case("gumbel_soft", (d,), v, n_rows, pad),
                              Case("sample_ids", (d,), v, n_rows, pad)]
                for pair in pairs:
                    if pad and pair != (PADDED_DTYPE, PADDED_DTYPE):
                        continue
                    cases += [Case(op, pair, v, n_rows, pad) for op in ("soft_ce", "kl")]
    return cases


def _rows_tensor(n_rows: int, n_cols: int, dtype: str, padded: bool) -> torch.Tensor:
    """An [n_rows, n_cols] CPU tensor (values unused); padded: row stride rounded up to 16."""
    stride = _cdiv(n_cols, 16) * 16 if padded else n_cols
    return torch.empty(n_rows, stride, dtype=DTYPES[dtype])[:, :n_cols]


def run_case(case: Case) -> None:
    """Call the host wrappers for ``case`` (forward and backward), as the public API would."""
    x = _rows_tensor(case.n_rows, case.n_cols, case.dtypes[0], case.padded)
    if case.op == "sample_ids":
        sample_ids._sample_ids_triton(x, seed=1)
    elif case.op in ("gumbel_hard", "gumbel_soft"):
        x.requires_grad_(True)
        _, y = gumbel._gumbel_softmax_triton(x, 1.0, case.op == "gumbel_hard", seed=1)
        y.backward(_rows_tensor(case.n_rows, case.n_cols, case.dtypes[0], case.padded))
    else:
        kind = divergence._KL if case.op == "kl" else divergence._CE
        for need_ds, need_dt in ((True, False), (False, True), (True, True)):
            s = x.detach().requires_grad_(need_ds)
            t = _rows_tensor(case.n_rows, case.n_cols, case.dtypes[1], case.padded).requires_grad_(need_dt)
            divergence._per_row_loss_triton(s, t, 2.0, kind).sum().backward()


# --------------------------------------------------------------------------- compiling with a stand-in driver


def _stand_in_driver(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInDriver(DriverBase):
        """A CUDA target with no device behind it: enough for JITFunction.warmup to compile."""

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("compile only")

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("compile only")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    return StandInDriver()


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _opcode(instruction: str) -> str:
    tokens = instruction.split()
    return tokens[1] if tokens[0].startswith("@") else tokens[0]


def _access_bits(opcode: str) -> int:
    modifiers = opcode.split(".")[1:]
    for size, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if size in modifiers:
            return bits
    return 32


def _branch_target(instruction: str) -> int | None:
    found = re.search(r"0x([0-9a-f]+)", instruction) if _opcode(instruction).startswith("BRA") else None
    return int(found.group(1), 16) if found else None


def sass_summary(sass: str) -> dict:
    """Instruction count (up to the branch-to-self that pads the end) and, per loop (a backward
    branch), its length in instructions and its global loads/stores."""
    code = [(int(m.group(1), 16), m.group(2)) for m in map(_SASS_LINE.search, sass.splitlines()) if m]
    end = min(addr for addr, ins in code if _branch_target(ins) == addr)
    code = [(addr, ins) for addr, ins in code if addr < end]
    loops = []
    for addr, ins in code:
        target = _branch_target(ins)
        if target is not None and target < addr:
            body = [_opcode(i) for a, i in code if target <= a <= addr]
            loads = [_access_bits(op) for op in body if op.startswith("LDG")]
            loops.append({"length": len(body), "loads": len(loads), "stores": sum(op.startswith("STG") for op in body),
                          "max_load_bits": max(loads, default=0)})
    return {"instructions": len(code), "loops": loops}


def _cuobjdump_sass(cubin: bytes) -> str:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def _describe(kernel, compiled, args, options, ptxas_log: str, target: str) -> dict:
    name = kernel.fn.__name__
    constexprs = {p.name: options[p.name] for p in kernel.params if p.is_constexpr and p.name in options}
    tensors = {n: a for n, a in zip(kernel.arg_names, args, strict=False) if isinstance(a, torch.Tensor)}
    registers = _PTXAS_REGISTERS.search(ptxas_log)
    frame = _PTXAS_FRAME.search(ptxas_log)
    return {
        "kernel": name, "target": target, "hash": compiled.hash, "constexprs": constexprs,
        "num_warps": compiled.metadata.num_warps, "shared_bytes": compiled.metadata.shared,
        "dtypes": {n: str(t.dtype).replace("torch.", "") for n, t in tensors.items()},
        "element_sizes": {n: t.element_size() for n, t in tensors.items()},
        "registers": int(registers.group(1)) if registers else None,
        "stack_bytes": int(frame.group(1)) if frame else None,
        "spill_stores": int(frame.group(2)) if frame else None,
        "spill_loads": int(frame.group(3)) if frame else None,
        "instructions": None, "loops": None,  # filled by sass_summary for inspected cases
    }


class _Recorder:
    """The compile-only hook: warm each launch up, describe each new variant once."""

    def __init__(self, target: str):
        self.target, self.case = target, None
        self.builds: dict[str, dict] = {}
        self.launches: list[dict] = []

    def __call__(self, kernel, grid, args, options):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # ptxas' log (registers, spills) is printed
            compiled = kernel.warmup(*args, grid=grid, **options)
        if compiled.hash not in self.builds:
            self.builds[compiled.hash] = _describe(kernel, compiled, args, options, log.getvalue(), self.target)
        build = self.builds[compiled.hash]
        if self.case.inspected and build["loops"] is None:
            build.update(sass_summary(_cuobjdump_sass(compiled.asm["cubin"])))
        self.launches.append({"case": self.case.name, "shape_free_case": self.case.shape_free_name,
                              "kernel": kernel.fn.__name__, "hash": compiled.hash})
        return compiled


@contextlib.contextmanager
def compile_only(target: str):
    """Inside: launches compile for ``target`` (no GPU) and are recorded by the yielded recorder."""
    from triton import knobs
    from triton.runtime.driver import driver

    if not HAS_TRITON:
        raise RuntimeError(f"ahead-of-time builds need Triton ({TRITON_IMPORT_ERROR})")
    if is_interpreted(gumbel._gumbel_fwd_kernel):
        raise RuntimeError("the kernels were decorated for the interpreter: run without TRITON_INTERPRET=1")
    recorder = _Recorder(target)
    previous = (driver._active, launch_module.compile_only_hook, knobs.nvidia.dump_ptxas_log,
                knobs.compilation.always_compile)
    driver.set_active(_stand_in_driver(TARGETS[target]))
    launch_module.compile_only_hook = recorder
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a disk-cache hit would skip ptxas and its log
    try:
        yield recorder
    finally:
        driver._active, launch_module.compile_only_hook = previous[0], previous[1]
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = previous[2], previous[3]


def build_target(target: str, cases: list[Case]) -> dict:
    """Compile ``cases`` for one target in this process: builds, launches and errors."""
    began = time.perf_counter()
    errors = []
    with compile_only(target) as recorder:
        for case in cases:
            recorder.case = case
            try:
                run_case(case)
            except Exception as exc:  # every failing case is reported, not just the first
                errors.append({"case": case.name, "error": f"{type(exc).__name__}: {exc}"[-2000:],
                               "traceback": traceback.format_exc()[-4000:]})
    return {"target": target, "builds": list(recorder.builds.values()), "launches": recorder.launches,
            "errors": errors, "seconds": time.perf_counter() - began}


# --------------------------------------------------------------------------- one process per target


def _child_env(cache_dir: str) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
    env.pop("TRITON_INTERPRET", None)  # the kernels must be real JIT functions
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def build_all(targets=tuple(TARGETS), jobs: int | None = None, case_args: dict | None = None) -> dict:
    """Build ``production_cases(**case_args)`` for each target, one child process per target, at most
    ``jobs`` at a time (default: 2, or 1 on a single core)."""
    jobs = jobs or min(2, os.cpu_count() or 1)
    began = time.perf_counter()
    results, pending = [], list(targets)
    with tempfile.TemporaryDirectory(prefix="matekd-aot-") as tmp:
        running = []
        while pending or running:
            while pending and len(running) < jobs:
                target = pending.pop(0)
                out = Path(tmp) / f"{target}.json"
                cmd = [sys.executable, "-m", "matekd_ds.kernels.aot", "--child", target, "--json", str(out),
                       "--case-args", json.dumps(case_args or {})]
                cache = tempfile.mkdtemp(dir=tmp, prefix=f"cache-{target}-")
                running.append((target, out, subprocess.Popen(cmd, env=_child_env(cache), stdout=subprocess.PIPE,
                                                              stderr=subprocess.STDOUT, text=True)))
            target, out, proc = running.pop(0)
            output = proc.communicate()[0]
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"ahead-of-time build for {target} failed (exit {proc.returncode}):\n"
                                   f"{output[-4000:]}")
            results.append(json.loads(out.read_text()))
    return {"targets": results, "seconds": time.perf_counter() - began, "triton": triton.__version__,
            "ptxas": _ptxas_versions()}


def _ptxas_versions() -> dict:
    from triton import knobs

    versions = {}
    for name in ("ptxas", "ptxas_blackwell"):
        try:
            versions[name] = getattr(knobs.nvidia, name).version
        except Exception as exc:  # reported, not fatal
            versions[name] = f"unavailable ({type(exc).__name__})"
    return versions


# --------------------------------------------------------------------------- checks and estimates


def problems(result: dict) -> list[str]:
    """Everything that must not happen: compile errors, spills, variants that differ between row
    counts that only differ in alignment, SASS loops that do not match the kernel's passes."""
    found = []
    for per_target in result["targets"]:
        target = per_target["target"]
        found += [f"{target}: {e['case']}: {e['error']}" for e in per_target["errors"]]
        for build in per_target["builds"]:
            label = f"{target}: {build['kernel']} {build['constexprs']} {build['dtypes']}"
            if build["spill_stores"] is None:
                found.append(f"{label}: no ptxas log")
            elif build["spill_stores"] or build["spill_loads"]:
                found.append(f"{label}: spills {build['spill_stores']} B stores, {build['spill_loads']} B loads")
            expected_loops = SPECS[build["kernel"]].loops(build["constexprs"])
            if build["loops"] is not None and len(build["loops"]) != expected_loops:
                found.append(f"{label}: {len(build['loops'])} loops in SASS, expected {expected_loops}")
        found += _alignment_problems(target, per_target["launches"])
    return found


def _alignment_problems(target: str, launches: list[dict]) -> list[str]:
    variants: dict[str, dict[str, set]] = {}
    for launch in launches:
        by_rows = variants.setdefault(launch["shape_free_case"], {})
        by_rows.setdefault(launch["case"], set()).add(launch["hash"])
    out = []
    for shape_free, by_rows in variants.items():
        distinct = {frozenset(hashes) for hashes in by_rows.values()}
        if len(distinct) > 1:
            out.append(f"{target}: {shape_free}: the row count changes the compiled variants ({sorted(by_rows)})")
    return out


def estimate(build: dict, n_rows: int = ESTIMATE_ROWS, n_cols: int = ESTIMATE_COLS, gpu: dict = H100) -> dict:
    """Per-element SASS instructions and bytes of one launch on [n_rows, n_cols], and the time it
    needs at the GPU's memory bandwidth and at its instruction issue rate (every loop body runs
    whole on every trip: a static count, conditional code included)."""
    spec, constexprs = SPECS[build["kernel"]], build["constexprs"]
    loop_instructions = sum(loop["length"] for loop in build["loops"])
    per_program = loop_instructions * spec.trips(constexprs, n_cols) + build["instructions"] - loop_instructions
    programs = spec.programs(constexprs, n_rows)
    warp_instructions = programs * per_program * build["num_warps"]
    n_elements = n_rows * n_cols
    moved = spec.bytes_moved(constexprs, build["element_sizes"], n_rows, n_cols)
    memory_s = moved / gpu["hbm_bytes_per_s"]
    issue_s = warp_instructions / (gpu["sms"] * gpu["issue_per_clock_per_sm"] * gpu["clock_hz"])
    return {"instructions_per_element": warp_instructions * 32 / n_elements, "bytes_per_element": moved / n_elements,
            "memory_bound_us": memory_s * 1e6, "issue_bound_us": issue_s * 1e6, "issue_over_memory": issue_s / memory_s}


# --------------------------------------------------------------------------- CLI


def _summary(result: dict) -> str:
    lines = [f"triton {result['triton']}, ptxas {result['ptxas']}, {result['seconds']:.1f} s"]
    for per_target in result["targets"]:
        builds = per_target["builds"]
        lines.append(f"{per_target['target']}: {len(builds)} variants from {len(per_target['launches'])} launches, "
                     f"{len(per_target['errors'])} errors, max {max((b['registers'] or 0) for b in builds)} registers, "
                     f"{per_target['seconds']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--jobs", type=int, default=None, help="targets built at once (default: 2, or 1 on one core)")
    p.add_argument("--json", type=Path, default=None, help="write every build and launch here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # build one target in this process
    p.add_argument("--case-args", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    case_args = json.loads(args.case_args)
    if args.child:
        result = build_target(args.child, production_cases(**case_args))
        args.json.write_text(json.dumps(result))
        return 0
    result = build_all(args.targets.split(","), args.jobs, case_args)
    found = problems(result)
    if args.json:
        args.json.write_text(json.dumps({**result, "problems": found}, indent=1))
    print(_summary(result))
    print("\n".join(found) if found else "no problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
