#!/usr/bin/env bash
# Everything to check the day a GPU is lent, in one command: under 9 minutes on one H100/H200,
# each step under a time limit of its own, results as JSON in OUT_DIR.
#   benchmarks/gpu_check.sh OUT_DIR            # run it (needs a CUDA device)
#   benchmarks/gpu_check.sh OUT_DIR --dry-run  # print the plan; runs nothing, writes nothing (CPU, CI)
# Steps (a failed or timed-out step is recorded and the next one runs):
#   versions      nvidia-smi (text and CSV) and the stack's versions          -> versions.json, nvidia-smi.txt
#   kernel_tests  the Triton kernel tests natively on CUDA (no interpreter)   -> kernel_tests.xml (JUnit)
#   bench_kernels kernels vs torch eager and vs the memory bound, bf16        -> kernels_<gpu>_<date>.json
#   bench_train   the MATE-KD step vs the eager reference, preset gpu-base    -> train_gpu-base_<gpu>_<date>.json
#                 (bf16)
#   bench_train_b128  the same at batch 128 (MFU at a size that fills the GPU) -> logs/bench_train_b128.log
#   bench_optimizer   the student's backward and step per DeepSpeed config     -> optimizer_gpu-base_<gpu>_<date>.json
#                 at world size 1 (which engine a single-rank bf16 run should get), with a profile
#   train         one `matekd train` in bf16, its teacher a ZeRO-3 engine      -> train_metrics.json
#   summary.json  every step's exit code and seconds, and the headline figures (kernel speedups from
#                 the kernels JSON, the `name: value` lines of the benchmarks)
# Environment: MATEKD_PYTHON, the python with matekd-ds installed (default: python on PATH).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${MATEKD_PYTHON:-python}
dry_run=0
out=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -*) echo "benchmarks/gpu_check.sh: error: unknown option $arg" >&2; exit 2 ;;
    *) [[ -z "$out" ]] || { echo "benchmarks/gpu_check.sh: error: one OUT_DIR, got '$out' and '$arg'" >&2; exit 2; }
       out=$arg ;;
  esac
done
[[ -n "$out" ]] || { echo "usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run]" >&2; exit 2; }
out=$(realpath -m "$out")

# name | time limit (s) | command, run in the repository root with OUT set to the results folder
STEPS=(
  "versions|15|nvidia-smi > \"\$OUT/nvidia-smi.txt\" && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv > \"\$OUT/nvidia-smi.csv\" && $PYTHON -c 'import json, sys; sys.path.insert(0, \"benchmarks\"); from harness import versions, git_commit, device_name; print(json.dumps({\"versions\": versions(), \"git_commit\": git_commit(), \"device\": device_name()}, indent=2))' > \"\$OUT/versions.json\""
  "kernel_tests|85|env -u TRITON_INTERPRET $PYTHON -m pytest -q -p no:cacheprovider tests/test_kernels_gumbel.py tests/test_kernels_divergence.py tests/test_kernels_sample_ids.py tests/test_kernels_backend.py --junitxml \"\$OUT/kernel_tests.xml\""
  "bench_kernels|115|$PYTHON benchmarks/bench_kernels.py --quick --dtype bf16 --no-compile --out-dir \"\$OUT\""
  "bench_train|85|$PYTHON benchmarks/bench_train.py --preset gpu-base train.dtype=bf16"
  "bench_train_b128|70|$PYTHON benchmarks/bench_train.py --preset gpu-base train.dtype=bf16 train.micro_batch_size=128 --repeats 2 --no-save"
  "bench_optimizer|50|$PYTHON benchmarks/bench_optimizer.py --preset gpu-base train.dtype=bf16 --profile --out-dir \"\$OUT\""
  "train|95|$PYTHON -m matekd_ds train train.dtype=bf16 deepspeed.teacher=teacher-inference deepspeed.student=zero2 deepspeed.generator=zero2 models.teacher_finetune_epochs=1 train.max_steps=300 logging.progress=false logging.tensorboard=false output.dir=\"\$RUN_DIR\" && cp \"\$RUN_DIR/metrics.json\" \"\$OUT/train_metrics.json\""
)

total=0
for step in "${STEPS[@]}"; do IFS='|' read -r _ limit _ <<< "$step"; total=$((total + limit)); done

if (( dry_run )); then
  echo "gpu_check: plan: OUT=$out, run from $REPO with $PYTHON; each step under its own limit, ${total}s at most in all"
  i=0
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit command <<< "$step"
    i=$((i + 1))
    echo "$i. $name (limit ${limit}s): $command"
  done
  echo "then: summary.json in OUT (every step's exit code and seconds; kernel test counts, bench speedups, train status)"
  exit 0
fi

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || {
  echo "benchmarks/gpu_check.sh: error: no CUDA device here (try --dry-run)" >&2; exit 2; }
mkdir -p "$out/logs"
RUN_DIR=$(mktemp -d)
cleanup() { rm -rf "$RUN_DIR"; }
trap cleanup EXIT
export OUT="$out" RUN_DIR
cd "$REPO"

for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit command <<< "$step"
  echo "gpu_check: $name (limit ${limit}s)" >&2
  started=$(date +%s%N)
  set +e
  timeout --kill-after=10 "$limit" bash -c "$command" > "$out/logs/$name.log" 2>&1
  code=$?
  set -e
  echo "$code $(( ($(date +%s%N) - started) / 1000000 ))" > "$out/logs/$name.status"  # exit code, milliseconds
  echo "gpu_check: $name: exit $code" >&2
done

# bench_train.py has no --out-dir: copy the file it wrote under benchmarks/results/
saved=$(sed -n 's/^\[bench\] wrote \(.*\.json\)$/\1/p' "$out/logs/bench_train.log" | tail -n 1)
if [[ -n "$saved" && -f "$saved" ]]; then cp "$saved" "$out/"; fi

names=()
for step in "${STEPS[@]}"; do names+=("${step%%|*}"); done
"$PYTHON" - "$out" "${names[@]}" <<'EOF'
import json, re, sys, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
summary = {"steps": {}}
for name in sys.argv[2:]:  # in run order
    code, ms = (out / "logs" / f"{name}.status").read_text().split()
    summary["steps"][name] = {"exit_code": int(code), "seconds": round(int(ms) / 1000, 1),
                                     "timed_out": int(code) in (124, 137)}
if (out / "kernel_tests.xml").is_file():
    suite = ET.parse(out / "kernel_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["kernel_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
for kernels in sorted(out.glob("kernels_*.json")):  # bench_kernels prints tables, not `name: value` lines
    speedups = {}
    for case in json.loads(kernels.read_text()).get("cases", []):
        res = case.get("results", {})
        eager, triton = res.get("eager_official", {}), res.get("matekd_triton", {})
        key = "fwd_bwd_ms" if "fwd_bwd_ms" in eager and "fwd_bwd_ms" in triton else "fwd_ms"
        if eager.get(key) and triton.get(key):
            speedups[case["case"]] = round(eager[key] / triton[key], 2)
    summary["kernel_speedup_over_eager"] = speedups
for name in ("bench_train", "bench_train_b128", "bench_optimizer"):
    log = out / "logs" / f"{name}.log"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    summary[name] = {m.group(1): float(m.group(2)) for line in lines
                     if (m := re.match(r"^([a-z0-9_]+): ([0-9.]+)$", line.strip()))}
if (out / "train_metrics.json").is_file():
    metrics = json.loads((out / "train_metrics.json").read_text())
    summary["train"] = {k: metrics.get(k) for k in ("status", "dtype", "final", "throughput", "memory")}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary["steps"], indent=2))
EOF
