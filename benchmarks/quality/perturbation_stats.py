"""What MATE-KD's generator does in a finished `matekd experiment` sweep, per task:

- drift: how far the min-max game moved the generator from its warmed-up start,
  ||theta_end - theta_start|| / ||theta_start|| over all parameters (the final checkpoint of each
  MATE-KD run against <task>/generator/generator_warm);
- replaced: the fraction of masked positions where the generator samples a token other than the
  original one (a sample equal to the original leaves the text unchanged);
- teacher_flip: the fraction of dev examples whose teacher prediction changes under the
  perturbation (classification), or the mean |change| of the teacher's score (regression);
- kl_teacher: mean divergence of the teacher's outputs on perturbed vs clean text.

    python benchmarks/quality/perturbation_stats.py runs/minilm-glue [--examples 256] [--out stats.json]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from matekd_ds import models
from matekd_ds.config import config_from_dict
from matekd_ds.data.batching import collate, encode, model_inputs
from matekd_ds.data.tasks import load_task_data
from matekd_ds.perturb import Perturber
from matekd_ds.run_dir import RunDir


def final_generator_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["module"]


def generator_drift(start: torch.nn.Module, state: dict[str, torch.Tensor]) -> float:
    num, den = 0.0, 0.0
    for name, param in start.state_dict().items():
        if name in state and state[name].shape == param.shape:
            num += float((state[name].float() - param.float()).pow(2).sum())
            den += float(param.float().pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


@torch.no_grad()
def perturbation_effect(run_dir: Path, generator: torch.nn.Module, examples: int, seed: int = 0) -> dict[str, float]:
    run = RunDir(run_dir)
    cfg = config_from_dict(run.read_config())
    tokenizer = models.load_tokenizer(str(run.tokenizer_dir))
    data = load_task_data(cfg)
    regression = data.spec.is_regression
    dev = encode(next(iter(data.dev.values()))[:examples], tokenizer, cfg.data.max_length, regression)
    teacher = models.load_classifier("teacher", cfg.models.teacher, data.spec.num_labels, tokenizer, regression).eval()
    generator.eval()
    perturber = Perturber.for_run(cfg.matekd, tokenizer)
    replaced = masked = flips = 0
    shift, kl = [], []
    for start in range(0, len(dev), 64):
        batch = collate(dev, list(range(start, min(start + 64, len(dev)))), tokenizer.pad_token_id)
        mb = perturber.mask_batch(batch, seed + start)
        perturbed = perturber.sample_perturbed_ids(generator, mb, seed + start + 1)
        replaced += int((perturbed != batch["input_ids"])[mb.mask].sum())
        masked += int(mb.mask.sum())
        clean = teacher(**model_inputs(batch)).logits.float()
        noisy = teacher(**dict(model_inputs(batch), input_ids=perturbed)).logits.float()
        if regression:
            shift.append((noisy - clean).abs().mean())
        else:
            flips += int((noisy.argmax(-1) != clean.argmax(-1)).sum())
            p = clean.softmax(-1)
            kl.append((p * (clean.log_softmax(-1) - noisy.log_softmax(-1))).sum(-1).mean())
    out = {"replaced": replaced / max(masked, 1), "masked_tokens": masked, "examples": len(dev)}
    if regression:
        out["teacher_abs_shift"] = float(torch.stack(shift).mean())
    else:
        out["teacher_flip"] = flips / len(dev)
        out["kl_teacher"] = float(torch.stack(kl).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a matekd experiment output_dir")
    parser.add_argument("--examples", type=int, default=256, help="dev examples per task")
    parser.add_argument("--out", type=Path, help="write the numbers to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict[str, dict] = {}
    for task_dir in sorted(p for p in args.sweep.iterdir() if RunDir(p / "generator").has_model("generator_warm")):
        warm_path = RunDir(task_dir / "generator").model_dir("generator_warm")
        tokenizer = models.load_tokenizer(str(warm_path))
        warm = models.load_generator(str(warm_path), tokenizer)
        runs = sorted(r for r in task_dir.iterdir() if r.name.startswith("matekd") and RunDir(r).metrics_file.is_file())
        task: dict[str, dict] = {}
        for run in runs:
            checkpoints = sorted((RunDir(run).checkpoints("student") / "generator")
                                 .glob("step_*/mp_rank_00_model_states.pt"))
            if not checkpoints:
                continue
            state = final_generator_state(checkpoints[-1])
            entry = {"drift": generator_drift(warm, state)}
            if run.name.endswith("seed1"):  # the samples of the generator this run ended with
                final = copy.deepcopy(warm)
                final.load_state_dict(state, strict=False)
                entry.update(perturbation_effect(run, final, args.examples))
            task[run.name] = entry
            print(task_dir.name, run.name,
                  json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)
        results[task_dir.name] = task
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
