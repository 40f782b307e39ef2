"""How far MATE-KD's generator moved in each finished run of a `matekd experiment` task: the
relative change of its weights from the warmed generator the run started from to the one in the
run's last checkpoint,

    weight_change       ‖W − W0‖ / ‖W0‖ over all its parameters together
    weight_change_max   the largest per-tensor ‖W − W0‖ / ‖W0‖ (tensors with W0 ≠ 0)

and how many generator steps it took. A generator that barely moves is a frozen masked LM in all
but name: the question of issue 27 (is it the adversary, or the augmentation?). The frozen arm
(`matekd.generator_steps: 0`) reads 0 here, a check that the measurement is the right one. The
in-run view of the same question, per generator phase and with the divergence it buys, is
`matekd.adversary_probe: true` (matekd_ds/adversary.py); for a run that had it on, the row adds
the probe's summary (probe_summary: phases, the last phase's divergences, the mean and largest
relative gain of the trained generator's samples over the warm one's).

    python benchmarks/quality/generator_movement.py runs/transfer-sets/sst2/n1000 [--only REGEX] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

from matekd_ds import models
from matekd_ds.adversary import tensors_change
from matekd_ds.config import config_from_dict
from matekd_ds.run_dir import RunDir


def last_generator_checkpoint(run: Path) -> Path | None:
    """The model states of the newest generator checkpoint in a run (one rank: the whole module)."""
    steps = sorted((run / "checkpoints" / "student" / "generator").glob("step_*/mp_rank_00_model_states.pt"))
    return steps[-1] if steps else None


# the probe's measure (matekd_ds/adversary.py), on a checkpoint's state dict
weight_change = tensors_change


def probe_summary(run: Path) -> dict[str, float] | None:
    """The adversary probe's records of a run (metrics.json "adversary", matekd.adversary_probe):
    how many generator phases, the divergence on the trained and on the warm generator's samples
    at the last phase, and the mean over phases of (trained − warm) / warm: above 0 where the
    generator's training made its samples harder for the student than the warm generator's."""
    metrics = run / "metrics.json"
    records = json.loads(metrics.read_text()).get("adversary") if metrics.is_file() else None
    if not records:
        return None
    gains = [(r["div_trained"] - r["div_warm"]) / r["div_warm"] for r in records if r["div_warm"] > 0]
    last = records[-1]
    return {"probe_phases": len(records), "div_trained_last": last["div_trained"], "div_warm_last": last["div_warm"],
            "div_gain_mean": statistics.mean(gains) if gains else 0.0,
            "div_gain_max": max(gains) if gains else 0.0}


def warm_weights(cfg) -> dict[str, torch.Tensor]:
    """The generator the run started from: its warmed export, cut as the run cut it."""
    tokenizer = models.load_tokenizer(cfg.models.generator)
    generator = models.load_generator(cfg.models.generator, tokenizer)
    if cfg.matekd.generator_layers is not None:
        generator = models.keep_first_layers(generator, cfg.matekd.generator_layers)
    return {k: v.detach() for k, v in generator.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task_dir", type=Path)
    parser.add_argument("--only", metavar="REGEX", help="only the runs whose name matches")
    parser.add_argument("--out", type=Path, help="write the numbers to this JSON file")
    args = parser.parse_args()

    rows: dict[str, dict[str, float]] = {}
    warm_cache: dict[tuple, dict[str, torch.Tensor]] = {}
    for run in sorted(args.task_dir.iterdir()):
        if not re.search(r"-seed\d+$", run.name) or (args.only and not re.search(args.only, run.name)):
            continue
        if RunDir(run).status() != "completed" or (checkpoint := last_generator_checkpoint(run)) is None:
            continue
        cfg = config_from_dict(RunDir(run).read_config())
        key = (cfg.models.generator, cfg.matekd.generator_layers)
        if key not in warm_cache:
            warm_cache[key] = warm_weights(cfg)
        states = torch.load(checkpoint, map_location="cpu", weights_only=False)
        total, largest = weight_change(states["module"], warm_cache[key])
        rows[run.name] = {"weight_change": total, "weight_change_max": largest,
                          "generator_steps": int(states.get("global_steps", 0)),
                          "generator_lr": cfg.matekd.generator_lr, **(probe_summary(run) or {})}
        print(run.name, json.dumps({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in rows[run.name].items()}),
              flush=True)
    if not rows:
        raise SystemExit(f"generator_movement: no finished run with a generator checkpoint in {args.task_dir}")
    by_method: dict[str, list[float]] = {}
    for name, row in rows.items():
        by_method.setdefault(re.sub(r"-seed\d+$", "", name), []).append(row["weight_change"])
    for method, values in by_method.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{method}: weight_change {statistics.mean(values):.3g} ± {spread:.2g} (n={len(values)})")
    if args.out:
        args.out.write_text(json.dumps({"task_dir": str(args.task_dir), "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
