"""The model card (`README.md` in `student/`, `student_best/` and a fine-tuned `teacher/`), in
the Hugging Face model-card layout: YAML metadata (pipeline, tags, datasets, a `model-index`
with the dev results), then the task, method, teacher, data, hyper-parameters, dev metrics,
the deployment numbers (size and CPU latency against the teacher, accuracy kept) and, once
`matekd eval RUN --perturbed` has measured them, robustness metrics.

A pure function of the run's config, metrics and robustness record: no file is read or
written here. The run directory (run_dir.RunDir) renders the card from what it holds in memory
and writes it, at each export and whenever it knows more (the end of training, a robustness
evaluation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from matekd_ds import deployment
from matekd_ds.config import RunConfig, augments
from matekd_ds.data.glue import GLUE_HUB_PATH, TaskSpec
from matekd_ds.data.tasks import task_spec

CARD = "README.md"
CARDED_EXPORTS = ("student", "student_best", "teacher")
METHOD_NAMES = {"ft": "fine-tuning on the labels", "kd": "knowledge distillation (Hinton et al., 2015)",
                "matekd": "MATE-KD (Rashid et al., ACL 2021): knowledge distillation with masked adversarial text",
                "kd-aug": "knowledge distillation with masked-LM augmentation: MATE-KD's student step with its "
                          "warmed generator frozen (no adversarial training)"}
RANDOM_TOKENS = "random tokens (uniform over the vocabulary without its special tokens)"  # matekd.perturbation random


# ---------------------------------------------------------------------------------------------
# The card's parts


def _dataset(cfg: RunConfig, spec: TaskSpec) -> dict[str, Any]:
    if cfg.task == "synthetic":
        return {"name": "matekd-ds synthetic sentiment", "type": "synthetic", "split": "dev"}
    if cfg.task == "custom":
        return {"name": f"custom ({Path(cfg.data.dev_file or 'dev').name})", "type": "custom", "split": "dev"}
    return {"name": f"GLUE {spec.name.upper()}", "type": GLUE_HUB_PATH, "config": spec.hub_config,
            "split": "validation"}


def _data_source(cfg: RunConfig) -> str:
    d = cfg.data
    if cfg.task == "synthetic":
        return (f"the built-in procedural sentiment task ({d.synthetic.train_size} training, "
                f"{d.synthetic.dev_size} dev examples, seed {d.synthetic.seed})")
    if cfg.task == "custom":
        return (f"training file `{d.train_file}`, dev file `{d.dev_file}` "
                f"(text {list(d.text_columns)}, label `{d.label_column}`)")
    return f"GLUE TSV folder `{d.path}`" if d.path else f"the hub dataset `{GLUE_HUB_PATH}` ({cfg.task})"


def _limits(cfg: RunConfig) -> str:
    parts = [f"first {n} {what} examples" for n, what in ((cfg.data.max_train_examples, "training"),
                                                          (cfg.data.max_eval_examples, "dev")) if n]
    return "; ".join(parts)


def _teacher(cfg: RunConfig, metrics: dict[str, Any]) -> str:
    if cfg.method == "ft" and cfg.models.student_init_from_teacher_layers is None:
        return "none (fine-tuned on the labels only)"
    epochs = cfg.models.teacher_finetune_epochs or 0
    tuned = f", fine-tuned in this run for {epochs:g} epochs at lr {cfg.models.teacher_finetune_lr:g}" if epochs else ""
    params = (metrics.get("teacher") or {}).get("params")
    size = f", {params / 1e6:.2f}M parameters" if params else ""
    return f"`{cfg.models.teacher}`{tuned}{size}"


def _method_name(cfg: RunConfig) -> str:
    if augments(cfg) and cfg.matekd.perturbation == "random":
        return f"{METHOD_NAMES['matekd']}, its masked tokens replaced by {RANDOM_TOKENS} instead of a generator's " \
               "(a control arm)"
    return METHOD_NAMES[cfg.method]


def hyper_parameters(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    t = cfg.train
    length = {"max_steps": t.max_steps} if t.max_steps is not None else {"epochs": t.epochs}
    out: dict[str, Any] = {
        "method": cfg.method, **length,
        "global batch size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        "learning rate": t.lr, "warm-up ratio": t.warmup_ratio, "weight decay": t.weight_decay,
        "gradient clipping": t.clip, "max sequence length": cfg.data.max_length, "seed": t.seed,
    }
    if cfg.method == "kd":
        out.update({"kd alpha": cfg.kd.alpha, "kd temperature": cfg.kd.temperature})
    if augments(cfg):
        m = cfg.matekd
        weights = [round(w, 4) for w in m.loss_weights]
        if m.perturbation == "random":
            out.update({"mask probability": m.mask_prob, "masked tokens replaced by": RANDOM_TOKENS,
                        "temperature": m.temperature, "loss weights (CE, div clean, div perturbed)": weights})
            return out
        frozen = " (a frozen generator, never trained)" if m.generator_steps == 0 else ""
        out.update({"mask probability": m.mask_prob, "gumbel tau": m.gumbel_tau, "temperature": m.temperature,
                    "generator steps / student steps": f"{m.generator_steps} / {m.student_steps}{frozen}",
                    "generator learning rate": m.generator_lr,
                    "loss weights (CE, div clean, div perturbed)": weights,
                    "generator MLM warm-up steps": m.generator_mlm_warmup_steps,
                    "budget counts": "student steps" if m.extra_generator_steps else "generator and student steps"})
    return out


def _dev(metrics: dict[str, Any], export: str) -> tuple[str, dict[str, dict[str, float]] | None]:
    if export == "student_best" and metrics.get("best"):
        return f"best evaluation (step {metrics['best'].get('step')})", metrics["best"].get("dev")
    if metrics.get("final"):
        return "end of training", metrics["final"]
    return "not recorded yet", None


def _metric_rows(dev: dict[str, dict[str, float]]) -> list[str]:
    return [f"| {split} | {name} | {value:.4f} |" for split, values in dev.items()
            for name, value in values.items() if name != "main"]


def _model_index(name: str, cfg: RunConfig, spec: TaskSpec, dev: dict[str, dict[str, float]] | None) -> list[dict]:
    metrics = [{"type": metric, "value": round(float(value), 4), "name": f"dev {metric} ({split})"}
               for split, values in (dev or {}).items() for metric, value in values.items() if metric != "main"]
    task = {"type": "text-classification", "name": "Text Classification"}
    return [{"name": name, "results": [{"task": task, "dataset": _dataset(cfg, spec), "metrics": metrics}]}]


def _robustness_section(robust: dict[str, Any]) -> list[str]:
    if not robust:
        return []
    settings = robust.get("settings", {})
    lines = ["## Robustness", "",
             (f"Dev text perturbed the MATE-KD way: {settings.get('mask_prob')} of the real tokens masked and filled "
             f"in by the generator `{settings.get('generator')}` (Gumbel tau {settings.get('tau')}, "
             f"seed {settings.get('seed')}); "
             "measured by `matekd eval RUN --perturbed`."), "",
             "| data | model | metric | clean | perturbed |", "|---|---|---|---|---|"]
    for split, report in robust.get("splits", {}).items():
        for who in ("model", "teacher"):
            for metric, clean in report["clean"].get(who, {}).items():
                if metric != "main":
                    perturbed = report["perturbed"][who][metric]
                    shown = "student" if who == "model" else "teacher"
                    lines.append(f"| {split} | {shown} | {metric} | {clean:.4f} | {perturbed:.4f} |")
        for metric in ("agreement", "kl", "mse_to_teacher"):
            if metric in report["clean"]:
                lines.append(f"| {split} | student vs teacher | {metric} | {report['clean'][metric]:.4f} | "
                             f"{report['perturbed'][metric]:.4f} |")
    return lines + [""]


def _deployment_section(record: dict[str, Any] | None) -> list[str]:
    """metrics.json "deployment": student and teacher size and CPU latency, as a table."""
    if not record:
        return []
    rows = deployment.table_rows(record)
    return ["## Deployment", "", f"{deployment.settings_line(record)}, measured at the end of training "
            "(`matekd eval RUN --latency` measures again on another machine).", "",
            "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]),
            *("| " + " | ".join(row) + " |" for row in rows[1:]), "", f"{deployment.headline(record)}.", ""]


def _how_to_use(export: str) -> list[str]:
    return ["## How to use", "", "```python",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            f'model = AutoModelForSequenceClassification.from_pretrained("{export}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{export}")', "```", "",
            (f"or `matekd predict {export} --data FILE --out predictions.tsv`; "
             f"`matekd eval {export} --data FILE` scores a labeled file."), ""]


def _teacher_hyper_parameters(cfg: RunConfig, metrics: dict[str, Any], world_size: int) -> dict[str, Any]:
    t, m = cfg.train, cfg.models
    out: dict[str, Any] = {"epochs": m.teacher_finetune_epochs, "learning rate": m.teacher_finetune_lr,
                           "warm-up ratio": m.teacher_finetune_warmup_ratio,
                           "global batch size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
                           "weight decay": t.weight_decay, "max sequence length": cfg.data.max_length, "seed": t.seed}
    steps = (metrics.get("teacher_finetune") or {}).get("steps")
    if steps is not None:
        out["steps"] = steps
    return out


def render_teacher(cfg: RunConfig, metrics: dict[str, Any], run_name: str) -> str:
    """The card of the run's teacher/ (a teacher this run fine-tuned): its dev metrics once it
    was scored, and the deployment numbers against its student."""
    spec = task_spec(cfg)
    world = int(metrics.get("world_size", 1))
    name = f"{run_name}-teacher"
    scores = metrics.get("teacher") or {}
    dev = scores.get("dev") or (metrics.get("teacher_finetune") or {}).get("dev")
    meta = {"library_name": "transformers", "pipeline_tag": "text-classification",
            "tags": ["text-classification", "knowledge-distillation", "teacher", "matekd-ds"],
            **({"datasets": [GLUE_HUB_PATH]} if cfg.task not in ("synthetic", "custom") else {}),
            "model-index": _model_index(name, cfg, spec, dev)}
    labels = ", ".join(spec.label_names) if spec.label_names else "a regression score"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             (f"The teacher of a matekd-ds run for **{spec.name}** ({labels}): `{cfg.models.teacher}` fine-tuned on "
              f"the labels, then frozen to teach a student with {_method_name(cfg)}."), "",
             "## Model description", "", "| | |", "|---|---|",
             f"| task | `{spec.name}`: {labels} |", f"| initialised from | `{cfg.models.teacher}` |"]
    if scores.get("params"):
        lines.append(f"| parameters | {scores['params'] / 1e6:.2f}M |")
    lines += ["", "## Training data", "", f"- {_data_source(cfg)}"]
    if _limits(cfg):
        lines.append(f"- limited to the {_limits(cfg)}")
    lines += ["", "## Training procedure", "", "| hyper-parameter | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _teacher_hyper_parameters(cfg, metrics, world).items()]
    lines += ["", f"Precision: {metrics.get('dtype', cfg.train.dtype)}; {world} rank(s).", "",
              "## Evaluation results", "", "Dev set, after fine-tuning." if dev else "Dev set, not recorded yet.", ""]
    if dev:
        lines += ["| data | metric | value |", "|---|---|---|", *_metric_rows(dev)]
    lines += ["", *_deployment_section(metrics.get("deployment")), *_how_to_use("teacher")]
    return "\n".join(lines)


def render(cfg: RunConfig, metrics: dict[str, Any], robustness: dict[str, Any] | None, run_name: str,
           export: str) -> str:
    """The card of the run's export `export` ("student", "student_best" or "teacher"): `metrics`
    as in metrics.json, `robustness` as in robustness.json (None: not measured)."""
    if export == "teacher":
        return render_teacher(cfg, metrics, run_name)
    spec = task_spec(cfg)
    world = int(metrics.get("world_size", 1))
    name = f"{run_name}-{export}"
    when, dev = _dev(metrics, export)
    meta = {"library_name": "transformers", "pipeline_tag": "text-classification",
            "tags": ["text-classification", "knowledge-distillation", cfg.method, "matekd-ds"],
            **({"datasets": [GLUE_HUB_PATH]} if cfg.task not in ("synthetic", "custom") else {}),
            "model-index": _model_index(name, cfg, spec, dev)}
    labels = ", ".join(spec.label_names) if spec.label_names else "a regression score"
    student_params = (metrics.get("student") or {}).get("params")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             (f"A student model for **{spec.name}** ({labels}), trained by matekd-ds on DeepSpeed with "
             f"{_method_name(cfg)}."), "",
             "## Model description", "", "| | |", "|---|---|",
             f"| task | `{spec.name}`: {labels} |", f"| method | `{cfg.method}` |",
             f"| teacher | {_teacher(cfg, metrics)} |",
             f"| student initialised from | `{cfg.models.student}`"
             + (f" (teacher layers {cfg.models.student_init_from_teacher_layers})"
                if cfg.models.student_init_from_teacher_layers else "")
             + " |"]
    if augments(cfg):
        random = cfg.matekd.perturbation == "random"
        lines.append(f"| generator | {RANDOM_TOKENS}: no generator (a control arm) |" if random
                     else f"| generator | `{cfg.models.generator}` |")
    if student_params:
        lines.append(f"| parameters | {student_params / 1e6:.2f}M |")
    lines += ["", "## Training data", "", f"- {_data_source(cfg)}"]
    if _limits(cfg):
        lines.append(f"- limited to the {_limits(cfg)}")
    lines += ["", "## Training procedure", "", "| hyper-parameter | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyper_parameters(cfg, world).items()]
    lines += ["", f"Precision: {metrics.get('dtype', cfg.train.dtype)}; {world} rank(s).", "",
              "## Evaluation results", "", f"Dev set, {when}.", ""]
    if dev:
        lines += ["| data | metric | value |", "|---|---|---|", *_metric_rows(dev)]
    teacher_dev = (metrics.get("teacher") or {}).get("dev")
    if teacher_dev:
        lines += ["", "The teacher on the same dev set:", "", "| data | metric | value |", "|---|---|---|",
                  *_metric_rows(teacher_dev)]
    lines += ["", *_robustness_section(robustness or {}), *_deployment_section(metrics.get("deployment"))]
    lines += _how_to_use(export)
    return "\n".join(lines)

