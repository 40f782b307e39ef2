"""`matekd eval`: score a saved model (or a run directory's student) on a task's dev sets,
sharded over however many ranks the launcher started."""

from __future__ import annotations

from typing import Any

import torch

from matekd_ds import distributed, models
from matekd_ds.config import load_config
from matekd_ds.data.batching import encode
from matekd_ds.data.tasks import load_task_data
from matekd_ds.errors import MatekdError
from matekd_ds.evaluation import evaluate
from matekd_ds.run_dir import RunDir


def _resolve(target: str, config: str | None) -> tuple[str, str | None]:
    """A run directory means its student/ with its config.yaml; anything else is a model."""
    run = RunDir(target)
    if run.is_run():
        return str(run.model_dir("student")), config or str(run.config_file)
    return target, config


def evaluate_model(target: str, config: str | None, overrides: list[str]) -> dict[str, Any] | None:
    model_path, config = _resolve(target, config)
    if config is None and not overrides:
        raise MatekdError(f"{target} is not a run directory: give --config or task=... to say what to evaluate on")
    cfg = load_config(config, overrides)
    if cfg.task == "synthetic" and models.is_builtin(model_path):
        raise MatekdError("give a trained model or run directory to evaluate")
    data = load_task_data(cfg)
    tokenizer = models.load_tokenizer(model_path)
    spec = data.spec
    dev = {name: encode(rows, tokenizer, cfg.data.max_length, spec.is_regression) for name, rows in data.dev.items()}
    model = models.load_classifier("model", model_path, spec.num_labels, tokenizer, spec.is_regression)
    distributed.init()  # after every input check: bad input exits before any rank waits on another
    device = distributed.device()
    model.to(device)
    with torch.no_grad():
        results = evaluate(model, dev, spec, cfg.eval.batch_size, tokenizer.pad_token_id, device)
    out = {"model": model_path, "task": spec.name, "world_size": distributed.world_size(),
           "examples": {k: len(v) for k, v in dev.items()}, "dev": results}
    return out if distributed.is_main() else None
