#!/usr/bin/env python
"""Benchmark matekd_ds.kernels against eager torch, torch.compile and Liger-Kernel.

    python benchmarks/bench_kernels.py [--quick] [--dtype bf16|fp32|fp16] [--no-save]

For each case and implementation it reports the median time of forward, backward and
forward+backward, the effective bandwidth (minimal bytes an ideal fused kernel must move / time;
see _BYTES), the % of the GPU's peak HBM bandwidth when the card is known, and the peak extra
memory of one forward+backward (GPU only). Results go to
benchmarks/results/kernels_<device>_<date>.json (+ a PNG plot when matplotlib is importable).

On a CPU-only machine only the torch paths are timed (Triton would run in its interpreter,
whose timings mean nothing), the large shapes are cut to CPU_ROWS rows, and memory is "n/a".
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, run as a script
from provenance import git_commit  # noqa: E402
PEAK_HBM_GBPS = {"H100": 3350.0, "H200": 4800.0}  # SXM parts
CPU_ROWS = 64
TEMPERATURE = 2.0
TAU = 1.0
# Bytes per element an ideal kernel moves, in units of one logits element:
#   gumbel: fwd reads x, writes y; bwd reads x, dy, writes dx.
#   kl/mse: fwd reads s, t; bwd reads s, t, writes ds (+ dt when the teacher needs a gradient).
_BYTES = {
    "gumbel": {"fwd": 2, "bwd": 3},
    "kl": {"fwd": 2, "bwd": 3},
    "kl_teacher_grad": {"fwd": 2, "bwd": 4},
}


# --------------------------------------------------------------------------- setup


def load_kernels():
    """matekd_ds.kernels, also from an uninstalled checkout (the package lives in kernels/)."""
    try:
        import matekd_ds.kernels as kernels

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
    except Exception as exc:  # noqa: BLE001 - any failure just means "not available"
        return None, f"liger_kernel not importable ({type(exc).__name__}: {exc})"
    return LigerKLDIVLoss(reduction="batchmean", log_target=True), ""


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((gbps for key, gbps in PEAK_HBM_GBPS.items() if key in name), None)
        return {"name": name, "peak_hbm_gbps": peak}
    return {"name": f"CPU ({platform.processor() or platform.machine()})", "peak_hbm_gbps": None}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        out["triton"] = f"unavailable ({type(exc).__name__})"
    return out


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


def _timer(device):
    if device.type == "cuda":

        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

    else:

        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

    return run


def median_ms(fn, device, repeats, warmup, setup=None):
    timed = _timer(device)
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    samples = []
    for _ in range(repeats):
        if setup:
            setup()
        samples.append(timed(fn))
    return statistics.median(samples)


def peak_extra_mib(fn, device):
    """Peak memory of fn above what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def bench_impl(make_loss, inputs, grad, device, repeats, warmup):
    """Time forward, backward (retained graph) and forward+backward of one implementation."""

    def clear():
        for t in inputs:
            t.grad = None

    def fwd_bwd():
        make_loss().backward(grad)

    fwd_ms = median_ms(make_loss, device, repeats, warmup)
    out = make_loss()
    bwd_ms = median_ms(lambda: out.backward(grad, retain_graph=True), device, repeats, warmup, setup=clear)
    del out
    clear()
    fwd_bwd_ms = median_ms(fwd_bwd, device, repeats, warmup, setup=clear)
    clear()
    peak = peak_extra_mib(fwd_bwd, device)
    return {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "peak_extra_mib": peak}


def add_bandwidth(result, n_elems, elem_bytes, byte_model, peak_gbps):
    bytes_fwd = byte_model["fwd"] * n_elems * elem_bytes
    bytes_bwd = byte_model["bwd"] * n_elems * elem_bytes
    for phase, nbytes in (("fwd", bytes_fwd), ("bwd", bytes_bwd), ("fwd_bwd", bytes_fwd + bytes_bwd)):
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


def kl_impls(kernels, on_gpu, compile_fn, liger):
    impls = {
        "eager_official": (official_kl, False),
        "matekd_torch": (lambda s, t: kernels.kl_div(s, t, TEMPERATURE, scale_t2=True, backend="torch"), False),
    }
    if compile_fn:
        impls["compiled_official"] = (compile_fn(official_kl), False)
    if on_gpu:
        triton_kl = lambda s, t: kernels.kl_div(s, t, TEMPERATURE, scale_t2=True, backend="triton")  # noqa: E731
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
    cases = [("gumbel_1228x50265", "gumbel", int(0.3 * 32 * 128), 50265)]
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
        fn, teacher_grad = (spec, False) if op == "gumbel" else spec
        x = (torch.randn(rows, cols, generator=gen) * 2).to(device, dtype).requires_grad_(True)
        if op == "gumbel":
            inputs, grad = [x], torch.randn(rows, cols, generator=gen).to(device, dtype)
            make_loss = lambda fn=fn, x=x: fn(x)  # noqa: E731
            byte_model = _BYTES["gumbel"]
        else:
            t = (torch.randn(rows, cols, generator=gen) * 2).to(device, dtype).requires_grad_(teacher_grad)
            inputs, grad = [x, t], None
            make_loss = lambda fn=fn, x=x, t=t: fn(x, t)  # noqa: E731
            byte_model = _BYTES["kl_teacher_grad" if teacher_grad else "kl"]
        try:
            res = bench_impl(make_loss, inputs, grad, device, repeats, warmup)
            add_bandwidth(res, rows * cols, x.element_size(), byte_model, peak_gbps)
        except Exception as exc:  # noqa: BLE001 - e.g. torch.compile failing: record and go on
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
    cols = f"{'impl':<28}{'fwd ms':>10}{'bwd ms':>10}{'f+b ms':>10}{'f+b GB/s':>10}"
    cols += f"{'%peak':>7}" if peak_gbps else ""
    print(cols + f"{'peak MiB':>10}")
    for impl, res in entry["results"].items():
        if "error" in res:
            print(f"{impl:<28}skipped/failed: {res['error']}")
            continue
        line = f"{impl:<28}{res['fwd_ms']:>10.3f}{res['bwd_ms']:>10.3f}{res['fwd_bwd_ms']:>10.3f}"
        line += f"{res['fwd_bwd_gbps']:>10.1f}"
        line += f"{res['fwd_bwd_pct_peak']:>7.1f}" if peak_gbps else ""
        print(line + f"{_fmt(res['peak_extra_mib'], '.1f'):>10}")


def save_plot(report, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"no plot: matplotlib not importable ({type(exc).__name__})"
    cases = report["cases"]
    impls = sorted({impl for c in cases for impl, r in c["results"].items() if "error" not in r})
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(cases)), 5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs = [j + i * width for j, c in enumerate(cases) if "fwd_bwd_ms" in c["results"].get(impl, {})]
        ys = [c["results"][impl]["fwd_bwd_ms"] for c in cases if "fwd_bwd_ms" in c["results"].get(impl, {})]
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{c['case']}\n{c['rows']}x{c['cols']}" for c in cases], rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward, ms (median, log scale)")
    ax.set_title(f"matekd_ds.kernels on {report['device']['name']} ({report['dtype']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (and no torch.compile on CPU)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="logits dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--only", default=None, help="regex: run only the cases whose name matches")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--no-save", action="store_true", help="print only; write no JSON / PNG")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype or ("bf16" if on_gpu else "fp32")]
    repeats = args.repeats or ((10 if on_gpu else 3) if args.quick else (50 if on_gpu else 10))
    warmup = 2 if args.quick else 5
    info = device_info(device)
    kernels = load_kernels()
    cpu_note = "  -> CPU run: torch paths only (Triton would be interpreted)"
    print(f"device: {info['name']}" + ("" if on_gpu else cpu_note))

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
        elif op == "kl":
            impls = kl_impls(kernels, on_gpu, compile_fn, liger)
        else:  # C == 1 is regression: the kernels reject it, the MSE on logits is the reference
            impls = mse_impls(compile_fn)
        entry = run_case(case, impls, device, dtype, repeats, warmup, info["peak_hbm_gbps"])
        if op == "mse":
            mse_note = "C=1 regression: MSE on logits (kernels need C>=2)"
            entry["note"] = f"{entry['note']}; {mse_note}" if entry["note"] else mse_note
        entries.append(entry)
        print_case(entry, info["peak_hbm_gbps"])

    report = {
        "device": info, "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
        "versions": versions(), "dtype": str(dtype).replace("torch.", ""), "quick": args.quick,
        "repeats": repeats, "warmup": warmup, "temperature": TEMPERATURE, "tau": TAU,
        "skipped": {"torch_compile": compile_skip or None, "liger_kl": liger_skip or None,
                    "matekd_triton": None if on_gpu else "CPU run"},
        "notes": ["times are medians in ms; GB/s counts the minimal bytes of an ideal fused kernel "
                  "(gumbel: fwd 2, bwd 3 x M*V elements; kl: fwd 2, bwd 3 (4 with teacher grad) x N*C)",
                  "KL rows time the student-only gradient (Liger differentiates its input only), "
                  "except matekd_triton_teacher_grad",
                  "peak_extra_mib: peak allocation of one forward+backward above the inputs (GPU only)"],
        "cases": entries,
    }
    for what, why in report["skipped"].items():
        if why:
            print(f"skipped {what}: {why}")
    if args.no_save:
        return report
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-") if on_gpu else "cpu"
    stem = args.out_dir / f"kernels_{slug}_{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    print(f"results: {stem.with_suffix('.json')}")
    print(save_plot(report, stem.with_suffix(".png")))
    return report


if __name__ == "__main__":
    main()
