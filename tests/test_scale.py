"""Every ZeRO stage through the CLI, on 2 CPU ranks against 1 rank with the same global batch.

KD (deterministic: dropout off, no sampling) with 16 examples per global micro-batch: one rank
of 16, or two ranks of 8 under ZeRO-1 (launch/deepspeed.sh), ZeRO-2 (launch/torchrun.sh) and ZeRO-3 with
the teacher as a ZeRO-3 inference engine (deepspeed launcher; crashed after step 4, resumed from
the checkpoint of step 3).
The loss of each of the 6 steps (logged as the mean over ranks, i.e. of the global batch) must
match the 1-rank run's within LOSS_ATOL; the ZeRO-3 teacher's parameter bytes on each rank, as
recorded in metrics.json, must be at most 0.55 of the 1-rank run's. Then MATE-KD with student,
generator and teacher all at ZeRO-3 in bf16.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli, run_launcher

# fp32: the 2-rank runs reduce gradients in another order than 1 rank, and pad each half-batch
# to its own longest sequence; measured differences: <= 3e-6 (the CSV keeps 6 digits).
LOSS_ATOL = 5e-5
TEACHER_BYTES_RATIO = 0.55
STEPS = 6


@pytest.fixture(scope="module")
def nodrop_models(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer built on the synthetic task and tiny BERTs without dropout, saved as local models."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    from matekd_ds.data import synthetic
    from matekd_ds.data.tokenizer import train_wordpiece

    root = tmp_path_factory.mktemp("models")
    examples = synthetic.generate(192, seed=1234)
    tokenizer = train_wordpiece([t for ex in examples for t in ex.texts], 800)
    paths = {}
    torch.manual_seed(0)
    for role, (layers, hidden) in {"teacher": (2, 64), "student": (1, 64)}.items():
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=2, intermediate_size=4 * hidden, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id, num_labels=2)
        model = AutoModelForSequenceClassification.from_config(config)
        paths[role] = root / role
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    return paths


def _kd_args(models: dict[str, Path], out: Path, micro_batch: int, extra: list[str]) -> list[str]:
    return ["train", "task=synthetic", "data.synthetic.train_size=192", "data.synthetic.dev_size=40",
            "data.max_length=32", "method=kd", f"models.teacher={models['teacher']}",
            "models.teacher_finetune_epochs=0", f"models.student={models['student']}", "train.dtype=fp32",
            f"train.max_steps={STEPS}",
            f"train.micro_batch_size={micro_batch}", "train.lr=1e-3", "eval.every_steps=0", "eval.batch_size=16",
            "output.checkpoint_every=3", "logging.log_every=1", "logging.progress=false",
            "logging.tensorboard=false", f"output.dir={out}", *extra]


def _losses(run: Path) -> dict[int, float]:
    with open(run / "logs" / "scalars.csv") as f:
        return {int(row["step"]): float(row["value"]) for row in csv.DictReader(f) if row["name"] == "student/loss"}


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(nodrop_models, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("scale")
    out = {name: tmp / name for name in ("one_rank", "zero1", "zero2", "zero3")}

    def check(name, result):
        assert result.returncode == 0, f"{name}: {result.stderr[-4000:]}"

    check("one_rank", run_cli(_kd_args(nodrop_models, out["one_rank"], 16, ["deepspeed.student=zero0"]), cwd=tmp))
    # the launch/ wrappers, for real: 2 CPU ranks each
    check("zero1", run_launcher("deepspeed.sh", _kd_args(nodrop_models, out["zero1"], 8, ["deepspeed.student=zero1"]),
                                cwd=tmp, env={"NUM_GPUS": "2"}))
    check("zero2", run_launcher("torchrun.sh", _kd_args(nodrop_models, out["zero2"], 8, ["deepspeed.student=zero2"]),
                                cwd=tmp, env={"NPROC_PER_NODE": "2"}))
    zero3 = ["deepspeed.student=zero3", "deepspeed.teacher=teacher-inference"]
    crashed = run_cli(_kd_args(nodrop_models, out["zero3"], 8, zero3), cwd=tmp, ranks=2,
                      env={"MATEKD_CRASH_AFTER_STEP": "4"})
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr, crashed.stderr[-3000:]
    assert (out["zero3"] / "checkpoints/student/LATEST").read_text() == "step_00000003"
    resumed = run_cli([*_kd_args(nodrop_models, out["zero3"], 8, zero3), "--resume"], cwd=tmp, ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed at step 3" in resumed.stderr
    return out


def test_two_rank_losses_match_one_rank_at_every_zero_stage(runs):
    reference = _losses(runs["one_rank"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    for stage in ("zero1", "zero2", "zero3"):
        losses = _losses(runs[stage])  # zero3: steps 1-4 before the crash (4 again after it), 4-6 resumed
        diffs = [abs(losses[s] - reference[s]) for s in reference]
        print(f"[scale] 2-rank {stage} vs 1-rank, student/loss per step: max |diff| {max(diffs):.2e} "
              f"({', '.join(f'{losses[s]:.6f}' for s in reference)} "
              f"vs {', '.join(f'{reference[s]:.6f}' for s in reference)})")
        assert max(diffs) <= LOSS_ATOL, (stage, losses, reference)
        m = _metrics(runs[stage])
        assert m["status"] == "completed" and m["world_size"] == 2
        assert m["memory"]["student"]["zero_stage"] == int(stage[-1])
    assert _metrics(runs["one_rank"])["world_size"] == 1


def test_zero3_teacher_is_partitioned_and_recorded(runs):
    one, zero3 = _metrics(runs["one_rank"]), _metrics(runs["zero3"])
    full = one["memory"]["teacher"]["param_bytes_per_rank"][0]
    t = zero3["memory"]["teacher"]
    ratio = t["param_bytes_rank_max"] / full
    print(f"[scale] teacher parameter bytes per rank: 1 rank {full}, 2 ranks ZeRO-3 {t['param_bytes_per_rank']} "
          f"-> ratio {ratio:.4f}")
    assert not one["memory"]["teacher"]["partitioned"] and t["partitioned"] and t["zero_stage"] == 3
    assert t["param_bytes_full"] == full
    assert ratio <= TEACHER_BYTES_RATIO
    student = zero3["memory"]["student"]
    assert student["partitioned"] \
        and student["param_bytes_rank_max"] <= TEACHER_BYTES_RATIO * student["param_bytes_full"]
    # the ZeRO-3 teacher scores like the whole one (evaluated on 2 ranks, every rank in step)
    assert zero3["teacher"]["dev"]["dev"] == pytest.approx(one["teacher"]["dev"]["dev"])
    assert zero3["teacher"]["params"] == one["teacher"]["params"]


def test_zero3_export_is_the_gathered_student(runs):
    """The student exported from ZeRO-3 partitions reloads and scores what the run reported."""
    from transformers import AutoModelForSequenceClassification

    one = AutoModelForSequenceClassification.from_pretrained(runs["one_rank"] / "student").state_dict()
    zero3 = AutoModelForSequenceClassification.from_pretrained(runs["zero3"] / "student").state_dict()
    assert one.keys() == zero3.keys()
    assert max((one[k] - zero3[k]).abs().max().item() for k in one) < 1e-3  # same training, same weights
    assert _metrics(runs["zero3"])["final"]["dev"]["accuracy"] == pytest.approx(
        _metrics(runs["one_rank"])["final"]["dev"]["accuracy"])


def test_matekd_every_engine_zero3_bf16_two_ranks(tmp_path):
    """Teacher fine-tuned at ZeRO-3 (the student's config), exported gathered, reloaded into a
    ZeRO-3 inference engine; the student cut from its partitioned layers; MATE-KD at ZeRO-3."""
    out = tmp_path / "run"
    result = run_cli(["train", "task=synthetic", "data.synthetic.train_size=128", "data.synthetic.dev_size=24",
                      "data.max_length=32", "models.teacher_finetune_epochs=0.25", "train.max_steps=4",
                      "models.student_init_from_teacher_layers=[0,3]",
                      "train.micro_batch_size=8", "matekd.generator_steps=1", "matekd.student_steps=1",
                      "train.dtype=auto", "deepspeed.student=zero3+bf16", "deepspeed.generator=zero3+bf16",
                      "deepspeed.teacher=teacher-inference", "eval.every_steps=0", "eval.batch_size=12",
                      "logging.log_every=1", "logging.progress=false", "logging.tensorboard=false",
                      f"output.dir={out}"], cwd=tmp_path, ranks=2)
    assert result.returncode == 0, result.stderr[-4000:]
    m = _metrics(out)
    assert m["status"] == "completed" and m["dtype"] == "bf16" and m["student"]["steps"] == 4
    for role in ("teacher", "student", "generator"):
        assert m["memory"][role]["partitioned"] and m["memory"][role]["zero_stage"] == 3, role
    names = {row[1] for row in csv.reader(open(out / "logs/scalars.csv"))}
    assert {"generator/gen_div", "student/loss"} <= names
    assert (out / "student/model.safetensors").is_file()
    assert m["teacher_finetune"]["steps"] == 2
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(out / "teacher")
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert teacher.config.num_hidden_layers == 4 and student.config.num_hidden_layers == 2
    assert all(p.abs().sum() > 0 for p in teacher.parameters())  # gathered, not empty partitions
