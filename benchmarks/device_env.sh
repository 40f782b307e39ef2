#!/usr/bin/env bash
# Readies a lent GPU machine for benchmarks/gpu_check.sh in one call. The machine has no network
# and its own torch and Triton, but no DeepSpeed, and `pip install -e .` fails there (the image's
# setuptools fetches build dependencies). So:
#   here:  bash benchmarks/device_env.sh wheels .whl       # DeepSpeed (built pure-Python) and the
#                                                          # packages it needs that the image lacks, for cp312
#   there: source benchmarks/device_env.sh install .whl    # installs them under /tmp/site and puts the
#                                                          # package (kernels/ as matekd_ds.kernels) on PYTHONPATH
# then MATEKD_PYTHON=python3 bash benchmarks/gpu_check.sh DIR. Used on 2026-12-04 (H200, torch
# 2.11, Triton 3.6): benchmarks/results/gpu_check_nvidia-h200_20261204.json.
set -eo pipefail
action=${1:?"usage: device_env.sh wheels|install DIR"}
dir=${2:?"usage: device_env.sh wheels|install DIR"}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

version_of() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }

case $action in
    wheels)  # the versions this checkout's environment runs, so the GPU runs what CI tested
        mkdir -p "$dir"
        platforms=()
        for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
        packages=()
        for name in pydantic pydantic_core annotated-types typing-inspection hjson; do
            packages+=("$name==$(version_of "$name")")
        done
        python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" -d "$dir" "${packages[@]}"
        DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation \
            "deepspeed==$(version_of deepspeed)" -w "$dir"
        ls "$dir" ;;
    install)  # sourced: exports PYTHONPATH
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$dir"/*.whl
        # pytest from the root imports ./matekd_ds (cwd first on sys.path), scripts import /tmp/pkg:
        # both need kernels/ and ds_configs/ inside the package, as setup.py's package_dir maps them.
        ln -sfn ../kernels "$repo/matekd_ds/kernels"
        ln -sfn ../ds_configs "$repo/matekd_ds/ds_configs"
        rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -rL "$repo/matekd_ds" /tmp/pkg/
        export PYTHONPATH=/tmp/site:/tmp/pkg
        python3 -c "import deepspeed, matekd_ds.kernels; print('device_env: deepspeed', deepspeed.__version__)" ;;
    *) echo "device_env.sh: unknown action '$action' (wheels, install)" >&2; exit 2 ;;
esac
