"""`matekd eval`: score a model on labeled data, sharded over however many ranks the launcher
started.

The model: a run directory (its `student/`), any model folder of a run (`runs/x/teacher`,
`runs/x/student_best`: the run's config applies), or a model path / hub id (give `task=...` or
`--config`). The data: the task's dev sets, whole (`--max-examples N` limits them), or any
labeled source given with `--data` (see data/sources.py), several in one table. For
classification, each data set also gets its confusion matrix and per-class precision, recall
and F1. `--perturbed` adds robustness: the same data perturbed by a generator, the model and
the run's teacher on both (robustness.py).

Everything is loaded and checked (config, data, model, label count, vocabularies) before the
process group forms: bad input is one line and exit 2 on every rank. `load_target` is the one
load path of `matekd eval`, `matekd predict --data` (predict.py) and `matekd predict
--glue-test` (glue_submission.py); it returns a frozen value, and `load_robustness` builds
what `--perturbed` adds into another.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from matekd_ds import distributed, models
from matekd_ds.checkpoint import verify_export
from matekd_ds.config import RunConfig, config_from_dict, merge, parse_override, read_config_file
from matekd_ds.data.batching import Encoded, encode
from matekd_ds.data.glue import TaskSpec
from matekd_ds.data.loaders import Example
from matekd_ds.data.sources import Columns, column_choices, read_source
from matekd_ds.data.tasks import load_dev_sets, task_spec
from matekd_ds.errors import MatekdError
from matekd_ds.evaluation import predict
from matekd_ds.metrics import classification_report, predictions_from_outputs, task_metrics
from matekd_ds.robustness import Perturbation, changed_token_fraction, perturbed_copy, side_by_side
from matekd_ds.run_dir import RunDir

# Limits a run may have trained and selected with; `matekd eval` scores whole sets unless told.
_RUN_LIMITS = ("max_train_examples", "max_eval_examples")


# ---------------------------------------------------------------------------------------------
# What is evaluated, in which task's terms


@dataclass(frozen=True)
class Target:
    model: str  # a model folder or hub id
    run: RunDir | None  # the run whose config says the task, columns and labels
    is_run: bool  # the target was the run directory itself (its student)


def quiet_libraries() -> None:
    """No "Loading weights" bars from transformers: stderr is for what matekd says."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def looks_like_a_path(target: str) -> bool:
    """A local path rather than a hub id (`org/name`): absolute or relative (`/`, `.`, `~`),
    deeper than org/name, or inside a folder that exists here (`runs/typo`)."""
    parent = Path(target).expanduser().parent
    return target.startswith(("/", ".", "~")) or target.count("/") > 1 or (parent != Path(".") and parent.is_dir())


def unfinished_run_line(run: RunDir, target: str) -> str:
    """Why a run directory has no student to score, and how to finish it."""
    status = run.status() or "no metrics.json"
    if status == "completed":
        return f"{target} is a completed run whose student/ export is missing"
    best = f"; its best student so far: {run.model_dir('student_best')}" if run.has_model("student_best") else ""
    unless_live = " (unless it is still training)" if status == "running" else ""
    return (f"{target} is an unfinished run without a student export yet (status: {status}); finish it{unless_live} "
            f"with `matekd train --resume --config {run.config_file} output.dir={target}`{best}")


def resolve_target(target: str) -> Target:
    """A run directory means its student/; a model folder inside a run directory means that
    model in that run's terms; anything else is a model on its own."""
    path = Path(target)
    if not path.expanduser().exists() and looks_like_a_path(target):
        raise MatekdError(f"no such run or model directory: {target}")  # not "cannot reach the hub"
    run = RunDir(path)
    if run.is_run():
        return Target(str(run.model_dir("student")), run, True)
    if run.config_file.is_file():
        raise MatekdError(unfinished_run_line(run, target))
    parent = RunDir(path.parent)
    if (path / "config.json").is_file() and parent.config_file.is_file():
        return Target(target, parent, False)
    return Target(target, None, False)


def _explicit_keys(overrides: list[str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for text in overrides:
        data = merge(data, parse_override(text))
    return data


def target_config(target: Target, config: str | None, overrides: list[str],
                  max_examples: int | None = None) -> RunConfig:
    """The run's config (or --config), the command line's keys over it. Example limits come from
    the command line only (`--max-examples`, `data.max_eval_examples=`), never from a config
    file: a run that selected on a dev subset is still scored on the whole set."""
    if config is None and target.run is None and not overrides:
        raise MatekdError(f"{target.model} is not a run directory: give --config or task=... to say what it is for")
    base = read_config_file(config) if config else (target.run.read_config() if target.run else {})
    base = merge(base, {"data": dict.fromkeys(_RUN_LIMITS)})
    data = merge(base, _explicit_keys(overrides))
    if max_examples is not None:
        if max_examples < 1:
            raise MatekdError(f"--max-examples must be >= 1, got {max_examples}")
        data = merge(data, {"data": {"max_eval_examples": max_examples}})
    return config_from_dict(data, for_training=False)


def run_columns(cfg: RunConfig, spec: TaskSpec) -> Columns | None:
    """The columns the run itself read (custom task), or the synthetic task's; None for GLUE
    (its hub and TSV names are known)."""
    if cfg.task == "custom":
        return Columns(tuple(cfg.data.text_columns), cfg.data.label_column)
    if cfg.task == "synthetic":
        return Columns(spec.text_keys, "label")
    return None


def load_model(role: str, spec_path: str, task: TaskSpec, tokenizer, max_length: int) -> torch.nn.Module:
    """A classifier for `task`, checked: its label count, and max_length against its positions."""
    model = models.load_classifier(role, spec_path, task.num_labels, tokenizer, task.is_regression)
    models.check_input_length({role: model}, max_length)
    return model.eval()


def load_target_tokenizer(target: Target):
    """The model folder's tokenizer; for a model of a run saved without one, the run's."""
    if target.run is not None and not models.has_tokenizer_files(target.model) and target.run.tokenizer_dir.is_dir():
        return models.load_tokenizer(str(target.run.tokenizer_dir))
    return models.load_tokenizer(target.model, role="model")


D = TypeVar("D")


@dataclass(frozen=True)
class Loaded(Generic[D]):
    """A model to score, in its task's terms, and the data a command scores with it: loaded and
    checked."""

    target: Target
    cfg: RunConfig
    spec: TaskSpec
    data: D  # what the command reads (labeled sets, one file, GLUE test sets), read before the model
    tokenizer: Any
    model: torch.nn.Module


def load_target(target: str, config: str | None, overrides: list[str],
                read_data: Callable[[RunConfig, TaskSpec], D], max_examples: int | None = None) -> Loaded[D]:
    """Resolve `target` (a run, a model of a run, any model) and its config and task; read the
    command's data with `read_data(cfg, spec)` (it checks the command's own inputs too, before
    any model is loaded); load the tokenizer and the model, checked against the task."""
    quiet_libraries()
    resolved = resolve_target(target)
    verify_export(resolved.model)  # an export of this project must match its manifest; others load as they are
    cfg = target_config(resolved, config, overrides, max_examples)
    spec = task_spec(cfg)
    data = read_data(cfg, spec)
    tokenizer = load_target_tokenizer(resolved)
    model = load_model("model", resolved.model, spec, tokenizer, cfg.data.max_length)
    return Loaded(resolved, cfg, spec, data, tokenizer, model)


def encode_rows(loaded: Loaded, examples: list[Example]) -> Encoded:
    """`examples` tokenized for the loaded model."""
    return encode(examples, loaded.tokenizer, loaded.cfg.data.max_length, loaded.spec.is_regression)


# ---------------------------------------------------------------------------------------------
# The data


@dataclass
class DataOptions:
    sources: list[str] = field(default_factory=list)  # --data: files, folders, hub:... splits
    text_columns: list[str] | None = None
    label_column: str | None = None
    no_header: bool = False  # CSV/TSV files without a header line: columns by number


def reads_headerless(cfg: RunConfig, no_header: bool, text_columns: list[str] | None) -> bool:
    """--no-header; or a run trained on headerless files (data.no_header) and its own numbered
    columns, when no other columns are named."""
    return no_header or (cfg.task == "custom" and cfg.data.no_header and not text_columns)


@dataclass(frozen=True)
class EvalSets:
    """The labeled sets to score, and each one's size before data.max_eval_examples cut it."""

    examples: dict[str, list[Example]]
    whole_sizes: dict[str, int]

    @property
    def whole(self) -> bool:
        return all(len(rows) == self.whole_sizes[name] for name, rows in self.examples.items())


def eval_sets(cfg: RunConfig, spec: TaskSpec, options: DataOptions, overrides: list[str]) -> EvalSets:
    """The --data sources, else `data.dev_file=` of the command line, else the task's dev sets;
    each limited to data.max_eval_examples when one was asked for."""
    sources = list(options.sources)
    if not sources and cfg.data.dev_file and "dev_file" in _explicit_keys(overrides).get("data", {}):
        sources = [cfg.data.dev_file]  # `matekd eval RUN data.dev_file=F`, whatever the task
    if sources:
        choices = column_choices(spec, run_columns(cfg, spec), options.text_columns, options.label_column)
        no_header = reads_headerless(cfg, options.no_header, options.text_columns)
        sets = {rows.name: rows.examples for source in sources
                for rows in read_source(source, spec, choices, True, no_header=no_header)}
    else:
        sets = load_dev_sets(cfg)
    limit = cfg.data.max_eval_examples
    return EvalSets({name: examples[:limit] if limit else examples for name, examples in sets.items()},
                    {name: len(examples) for name, examples in sets.items()})


def labeled_sets(cfg: RunConfig, spec: TaskSpec, options: DataOptions,
                 overrides: list[str]) -> dict[str, list[Example]]:
    """{name: examples}: eval_sets' examples."""
    return eval_sets(cfg, spec, options, overrides).examples


# ---------------------------------------------------------------------------------------------
# Robustness: which generator and teacher


@dataclass
class RobustnessOptions:
    enabled: bool = False
    generator: str | None = None
    teacher: str | None = None
    seed: int = 0
    mask_prob: float | None = None  # None: the run's matekd.mask_prob
    record: bool = False  # record a subset's numbers in the run even over whole-set ones


def _generator(target: Target, cfg: RunConfig, options: RobustnessOptions, tokenizer, seed: int
               ) -> tuple[torch.nn.Module, str]:
    """--generator; else the run's warmed generator; else the run's models.generator (a builtin
    one is built untrained, from the seed)."""
    if options.generator:
        spec, name = options.generator, options.generator
    elif target.run is not None and target.run.has_model("generator_warm"):
        spec = name = str(target.run.model_dir("generator_warm"))
    elif target.run is not None:
        spec = cfg.models.generator
        name = spec + (" (untrained: a builtin generator is not exported by training)"
                       if models.is_builtin(spec) else "")
    else:
        raise MatekdError("--perturbed needs a generator for a model outside a run directory: give --generator PATH")
    verify_export(spec)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        generator = models.load_generator(spec, tokenizer)
    models.masked_lm_parts(generator)  # an unsupported MLM head is refused here, in one line
    return generator.eval(), name


def _teacher_spec(target: Target, cfg: RunConfig, options: RobustnessOptions) -> str | None:
    """--teacher; else the run's fine-tuned teacher/; else its models.teacher when the run used
    a teacher and it is a real model (a builtin one was random before fine-tuning)."""
    if options.teacher:
        return options.teacher
    if target.run is None:
        return None
    if target.run.has_model("teacher"):
        return str(target.run.model_dir("teacher"))
    uses_teacher = cfg.method != "ft" or cfg.models.student_init_from_teacher_layers is not None
    return cfg.models.teacher if uses_teacher and not models.is_builtin(cfg.models.teacher) else None


def _same_model(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalRequest:
    target: str
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    data: DataOptions = field(default_factory=DataOptions)
    max_examples: int | None = None
    robustness: RobustnessOptions = field(default_factory=RobustnessOptions)


@dataclass(frozen=True)
class RobustnessInputs:
    """What `--perturbed` adds: the generator, how it perturbs, and the teacher (if any)."""

    generator: torch.nn.Module
    perturbation: Perturbation
    teacher: torch.nn.Module | None
    teacher_name: str | None


def load_robustness(loaded: Loaded, options: RobustnessOptions) -> RobustnessInputs:
    """The generator and teacher for `loaded`'s model, checked to share its vocabulary."""
    cfg, target = loaded.cfg, loaded.target
    mask_prob = options.mask_prob if options.mask_prob is not None else cfg.matekd.mask_prob
    if not 0.0 < mask_prob <= 1.0:
        raise MatekdError(f"--mask-prob must be in (0, 1], got {mask_prob}")
    generator, name = _generator(target, cfg, options, loaded.tokenizer, options.seed)
    teacher_name = _teacher_spec(target, cfg, options)
    if teacher_name is not None and _same_model(teacher_name, target.model):
        teacher_name = None  # the model itself: nothing to compare it with
    if teacher_name is not None:
        verify_export(teacher_name)
    teacher = None if teacher_name is None else load_model("teacher", teacher_name, loaded.spec, loaded.tokenizer,
                                                           cfg.data.max_length)
    roles = {"model": loaded.model, "generator": generator, **({"teacher": teacher} if teacher is not None else {})}
    models.check_shared_vocabulary(roles, loaded.tokenizer)
    return RobustnessInputs(generator, Perturbation(name, mask_prob, cfg.matekd.gumbel_tau, options.seed),
                            teacher, teacher_name)


def _split_report(spec: TaskSpec, outputs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    if spec.is_regression:
        return {}
    return classification_report(predictions_from_outputs(spec, outputs), labels, spec.label_names)


def evaluate_target(request: EvalRequest) -> dict[str, Any] | None:
    """The results (rank 0; None elsewhere): per data set its size, metrics and, for
    classification, confusion matrix and per-class scores; with --perturbed, robustness."""
    loaded = load_target(request.target, request.config, request.overrides,
                         lambda cfg, spec: eval_sets(cfg, spec, request.data, request.overrides),
                         request.max_examples)
    sets = {name: encode_rows(loaded, rows) for name, rows in loaded.data.examples.items()}
    robust = load_robustness(loaded, request.robustness) if request.robustness.enabled else None
    distributed.init()  # after every input check: bad input exits before any rank waits on another
    device = distributed.device()
    batch = loaded.cfg.eval.batch_size
    pad = loaded.tokenizer.pad_token_id
    loaded.model.to(device)
    outputs = {name: predict(loaded.model, data, batch, pad, device) for name, data in sets.items()}
    labels = {name: np.asarray(data.labels) for name, data in sets.items()}
    results: dict[str, Any] = {
        "model": loaded.target.model, "task": loaded.spec.name, "world_size": distributed.world_size(),
        "examples": {name: len(data) for name, data in sets.items()},
        "dev": {name: task_metrics(loaded.spec, outputs[name], labels[name]) for name in sets},
    }
    if not loaded.spec.is_regression:
        results["classes"] = {name: _split_report(loaded.spec, outputs[name], labels[name]) for name in sets}
    if robust is not None:
        results["robustness"] = _robustness(loaded, sets, robust, outputs, labels, device)
        results["robustness"].update(examples=results["examples"], set_sizes=loaded.data.whole_sizes,
                                     whole_sets=loaded.data.whole)
        _record_robustness(loaded, request, results["robustness"])
    return results if distributed.is_main() else None


def _robustness(loaded: Loaded, sets: dict[str, Encoded], robust: RobustnessInputs, clean: dict[str, np.ndarray],
                labels: dict[str, np.ndarray], device: torch.device) -> dict[str, Any]:
    batch, pad = loaded.cfg.eval.batch_size, loaded.tokenizer.pad_token_id
    robust.generator.to(device)
    if robust.teacher is not None:
        robust.teacher.to(device)
    splits = {}
    for name, data in sets.items():
        noisy = perturbed_copy(data, robust.generator, loaded.tokenizer, robust.perturbation, device)
        model = {"clean": clean[name], "perturbed": predict(loaded.model, noisy, batch, pad, device)}
        teacher = None
        if robust.teacher is not None:
            teacher = {"clean": predict(robust.teacher, data, batch, pad, device),
                       "perturbed": predict(robust.teacher, noisy, batch, pad, device)}
        report = side_by_side(loaded.spec, labels[name], model, teacher)
        report["changed_token_fraction"] = changed_token_fraction(data, noisy, loaded.tokenizer.all_special_ids)
        splits[name] = report
    return {"settings": robust.perturbation.as_dict(), "teacher": robust.teacher_name, "splits": splits}


def _replaces_whole_sets(run: RunDir, robustness: dict[str, Any], record: bool) -> bool:
    """Whether recording `robustness` would put a subset's numbers (--max-examples) over a
    whole-set record without --record. A record written before sizes were recorded counts as whole."""
    if robustness["whole_sets"] or record:
        return False
    existing = run.read_robustness()
    return existing is not None and existing.get("whole_sets", True)


def _record_robustness(loaded: Loaded, request: EvalRequest, robustness: dict[str, Any]) -> None:
    """A run's own student on its own dev sets: kept in the run directory (robustness.json) and
    in its model cards, through the run's RunDir; a --max-examples subset only where no
    whole-set record is there, or with --record. Best effort: a read-only (or damaged) run
    directory only loses the record, and says so."""
    if not (loaded.target.is_run and not request.data.sources and distributed.is_main()):
        return
    run = RunDir(loaded.target.run.path)
    try:
        run.read_state()
        if _replaces_whole_sets(run, robustness, request.robustness.record):
            print(f"[matekd] robustness of {_sizes(robustness)} examples not recorded in {run.path}: its "
                  "robustness.json holds whole-set numbers (--record replaces them)", file=sys.stderr)
            return
        run.write_robustness(robustness)
        run.refresh_cards()
    except OSError as err:
        print(f"[matekd] could not record robustness in {run.path}: {err.strerror or err}", file=sys.stderr)
    except MatekdError as err:
        print(f"[matekd] could not record robustness in {run.path}: {err}", file=sys.stderr)


def _sizes(robustness: dict[str, Any]) -> str:
    """"10 of 40" (per data set, joined) for a subset."""
    return ", ".join(f"{n} of {robustness['set_sizes'][name]}" for name, n in robustness["examples"].items())


# ---------------------------------------------------------------------------------------------
# The table a person reads


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [_row(rows[0], widths), _row(["-" * w for w in widths], widths)] + [_row(r, widths) for r in rows[1:]]


def format_results(results: dict[str, Any]) -> str:
    """Metrics of every data set in one table; then, for classification, each data set's
    per-class scores and confusion matrix; then robustness."""
    names = list(results["dev"])
    metrics = [m for m in next(iter(results["dev"].values())) if m != "main"]
    lines = [f"model {results['model']}  task {results['task']}  ({results['world_size']} rank(s))", ""]
    lines += _table([["data", "examples", *metrics]]
                    + [[n, str(results["examples"][n]), *(f"{results['dev'][n][m]:.4f}" for m in metrics)]
                       for n in names])
    for name, report in (results.get("classes") or {}).items():
        labels = report["labels"]
        lines += ["", f"{name}: per class (rows: true class, columns: predicted)"]
        lines += _table([["class", "precision", "recall", "f1", "support", *labels]]
                        + [[c, *(f"{report['per_class'][c][k]:.4f}" for k in ("precision", "recall", "f1")),
                            str(report["per_class"][c]["support"]), *map(str, report["confusion_matrix"][i])]
                           for i, c in enumerate(labels)])
    if "robustness" in results:
        lines += ["", *_format_robustness(results["robustness"])]
    return "\n".join(lines)


def _format_robustness(robust: dict[str, Any]) -> list[str]:
    s = robust["settings"]
    lines = [f"robustness: generator {s['generator']}, mask {s['mask_prob']}, tau {s['tau']}, seed {s['seed']}"
             + (f"; teacher {robust['teacher']}" if robust.get("teacher") else "")]
    rows = [["data", "who", "metric", "clean", "perturbed"]]
    for name, report in robust["splits"].items():
        for who in ("model", "teacher"):
            for metric, value in report["clean"].get(who, {}).items():
                if metric != "main":
                    rows.append([name, who, metric, f"{value:.4f}", f"{report['perturbed'][who][metric]:.4f}"])
        for metric in ("agreement", "kl", "mse_to_teacher"):
            if metric in report["clean"]:
                rows.append([name, "model vs teacher", metric, f"{report['clean'][metric]:.4f}",
                             f"{report['perturbed'][metric]:.4f}"])
        rows.append([name, "", "changed tokens", "", f"{report['changed_token_fraction']:.4f}"])
    return lines + _table(rows)
