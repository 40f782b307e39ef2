"""Run-config loading, overrides and validation; DeepSpeed config resolution."""

import json
import re

import pytest
import torch
from helpers import REPO

from matekd_ds.config import RunConfig, config_from_dict, load_config, parse_override
from matekd_ds.ds_config import finalize_ds_config, finalize_teacher_ds_config, read_ds_config, resolve_dtype
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
    cfg = load_config(path, ["train.lr=1e-4", "method=kd", "data.max_train_examples=100",
                             "models.student_init_from_teacher_layers=[0,5]"])
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
    ({"task": "sst2", "data": {"train_file": "mine.tsv"}}, "data.train_file is read only by task: custom; task sst2"),
    ({"data": {"dev_file": "mine.tsv"}}, "data.dev_file is read only by task: custom; task synthetic"),
    ({"train": {"zero_stage": 4}}, "train.zero_stage must be 0, 1, 2 or 3"),
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
    assert resolve_dtype("auto", {"student": read_ds_config("bf16-zero2"),
                                  "generator": read_ds_config("bf16-zero2")}) == "bf16"
    with pytest.raises(MatekdError, match="unknown DeepSpeed preset 'zero9'"):
        read_ds_config("zero9")
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(MatekdError, match="defines 'optimizer'"):
        read_ds_config(str(path))


# -- DeepSpeed presets: composition with "+", the teacher's engine, offload -------------------


def _trained(spec, dtype="fp32", zero_stage=None, nvme_path=None, role="student"):
    return finalize_ds_config(read_ds_config(spec), micro_batch=4, grad_accum=1, world_size=2, clip=1.0,
                              dtype=dtype, zero_stage=zero_stage, role=role, nvme_path=nvme_path)


def _teacher(spec, dtype="fp32", nvme_path=None):
    return finalize_teacher_ds_config(read_ds_config(spec), micro_batch=4, world_size=2, dtype=dtype,
                                      nvme_path=nvme_path)


def test_every_documented_preset_exists_and_reads():
    from matekd_ds.ds_config import preset_names

    documented = (REPO / "ds_configs" / "README.md").read_text()
    for name in ("zero0", "zero1", "zero2", "zero3", "bf16", "fp16", "offload", "teacher-inference"):
        assert name in preset_names() and f"`{name}`" in documented
        read_ds_config(name)


def test_presets_compose():
    ds = _trained("zero3+bf16+offload", dtype="bf16")
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and ds["bf16"]["enabled"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch's AdamW steps the offloaded states
    assert resolve_dtype("auto", {"student": read_ds_config("zero3+bf16")}) == "bf16"
    # at ZeRO-2 "offload" offloads what the stage can: optimizer states, not parameters
    zero = _trained("zero2+offload")["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero
    # deepspeed.nvme_path sends offloaded parameters to NVMe (optimizer states too, at stage 3)
    zero = _trained("zero3+offload", nvme_path="/nvme")["zero_optimization"]
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}
    assert zero["offload_optimizer"]["device"] == "nvme"
    # train.zero_stage overrides the stage of a composed config too
    assert _trained("zero2+bf16", dtype="bf16", zero_stage=3)["zero_optimization"]["stage"] == 3


def test_teacher_engine_config():
    ds = _teacher("teacher-inference", dtype="bf16")
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and "gradient_clipping" not in ds
    assert "matekd" not in ds and "_source" not in ds  # our marker never reaches DeepSpeed
    zero = _teacher("teacher-inference+offload", nvme_path="/nvme")["zero_optimization"]
    assert zero["offload_param"]["device"] == "nvme" and "offload_optimizer" not in zero
    assert _teacher("zero3")["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("build, message", [
    (lambda: _trained("zero1+zero3"), "presets zero1 and zero3 disagree on zero_optimization.stage (1 vs 3)"),
    (lambda: _trained("zero2+bf16+fp16"), None),  # finalize overrides; resolve_dtype catches it below
    (lambda: resolve_dtype("auto", {"student": read_ds_config("zero2+bf16+fp16")}), "enables both bf16 and fp16"),
    (lambda: _trained("offload"), "offload has nothing to offload at ZeRO stage 0"),
    (lambda: _trained("teacher-inference", role="generator"), "inference-only"),
    (lambda: _trained("zero3+nope"), "unknown DeepSpeed preset 'nope'"),
    (lambda: _teacher("zero2"), "deepspeed.teacher: preset zero2 has ZeRO stage 2"),
    (lambda: _teacher("teacher-inference+fp16", dtype="bf16"), "enables fp16 but the run trains in bf16"),
    (lambda: config_from_dict({"train": {"zero_stage": 5}}), "train.zero_stage must be 0, 1, 2 or 3"),
])
def test_inconsistent_combinations_are_one_line_errors(build, message):
    if message is None:
        build()
        return
    with pytest.raises(MatekdError) as err:
        build()
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("zero, message", [
    ({"stage": 2, "offload_param": {"device": "cpu"}},
     "parameter offload (zero_optimization.offload_param) needs ZeRO stage 3"),
    ({"stage": 0, "offload_optimizer": {"device": "cpu"}},
     "optimizer offload (zero_optimization.offload_optimizer) needs ZeRO stage 1"),
    ({"stage": 3, "offload_param": {"device": "nvme"}}, "offloads to nvme but no path is given"),
    ({"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}},
     "optimizer offload to NVMe needs ZeRO stage 3"),
    ({"stage": 3, "offload_param": {"device": "gpu"}}, "device must be cpu or nvme"),
])
def test_offload_blocks_must_fit_the_stage(tmp_path, zero, message):
    path = tmp_path / "custom.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    with pytest.raises(MatekdError, match=re.escape(message)):
        _trained(str(path))


def test_teacher_has_no_optimizer_to_offload(tmp_path):
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(MatekdError, match="the teacher has no optimizer"):
        _teacher(str(path))


def test_a_preset_joins_with_a_json_file(tmp_path):
    """'zero1+my.json' is the preset and the file merged, not one file named so."""
    path = tmp_path / "grads.json"
    path.write_text('{"data_types": {"grad_accum_dtype": "fp32"}}')
    ds = read_ds_config(f"zero1+{path}")
    assert ds["zero_optimization"]["stage"] == 1 and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    plus = tmp_path / "a+b.json"  # a file whose name has the join character is still one file
    plus.write_text('{"zero_optimization": {"stage": 2}}')
    assert read_ds_config(str(plus))["zero_optimization"]["stage"] == 2


def test_a_directory_named_like_a_preset_does_not_shadow_it(tmp_path, monkeypatch):
    (tmp_path / "zero3").mkdir()
    monkeypatch.chdir(tmp_path)
    assert read_ds_config("zero3")["zero_optimization"]["stage"] == 3


def test_model_dependent_autos():
    from transformers import BertConfig, BertModel

    from matekd_ds.ds_config import fill_model_autos

    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64))
    zero = fill_model_autos(_trained("zero3"), model)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 320 and zero["reduce_bucket_size"] == 1024
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 32 * 32)
    bare = fill_model_autos(_trained("zero3"), torch.nn.Linear(2, 2))["zero_optimization"]
    assert "stage3_param_persistence_threshold" not in bare  # DeepSpeed's default
