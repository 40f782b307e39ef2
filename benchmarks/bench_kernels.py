#!/usr/bin/env python
"""Benchmark matekd_ds.kernels: timed against eager torch, torch.compile and Liger-Kernel, or
compiled ahead of time for sm_80/sm_90 and estimated from their SASS (no GPU needed).

    python benchmarks/bench_kernels.py [--quick] [--dtype bf16|fp32|fp16] [--no-save]
    python benchmarks/bench_kernels.py --aot [--jobs N] [--no-save]

Timed: for each case and implementation, the median time of forward, backward and
forward+backward, the effective bandwidth (minimal bytes an ideal fused kernel must move / time;
see _BYTES), the % of the GPU's peak HBM bandwidth when the card is known, and the peak extra
memory of one forward+backward (GPU only). On a CPU-only machine only the torch paths are timed
(Triton would run in its interpreter, whose timings mean nothing) and the large shapes are cut to
CPU_ROWS rows. Results: benchmarks/results/kernels_<device>_<date>.json (+ PNG when matplotlib is
importable).

--aot: every production kernel variant built for sm_80 and sm_90 in fp32/bf16/fp16 (see
matekd_ds.kernels.aot); per kernel, target and dtype: registers, shared memory, spills, SASS
instructions and bytes moved per element, the widest global load in its loops, and two H100
estimates at M = 1229 rows of V = 50265 (the small-C divergence at C = 2 and 3): the memory-bound
time (bytes at 3.35 TB/s) and the issue-bound time (SASS instructions at 132 SMs x 4 warp
instructions per clock x 1.98 GHz). Results: benchmarks/results/kernels_aot_<date>.json. The last
line is `aot_issue_over_memory_max: X.XX`, the largest issue/memory ratio over the production
kernels for sm_90 in bf16 (>1: the kernel is bound by instruction issue, not by memory).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared harness, run as a script
from harness import (
    REPO,
    RESULTS,
    PeakMemory,
    device_name,
    device_slug,
    median_ms,
    provenance,
    pyplot,
    save_json,
    today,
)

PEAK_HBM_GBPS = {"H100": 3350.0, "H200": 4800.0}  # SXM parts
CPU_ROWS = 64
TEMPERATURE = 2.0
TAU = 1.0
# Bytes per element an ideal kernel moves, in units of one logits element:
#   gumbel: fwd reads x, writes y; bwd reads x, dy, writes dx.   gumbel_ids: reads x (fwd only).
#   kl/mse: fwd reads s, t; bwd reads s, t, writes ds (+ dt when the teacher needs a gradient).
_BYTES = {
    "gumbel": {"fwd": 2, "bwd": 3},
    "gumbel_ids": {"fwd": 1},
    "kl": {"fwd": 2, "bwd": 3},
    "kl_teacher_grad": {"fwd": 2, "bwd": 4},
}
# The kernels the issue/memory ratio is reported over (sm_90, bf16), by group.
AOT_GROUPS = {
    "ids": ("sample_ids",),
    "straight-through": ("st_forward_hard", "st_forward_soft", "st_backward"),
    "divergence": ("divergence_forward", "divergence_backward", "divergence_forward_C2", "divergence_backward_C2",
                   "divergence_forward_C3", "divergence_backward_C3"),
}


# --------------------------------------------------------------------------- setup


def load_kernels():
    """matekd_ds.kernels, also from an uninstalled checkout (the package lives in kernels/)."""
    try:
        from matekd_ds import kernels

        return kernels
    except ImportError:
        pass
    sys.path.insert(0, str(REPO))
    import matekd_ds  # noqa: F401 - parent package must exist before the submodule

    spec = importlib.util.spec_from_file_location(
        "matekd_ds.kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["matekd_ds.kernels"] = module
    spec.loader.exec_module(module)
    return module


def load_liger_kl():
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except Exception as exc:  # any failure just means "not available"
        return None, f"liger_kernel not importable ({type(exc).__name__}: {exc})"
    return LigerKLDIVLoss(reduction="batchmean", log_target=True), ""


def peak_hbm_gbps(device: torch.device) -> float | None:
    name = device_name(device)
    return next((gbps for key, gbps in PEAK_HBM_GBPS.items() if key in name), None) if device.type == "cuda" else None


# --------------------------------------------------------------------------- reference formulations


def official_gumbel(logits, tau=TAU, hard=True):
    """The textbook straight-through Gumbel-softmax, as eager code usually writes it."""
    u = torch.rand_like(logits, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u + 1e-20) + 1e-20)
    y_soft = torch.softmax((torch.log_softmax(logits.float(), -1) + gumbel) / tau, -1)
    index = y_soft.argmax(-1, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(-1, index, 1.0)
    return (y_hard - y_soft.detach() + y_soft).to(logits.dtype)


def official_kl(student, teacher, temperature=TEMPERATURE):
    """Hinton KD loss as MATE-KD-style code writes it."""
    log_p_s = F.log_softmax(student.float() / temperature, -1)
    p_t = F.softmax(teacher.float() / temperature, -1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature**2


def official_mse(student, teacher):
    return F.mse_loss(student.float(), teacher.float())


# --------------------------------------------------------------------------- timing


def peak_extra_mib(fn, device):
    """Peak memory of fn above what was allocated before it (GPU only: CPU RSS is too coarse)."""
    if device.type != "cuda":
        return None
    with PeakMemory(device) as peak:
        fn()
    return peak.peak_extra / 2**20


def bench_impl(make_loss, inputs, grad, device, repeats, warmup):
    """Time forward, backward (retained graph) and forward+backward of one implementation; forward
    only when it returns no graph (the ids-only sampler)."""

    def clear():
        for t in inputs:
            t.grad = None

    fwd_ms = median_ms(make_loss, device, repeats, warmup)
    out = make_loss()
    if not out.requires_grad:
        return {"fwd_ms": fwd_ms, "peak_extra_mib": peak_extra_mib(make_loss, device)}

    def fwd_bwd():
        make_loss().backward(grad)

    bwd_ms = median_ms(lambda out=out: out.backward(grad, retain_graph=True), device, repeats, warmup, setup=clear)
    del out
    clear()
    fwd_bwd_ms = median_ms(fwd_bwd, device, repeats, warmup, setup=clear)
    clear()
    peak = peak_extra_mib(fwd_bwd, device)
    return {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "peak_extra_mib": peak}


def add_bandwidth(result, n_elems, elem_bytes, byte_model, peak_gbps):
    phases = {phase: byte_model[phase] * n_elems * elem_bytes for phase in byte_model}
    if "bwd" in phases and "bwd_ms" in result:
        phases["fwd_bwd"] = phases["fwd"] + phases["bwd"]
    for phase, nbytes in phases.items():
        if f"{phase}_ms" not in result:
            continue
        gbps = nbytes / (result[f"{phase}_ms"] * 1e-3) / 1e9
        result[f"{phase}_gbps"] = gbps
        if peak_gbps:
            result[f"{phase}_pct_peak"] = 100.0 * gbps / peak_gbps


# --------------------------------------------------------------------------- cases


def gumbel_impls(kernels, on_gpu, compile_fn):
    impls = {
        "eager_official": lambda x: official_gumbel(x),
        "matekd_torch": lambda x: kernels.gumbel_softmax_sample(x, TAU, True, seed=0, backend="torch")[1],
    }
    if compile_fn:
        impls["compiled_official"] = compile_fn(official_gumbel)
    if on_gpu:
        impls["matekd_triton"] = lambda x: kernels.gumbel_softmax_sample(x, TAU, True, seed=0, backend="triton")[1]
    return impls


def gumbel_ids_impls(kernels, on_gpu):
    """Student steps: only the sampled ids are needed."""
    impls = {
        "eager_official_argmax": lambda x: official_gumbel(x.detach()).argmax(-1),
        "matekd_torch": lambda x: kernels.gumbel_sample_ids(x.detach(), TAU, seed=0, backend="torch"),
    }
    if on_gpu:
        impls["matekd_triton_st_ids"] = lambda x: kernels.gumbel_softmax_sample(x.detach(), TAU, True, seed=0,
                                                                                  backend="triton")[0]
        impls["matekd_triton"] = lambda x: kernels.gumbel_sample_ids(x.detach(), TAU, seed=0, backend="triton")
    return impls


def kl_impls(kernels, on_gpu, compile_fn, liger):
    impls = {
        "eager_official": (official_kl, False),
        "matekd_torch": (lambda s, t: kernels.kl_div(s, t, TEMPERATURE, scale_t2=True, backend="torch"), False),
    }
    if compile_fn:
        impls["compiled_official"] = (compile_fn(official_kl), False)
    if on_gpu:

        def triton_kl(s, t):
            return kernels.kl_div(s, t, TEMPERATURE, scale_t2=True, backend="triton")

        impls["matekd_triton"] = (triton_kl, False)
        impls["matekd_triton_teacher_grad"] = (triton_kl, True)  # MATE-KD generator step
        if liger is not None:
            impls["liger_kl"] = (
                lambda s, t: liger(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1))
                * TEMPERATURE**2,
                False,
            )
    return impls


def mse_impls(compile_fn):
    impls = {"eager_mse": (official_mse, False)}
    if compile_fn:
        impls["compiled_mse"] = (compile_fn(official_mse), False)
    return impls


def build_cases(on_gpu):
    """(name, op, rows, cols, note). Large shapes are cut to CPU_ROWS rows on CPU."""
    masked_rows = int(0.3 * 32 * 128)
    cases = [("gumbel_1228x50265", "gumbel", masked_rows, 50265), ("gumbel_ids_1228x50265", "gumbel_ids",
                                                                    masked_rows, 50265)]
    for rows in (32, 8192):
        for cols in (2, 3, 1):
            cases.append((f"{'mse' if cols == 1 else 'kl'}_{rows}x{cols}", "mse" if cols == 1 else "kl", rows, cols))
    cases += [("kl_8192x32000", "kl", 8192, 32000), ("kl_8192x128256", "kl", 8192, 128256)]
    out = []
    for name, op, rows, cols in cases:
        note = ""
        if not on_gpu and rows * cols > CPU_ROWS * 1024:
            note = f"CPU: rows cut from {rows} to {CPU_ROWS}"
            rows = CPU_ROWS
        out.append((name, op, rows, cols, note))
    return out


def run_case(case, impls, device, dtype, repeats, warmup, peak_gbps):
    name, op, rows, cols, note = case
    gen = torch.Generator(device="cpu").manual_seed(0)
    results = {}
    for impl_name, spec in impls.items():
        fn, teacher_grad = (spec, False) if op.startswith("gumbel") else spec
        x = (torch.randn(rows, cols, generator=gen) * 2).to(device, dtype).requires_grad_(op != "gumbel_ids")
        if op.startswith("gumbel"):
            inputs, grad = [x], torch.randn(rows, cols, generator=gen).to(device, dtype)

            def make_loss(fn=fn, x=x):
                return fn(x)

            byte_model = _BYTES[op]
        else:
            t = (torch.randn(rows, cols, generator=gen) * 2).to(device, dtype).requires_grad_(teacher_grad)
            inputs, grad = [x, t], None

            def make_loss(fn=fn, x=x, t=t):
                return fn(x, t)

            byte_model = _BYTES["kl_teacher_grad" if teacher_grad else "kl"]
        try:
            res = bench_impl(make_loss, inputs, grad, device, repeats, warmup)
            add_bandwidth(res, rows * cols, x.element_size(), byte_model, peak_gbps)
        except Exception as exc:  # e.g. torch.compile failing: record and go on
            res = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        results[impl_name] = res
        del inputs, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"case": name, "op": op, "rows": rows, "cols": cols, "dtype": str(dtype).replace("torch.", ""),
            "note": note, "results": results}


# --------------------------------------------------------------------------- output


def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def print_case(entry, peak_gbps):
    header = f"\n== {entry['case']} [{entry['rows']}x{entry['cols']} {entry['dtype']}]"
    print(header + (f"  ({entry['note']})" if entry["note"] else ""))
    cols = f"{'impl':<28}{'fwd ms':>10}{'bwd ms':>10}{'f+b ms':>10}{'GB/s':>10}"
    cols += f"{'%peak':>7}" if peak_gbps else ""
    print(cols + f"{'peak MiB':>10}")
    for impl, res in entry["results"].items():
        if "error" in res:
            print(f"{impl:<28}skipped/failed: {res['error']}")
            continue
        phase = "fwd_bwd" if "fwd_bwd_ms" in res else "fwd"  # GB/s of forward+backward, or forward only
        line = f"{impl:<28}{res['fwd_ms']:>10.3f}{_fmt(res.get('bwd_ms'), '.3f'):>10}"
        line += f"{_fmt(res.get('fwd_bwd_ms'), '.3f'):>10}{res[f'{phase}_gbps']:>10.1f}"
        line += f"{res[f'{phase}_pct_peak']:>7.1f}" if peak_gbps else ""
        print(line + f"{_fmt(res['peak_extra_mib'], '.1f'):>10}")


def save_plot(report, path):
    plt = pyplot()
    if plt is None:
        return "no plot"
    cases = report["cases"]
    impls = sorted({impl for c in cases for impl, r in c["results"].items() if "error" not in r})

    def total_ms(result):
        return result.get("fwd_bwd_ms", result.get("fwd_ms"))

    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(cases)), 5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        points = [(j + i * width, total_ms(c["results"][impl])) for j, c in enumerate(cases)
                  if impl in c["results"] and "error" not in c["results"][impl]]
        ax.bar([p[0] for p in points], [p[1] for p in points], width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{c['case']}\n{c['rows']}x{c['cols']}" for c in cases], rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward (ids: forward), ms (median, log scale)")
    ax.set_title(f"matekd_ds.kernels on {report['device']} ({report['dtype']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


# --------------------------------------------------------------------------- ahead of time (--aot)


def aot_kernel_name(build: dict) -> str:
    """A production kernel's name in the table: what it computes, not its function name."""
    kernel, c = build["kernel"], build["constexprs"]
    names = {"_gumbel_fwd_kernel": "st_forward_hard" if c.get("HARD") else "st_forward_soft",
             "_gumbel_bwd_kernel": "st_backward", "_sample_ids_kernel": "sample_ids",
             "_divergence_fwd_kernel": "divergence_forward", "_divergence_bwd_kernel": "divergence_backward",
             "_divergence_small_fwd_kernel": f"divergence_forward_C{c.get('C')}",
             "_divergence_small_bwd_kernel": f"divergence_backward_C{c.get('C')}"}
    return names[kernel]


def aot_rows(aot, result: dict) -> list[dict]:
    """One row per production kernel, target and dtype, estimated at its case's row length."""
    rows, seen = [], set()
    for per_target in result["targets"]:
        builds = {b["hash"]: b for b in per_target["builds"]}
        for launch in per_target["launches"]:
            build = builds[launch["hash"]]
            n_cols = int(re.search(r"/V=(\d+)", launch["case"]).group(1))
            name = aot_kernel_name(build)
            small = "_C" in name
            if (small and n_cols == aot.ESTIMATE_COLS) or (not small and n_cols != aot.ESTIMATE_COLS):
                continue
            dtype = launch["case"].split("/")[1].split("+")[0]
            key = (per_target["target"], name, dtype)
            if key in seen:
                continue
            seen.add(key)
            est = aot.estimate(build, aot.ESTIMATE_ROWS, n_cols)
            loads = max((loop["max_load_bits"] for loop in build["loops"]), default=None)
            rows.append({"kernel": name, "target": per_target["target"], "dtype": dtype, "V": n_cols,
                         "registers": build["registers"], "shared_bytes": build["shared_bytes"],
                         "spill_bytes": build["spill_stores"] + build["spill_loads"], "num_warps": build["num_warps"],
                         "max_load_bits": loads, "sass_instructions": build["instructions"], **est})
    order = [name for group in AOT_GROUPS.values() for name in group]
    return sorted(rows, key=lambda r: (order.index(r["kernel"]), r["target"], r["dtype"]))


def print_aot_table(rows: list[dict]) -> None:
    head = (f"{'kernel':<24}{'target':<7}{'dtype':<6}{'V':>7}{'regs':>6}{'smem B':>8}{'spill':>6}{'ld bits':>8}"
            f"{'instr/el':>9}{'B/el':>7}{'mem us':>9}{'issue us':>9}{'iss/mem':>8}")
    print(head)
    for r in rows:
        print(f"{r['kernel']:<24}{r['target']:<7}{r['dtype']:<6}{r['V']:>7}{r['registers']:>6}{r['shared_bytes']:>8}"
              f"{r['spill_bytes']:>6}{_fmt(r['max_load_bits'], 'd'):>8}{r['instructions_per_element']:>9.1f}"
              f"{r['bytes_per_element']:>7.2f}{r['memory_bound_us']:>9.2f}{r['issue_bound_us']:>9.2f}"
              f"{r['issue_over_memory']:>8.2f}")


def run_aot(args) -> dict:
    load_kernels()  # matekd_ds.kernels must be importable before its aot submodule
    from matekd_ds.kernels import aot

    case_args = {"vocab": [aot.ESTIMATE_COLS, *aot.SMALL_ESTIMATE_COLS], "rows": [aot.ESTIMATE_ROWS],
                 "mixed": [], "padded": False}
    result = aot.build_all(jobs=args.jobs, case_args=case_args)
    found = aot.problems(result)
    rows = aot_rows(aot, result)
    print(f"ahead-of-time builds: {result['seconds']:.1f} s, triton {result['triton']}, ptxas {result['ptxas']}")
    print(f"H100 estimates at M = {aot.ESTIMATE_ROWS}, V = {aot.ESTIMATE_COLS} (small-C divergence: C = 2, 3):\n")
    print_aot_table(rows)
    production = [r for r in rows if r["target"] == "sm_90" and r["dtype"] == "bf16"]
    maxima = {group: max(r["issue_over_memory"] for r in production if r["kernel"] in names)
              for group, names in AOT_GROUPS.items()}
    print("\n" + ("\n".join(found) if found else "no compile errors, spills or alignment-dependent variants"))
    for group, value in maxima.items():
        print(f"aot_issue_over_memory_max[{group}]: {value:.2f}")
    overall = max(maxima.values())
    report = {**provenance(torch.device("cpu"), mode="aot"), "gpu_model": aot.H100,
              "estimate_shape": {"rows": aot.ESTIMATE_ROWS, "cols": aot.ESTIMATE_COLS,
                                 "small_c": list(aot.SMALL_ESTIMATE_COLS)},
              "triton": result["triton"], "ptxas": result["ptxas"], "build_seconds": result["seconds"],
              "problems": found, "rows": rows, "issue_over_memory_max": {**maxima, "all": overall},
              "notes": [("instructions: SASS of the loop bodies times their trips plus the straight-line code, "
                         "every loop body counted whole (conditional code included)"),
                        "bytes: every pass over a row counted as HBM traffic (no cache reuse assumed)",
                        "divergence_backward counts both gradients (MATE-KD's generator step)"]}
    if not args.no_save:
        save_json(f"kernels_aot_{today()}", report, args.out_dir)
    print(f"aot_issue_over_memory_max: {overall:.2f}")
    return report


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--aot", action="store_true", help="compile for sm_80/sm_90 and estimate from SASS (no GPU)")
    p.add_argument("--jobs", type=int, default=None, help="--aot: targets compiled at once (default 2)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (and no torch.compile on CPU)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="logits dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--only", default=None, help="regex: run only the cases whose name matches")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--no-save", action="store_true", help="print only; write no JSON / PNG")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.aot:
        return run_aot(args)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype or ("bf16" if on_gpu else "fp32")]
    repeats = args.repeats or ((10 if on_gpu else 3) if args.quick else (50 if on_gpu else 10))
    warmup = 2 if args.quick else 5
    peak_gbps = peak_hbm_gbps(device)
    kernels = load_kernels()
    cpu_note = "  -> CPU run: torch paths only (Triton would be interpreted)"
    print(f"device: {device_name(device)}" + ("" if on_gpu else cpu_note))

    compile_skip = ""
    if args.no_compile:
        compile_skip = "--no-compile"
    elif args.quick and not on_gpu:
        compile_skip = "skipped in --quick on CPU (inductor compiles each graph for ~20 s)"
    compile_fn = None if compile_skip else torch.compile
    liger, liger_skip = load_liger_kl() if on_gpu else (None, "CPU run")

    entries = []
    for case in build_cases(on_gpu):
        if args.only and not re.search(args.only, case[0]):
            continue
        op = case[1]
        if op == "gumbel":
            impls = gumbel_impls(kernels, on_gpu, compile_fn)
        elif op == "gumbel_ids":
            impls = gumbel_ids_impls(kernels, on_gpu)
        elif op == "kl":
            impls = kl_impls(kernels, on_gpu, compile_fn, liger)
        else:  # C == 1 is regression: the kernels reject it, the MSE on logits is the reference
            impls = mse_impls(compile_fn)
        entry = run_case(case, impls, device, dtype, repeats, warmup, peak_gbps)
        if op == "mse":
            mse_note = "C=1 regression: MSE on logits (kernels need C>=2)"
            entry["note"] = f"{entry['note']}; {mse_note}" if entry["note"] else mse_note
        entries.append(entry)
        print_case(entry, peak_gbps)

    report = {
        **provenance(device), "peak_hbm_gbps": peak_gbps, "backends": kernels.backend_info(),
        "dtype": str(dtype).replace("torch.", ""), "quick": args.quick,
        "repeats": repeats, "warmup": warmup, "temperature": TEMPERATURE, "tau": TAU,
        "skipped": {"torch_compile": compile_skip or None, "liger_kl": liger_skip or None,
                    "matekd_triton": None if on_gpu else "CPU run"},
        "notes": [("times are medians in ms; GB/s counts the minimal bytes of an ideal fused kernel "
                   "(gumbel: fwd 2, bwd 3 x M*V elements; gumbel_ids: fwd 1; kl: fwd 2, bwd 3 (4 with teacher "
                   "grad) x N*C)"),
                  ("KL rows time the student-only gradient (Liger differentiates its input only), "
                   "except matekd_triton_teacher_grad"),
                  "peak_extra_mib: peak allocation of one forward+backward above the inputs (GPU only)"],
        "cases": entries,
    }
    for what, why in report["skipped"].items():
        if why:
            print(f"skipped {what}: {why}")
    if args.no_save:
        return report
    path = save_json(f"kernels_{device_slug(device)}_{today()}", report, args.out_dir)
    print(save_plot(report, path.with_suffix(".png")))
    return report


if __name__ == "__main__":
    main()
