"""`matekd export RUN --onnx [--out DIR]`: a run's student (or any model of a run) as an ONNX
model for serving, checked before it is kept.

The model goes through torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`:
it needs nothing beyond torch and onnx, while the torch.export-based one needs onnxscript), opset
17, batch size and sequence length dynamic. onnxruntime then scores the model's dev sets (the
run's, or `task=`/`data.` overrides for a model outside a run) and the export is kept only when
its logits equal PyTorch's within TOLERANCE on every example. The folder (default RUN/onnx)
holds model.onnx, the model's config.json (class names), the tokenizer and export.json (source,
opset, the largest difference found); it is written beside and renamed into place.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from matekd_ds.data.batching import Encoded, collate
from matekd_ds.durable import atomic_folder
from matekd_ds.errors import MatekdError, RunFailed

TOLERANCE = 1e-4  # largest |ONNX logit - PyTorch logit| an export may have on the dev set
OPSET = 17
MARKER = "export.json"  # what makes a folder an ONNX export of this command (and --out replaceable)
BATCH = 32


@dataclass
class ExportRequest:
    target: str
    out: str | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    max_examples: int | None = None


def check_installed() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise MatekdError(f"--onnx needs onnx and onnxruntime ({err.name} is not installed): "
                          "pip install 'matekd-ds[onnx]'") from None


def default_out(model: str, run_path: Path | None, is_run: bool) -> Path:
    """RUN/onnx for a run's student; MODEL-onnx beside any other model folder."""
    if is_run and run_path is not None:
        return run_path / "onnx"
    folder = Path(model)
    return folder.with_name(f"{folder.name}-onnx")


def check_out(out: Path) -> None:
    """Before any work: the folder may be new, or an earlier export of this command (replaced);
    never any other folder (its files would be replaced)."""
    if out.exists() and not out.is_dir():
        raise MatekdError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise MatekdError(f"--out {out} already holds files that are not an ONNX export; choose a new folder")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise MatekdError(f"--out {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MatekdError(f"--out {out}: the folder {parent} is not writable")


# ---------------------------------------------------------------------------------------------
# Export


def input_names(model: nn.Module) -> list[str]:
    """input_ids and attention_mask, and token_type_ids for models that take them (BERT pairs)."""
    accepted = inspect.signature(model.forward).parameters
    return ["input_ids", "attention_mask", *(["token_type_ids"] if "token_type_ids" in accepted else [])]


class LogitsOf(nn.Module):
    """The classifier with positional inputs and its logits as the one output."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).logits


def example_inputs(names: list[str], vocab_size: int) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    values = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return tuple(values[name] for name in names)


def export_onnx(model: nn.Module, path: Path) -> list[str]:
    """model.onnx with dynamic batch and length; returns its input names."""
    names = input_names(model)
    dynamic = {name: {0: "batch", 1: "length"} for name in names} | {"logits": {0: "batch"}}
    vocab = model.get_input_embeddings().weight.shape[0]
    with warnings.catch_warnings():  # the tracer's and the legacy exporter's notices: not the user's business
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOf(model, names).eval(), example_inputs(names, vocab), str(path), input_names=names,
                          output_names=["logits"], dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    return names


# ---------------------------------------------------------------------------------------------
# The check: ONNX against PyTorch on the same padded batches


def batches(data: Encoded, pad_id: int, names: list[str]):
    for start in range(0, len(data), BATCH):
        batch = collate(data, list(range(start, min(start + BATCH, len(data)))), pad_id)
        batch.setdefault("token_type_ids", torch.zeros_like(batch["input_ids"]))
        yield {name: batch[name] for name in names}


@torch.no_grad()
def largest_difference(model: nn.Module, session, data: Encoded, pad_id: int, names: list[str]) -> float:
    """max |ONNX logits - PyTorch logits| over every example of `data`."""
    worst = 0.0
    for inputs in batches(data, pad_id, names):
        expected = model(**inputs).logits.float().numpy()
        got = session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def export_target(request: ExportRequest) -> dict[str, Any]:
    """Load and check everything, export, check on the dev sets, keep the folder (or raise)."""
    from matekd_ds import evaluation_cli as ev

    check_installed()
    chosen: dict[str, Path] = {}

    def read_dev(cfg, spec):  # runs before the model is loaded: --out is checked first too
        resolved = ev.resolve_target(request.target)
        chosen["out"] = Path(request.out) if request.out else default_out(
            resolved.model, resolved.run.path if resolved.run else None, resolved.is_run)
        check_out(chosen["out"])
        return ev.labeled_sets(cfg, spec, ev.DataOptions(), request.overrides)

    loaded = ev.load_target(request.target, request.config, request.overrides, read_dev, request.max_examples)
    model = loaded.model.float().eval().to("cpu")
    sets = {name: ev.encode_rows(loaded, rows) for name, rows in loaded.data.items()}
    out = chosen["out"]
    with atomic_folder(out) as tmp:
        names = export_onnx(model, tmp / "model.onnx")
        worst = _check(model, tmp / "model.onnx", sets, loaded.tokenizer.pad_token_id, names)
        model.config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        summary = {"model": loaded.target.model, "out": str(out), "onnx": str(out / "model.onnx"), "opset": OPSET,
                   "inputs": names, "checked_examples": {n: len(d) for n, d in sets.items()},
                   "max_abs_diff": worst, "tolerance": TOLERANCE, "torch": torch.__version__}
        (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check(model: nn.Module, path: Path, sets: dict[str, Encoded], pad_id: int, names: list[str]) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = max((largest_difference(model, session, data, pad_id, names) for data in sets.values()), default=0.0)
    if not worst <= TOLERANCE:  # NaN fails too
        raise RunFailed(f"the ONNX model's logits differ from PyTorch's by up to {worst:.3g} on the dev set "
                        f"(tolerance {TOLERANCE:g}): nothing was written")
    return worst


def summary_line(summary: dict[str, Any]) -> str:
    examples = sum(summary["checked_examples"].values())
    return (f"exported {summary['model']} to {summary['onnx']} (ONNX opset {summary['opset']}); onnxruntime on "
            f"{examples} dev examples: max |logits - PyTorch's| {summary['max_abs_diff']:.3g} "
            f"(tolerance {summary['tolerance']:g})")
