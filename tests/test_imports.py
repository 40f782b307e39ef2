"""Every module of the package imports on its own, in a fresh interpreter: no import cycle that
only works when something else happened to be imported first."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers import child_env

import matekd_ds

PACKAGE = Path(matekd_ds.__file__).resolve().parent
NOT_IMPORTABLE = {"matekd_ds.__main__"}  # runs the CLI when imported, by design


def package_modules() -> list[str]:
    """Dotted names of every module of the installed package (kernels/ installs as matekd_ds.kernels)."""
    import matekd_ds.kernels

    roots = {"matekd_ds": PACKAGE, "matekd_ds.kernels": Path(matekd_ds.kernels.__file__).resolve().parent}
    names = set()
    for prefix, root in roots.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.add(".".join((prefix, *parts)))
    return sorted(names - NOT_IMPORTABLE)


def import_alone(name: str) -> tuple[str, int, str]:
    done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=child_env(),
                          timeout=300)
    return name, done.returncode, done.stderr.strip().splitlines()[-1:] and done.stderr.strip().splitlines()[-1]


def test_every_module_imports_in_a_fresh_interpreter():
    names = package_modules()
    assert {"matekd_ds.metrics", "matekd_ds.pipeline", "matekd_ds.data.tasks", "matekd_ds.kernels.gumbel"} <= set(names)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(import_alone, names))
    failures = [f"{name}: {error}" for name, code, error in results if code != 0]
    assert not failures, "\n".join(failures)
