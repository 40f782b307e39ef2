"""Reading an experiment spec: `extends:` merged, ${VAR} expanded, every key checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matekd_ds.config import AUGMENTING, METHODS, merge, read_config_file
from matekd_ds.errors import MatekdError

DEFAULT_METHODS = ("ft", "kd", "matekd")  # a spec without `methods` (kd-aug is named when wanted)
SPEC_KEYS = {"output_dir", "report_dir", "tasks", "methods", "seeds", "base", "method_overrides", "teacher",
             "generator", "transfer_sizes"}


def _read_extended(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The spec deep-merged over the spec its `extends:` names (a path relative to this spec's
    folder), so one arm of a sweep states only what it changes. Mappings merge key by key; lists
    and values replace."""
    if path.resolve() in chain:
        raise MatekdError(f"experiment spec {chain[0]}: 'extends' comes back to {path}")
    spec = read_config_file(path)
    parent = spec.pop("extends", None)
    if parent is None:
        return spec
    if not isinstance(parent, str) or not parent.strip():
        raise MatekdError(f"experiment spec {path}: 'extends' must name a spec file, got {parent!r}")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise MatekdError(f"experiment spec {path}: 'extends' names {parent_path}, which does not exist")
    inherited = _read_extended(parent_path, (*chain, path.resolve()))
    return without_dropped_tasks(merge(inherited, spec), inherited)


def without_dropped_tasks(spec: dict[str, Any], parent: dict[str, Any]) -> dict[str, Any]:
    """`spec` less the tasks it inherits from `parent` and sets to null (`tasks: {sst2: null}`:
    an arm that runs only some of the tasks it inherits)."""
    tasks, inherited = spec.get("tasks"), parent.get("tasks")
    if not isinstance(tasks, dict) or not isinstance(inherited, dict):
        return spec
    return {**spec, "tasks": {k: v for k, v in tasks.items() if not (v is None and k in inherited)}}


def read_spec(path: str | Path) -> dict[str, Any]:
    spec = _read_extended(Path(path))  # read_config_file expanded ${VAR}s
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise MatekdError(f"experiment spec {path}: unknown key '{min(unknown)}' "
                          f"(valid: {', '.join(sorted(SPEC_KEYS))})")
    for key in ("output_dir", "tasks", "teacher"):
        if not spec.get(key):
            raise MatekdError(f"experiment spec {path}: '{key}' is required")
    if not isinstance(spec["tasks"], dict):
        raise MatekdError(f"experiment spec {path}: 'tasks' must map task names to run-config overrides")
    methods = spec.setdefault("methods", list(DEFAULT_METHODS))
    overrides = spec.get("method_overrides") or {}
    for name in methods:  # a method, or a variant: a name whose overrides say `method: ...`
        if base_method(name, overrides) not in METHODS:
            raise MatekdError(f"experiment spec {path}: unknown method '{name}' (valid: {', '.join(METHODS)}, "
                              "or a variant name with method_overrides.<name>.method)")
    seeds = spec.setdefault("seeds", [1, 2, 3])
    if not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise MatekdError(f"experiment spec {path}: 'seeds' must be a list of distinct integers")
    teacher = spec["teacher"]
    if not isinstance(teacher, dict) or not (teacher.get("model") or teacher.get("finetuned")):
        raise MatekdError(f"experiment spec {path}: teacher needs 'model' (fine-tuned per task) or 'finetuned' paths")
    if any(uses_generator(m, spec) for m in methods) and not (spec.get("generator") or {}).get("model"):
        raise MatekdError(f"experiment spec {path}: method matekd needs generator.model")
    if spec.get("transfer_sizes") is not None:
        _check_transfer_sizes(spec["transfer_sizes"], path)
    return spec


def _check_transfer_sizes(sizes: Any, path: str | Path) -> None:
    where = f"experiment spec {path}: 'transfer_sizes'"
    if not isinstance(sizes, list) or not sizes:
        raise MatekdError(f"{where} must be a non-empty list of training-set sizes, got {sizes!r}")
    for size in sizes:
        if not isinstance(size, int) or isinstance(size, bool):
            raise MatekdError(f"{where} must hold integers (numbers of training examples), got {size!r}")
        if size <= 0:
            raise MatekdError(f"{where} must hold positive sizes, got {size}")
        if sizes.count(size) > 1:
            raise MatekdError(f"{where} lists {size} more than once")


def base_method(name: str, method_overrides: dict[str, Any]) -> str:
    """`kd`, or the method a variant such as `matekd-lr1e-5` names in its overrides."""
    return (method_overrides.get(name) or {}).get("method", name)


def uses_generator(name: str, spec: dict[str, Any]) -> bool:
    """Whether method `name`'s runs perturb with a generator: matekd, unless its run config (the
    spec's base, then the variant's overrides) says matekd.perturbation: random."""
    overrides = spec.get("method_overrides") or {}
    if base_method(name, overrides) not in AUGMENTING:
        return False
    cfg = merge(spec.get("base") or {}, overrides.get(name) or {})
    return (cfg.get("matekd") or {}).get("perturbation", "generator") != "random"
