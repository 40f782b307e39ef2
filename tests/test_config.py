"""Run-config loading, overrides and validation; DeepSpeed config resolution."""

import json

import pytest

from matekd_ds.config import RunConfig, config_from_dict, load_config, parse_override
from matekd_ds.engines import finalize_ds_config, read_ds_config, resolve_dtype
from matekd_ds.errors import MatekdError


def test_defaults_are_the_official_algorithm():
    cfg = RunConfig()
    m = cfg.matekd
    assert (m.mask_prob, m.gumbel_tau, m.temperature) == (0.3, 1.0, 1.0)
    assert (m.generator_steps, m.student_steps, m.generator_lr, m.generator_clip) == (10, 100, 5e-7, 5.0)
    assert m.loss_weights == pytest.approx([1 / 3] * 3)
    assert (cfg.train.lr, cfg.train.clip) == (2e-5, 5.0)


def test_yaml_file_plus_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: sst2\ntrain:\n  lr: 3e-5\n  epochs: 2\nmatekd: {student_steps: 50}\n")
    cfg = load_config(path, ["train.lr=1e-4", "method=kd", "data.max_train_examples=100", "models.student_init_from_teacher_layers=[0,5]"])
    assert cfg.task == "sst2" and cfg.method == "kd"
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 2.0 and cfg.matekd.student_steps == 50
    assert cfg.data.max_train_examples == 100
    assert cfg.models.student_init_from_teacher_layers == [0, 5]


def test_json_config(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"method": "ft", "train": {"micro_batch_size": 8}}))
    assert load_config(path).train.micro_batch_size == 8


@pytest.mark.parametrize("data, message", [
    ({"trian": {}}, "unknown config key 'trian'"),
    ({"train": {"lrr": 1}}, "unknown config key 'train.lrr'"),
    ({"train": {"lr": "fast"}}, "'train.lr' must be a number"),
    ({"train": {"micro_batch_size": 2.5}}, "'train.micro_batch_size' must be an integer"),
    ({"method": "distill"}, "method must be one of"),
    ({"matekd": {"mask_prob": 1.5}}, "matekd.mask_prob"),
    ({"matekd": {"loss_weights": [1, 1]}}, "matekd.loss_weights needs 3"),
    ({"train": {"dtype": "fp8"}}, "train.dtype"),
    ({"logging": {"tensorboard": "yes"}}, "must be true or false"),
    ({"task": "custom"}, "needs data.train_file"),
    ({"train": {"zero_stage": 3}}, "train.zero_stage must be 0, 1 or 2"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(MatekdError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config_from_dict(data)


def test_bad_override_syntax():
    with pytest.raises(MatekdError, match="key.path=value"):
        parse_override("train.lr")


def test_teacher_finetune_auto():
    assert config_from_dict({}).models.teacher_finetune_epochs == 3.0
    assert config_from_dict({"models": {"teacher": "/some/teacher"}}).models.teacher_finetune_epochs == 0.0


def test_ds_config_filled_from_the_run_config():
    ds = finalize_ds_config(read_ds_config("zero2"), micro_batch=8, grad_accum=4, world_size=2, clip=5.0,
                            dtype="bf16", zero_stage=None)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 64 and ds["gradient_clipping"] == 5.0
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert finalize_ds_config(read_ds_config("zero2"), micro_batch=8, grad_accum=1, world_size=1, clip=1.0,
                              dtype="fp32", zero_stage=1)["zero_optimization"]["stage"] == 1


def test_ds_config_conflicts_are_errors(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "bf16": {"enabled": True}}))
    with pytest.raises(MatekdError, match="train_micro_batch_size_per_gpu=16"):
        finalize_ds_config(read_ds_config(str(path)), micro_batch=8, grad_accum=1, world_size=1, clip=1.0,
                           dtype="bf16", zero_stage=None)
    with pytest.raises(MatekdError, match="train.dtype is fp16"):
        resolve_dtype("fp16", {"student": read_ds_config(str(path))})
    with pytest.raises(MatekdError, match="disagree on precision"):
        resolve_dtype("auto", {"student": read_ds_config(str(path)), "generator": read_ds_config("zero2")})
    assert resolve_dtype("auto", {"student": read_ds_config("bf16-zero2"), "generator": read_ds_config("bf16-zero2")}) == "bf16"
    with pytest.raises(MatekdError, match="unknown DeepSpeed preset 'zero9'"):
        read_ds_config("zero9")
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(MatekdError, match="defines 'optimizer'"):
        read_ds_config(str(path))
