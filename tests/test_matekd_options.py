"""The knobs that make a MATE-KD step cheaper, as `matekd train` builds them (assembly.build_run):
the frozen forwards under a bf16 autocast, a generator cut to its first k layers; and ${VAR}s in
run configs (a model folder that differs between machines)."""

import pytest
import torch
from helpers import TINY_TASK, run_cli, tiny_batch, tiny_matekd, tiny_run_config, tiny_tokenizer

from matekd_ds.assembly import build_run, run_inputs
from matekd_ds.config import load_config
from matekd_ds.errors import MatekdError
from matekd_ds.models import encoder_layers, masked_lm_parts


def student_step_losses(method, batch) -> dict[str, float]:
    for engine in method.engines.values():
        engine.module.eval()  # no dropout: the two precisions see the same network
    return {k: float(v) for k, v in method.student_micro_step(batch, seed=5).items()}


def test_frozen_forwards_in_bf16_give_the_fp32_losses_to_bf16_precision():
    tokenizer, examples = tiny_tokenizer()
    batch = tiny_batch(tokenizer, examples)
    fp32 = tiny_matekd(0, overrides=("train.cache_teacher_logits=false",))
    bf16 = tiny_matekd(0, overrides=("train.cache_teacher_logits=false", "train.frozen_forward_dtype=bf16"))
    assert fp32.frozen_dtype is None and bf16.frozen_dtype is torch.bfloat16
    with torch.no_grad():  # same starting weights on both
        for a, b in zip(fp32.student.module.parameters(), bf16.student.module.parameters()):
            assert torch.equal(a, b)
    want, got = student_step_losses(fp32, batch), student_step_losses(bf16, batch)
    assert want.keys() == got.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=2e-2), key


def test_bf16_autocast_reaches_the_teacher_and_generator_forwards_only():
    tokenizer, examples = tiny_tokenizer()
    method = tiny_matekd(0, overrides=("train.cache_teacher_logits=false", "train.frozen_forward_dtype=bf16"))
    seen = {}

    def record(role: str):
        def hook(module, args) -> None:
            seen.setdefault(role, torch.is_autocast_enabled("cpu"))
        return hook

    for role, module in (("teacher", method.teacher.module), ("student", method.student.module),
                         ("generator", masked_lm_parts(method.generator.module).encoder)):
        module.register_forward_pre_hook(record(role))
    method.student_micro_step(tiny_batch(tokenizer, examples), seed=5)
    assert seen == {"generator": True, "teacher": True, "student": False}


def test_a_generator_cut_to_its_first_layers_keeps_their_weights_and_its_head():
    full = run_inputs(tiny_run_config("models.generator=builtin:bert-L3-H32-A2")).models.generator
    cut_inputs = run_inputs(tiny_run_config("models.generator=builtin:bert-L3-H32-A2", "matekd.generator_layers=2"))
    _, method = build_run(cut_inputs)
    generator = method.generator.module
    assert len(encoder_layers(generator)) == 2 and generator.config.num_hidden_layers == 2
    kept = dict(generator.named_parameters())
    for name, param in full.named_parameters():
        if ".layer.2." in name:
            assert name not in kept
        else:  # the same initialisation (the run's seed), layers 0-1, embeddings and MLM head alike
            assert torch.equal(kept[name], param), name
    tokenizer, examples = tiny_tokenizer()
    losses = method.train_step([tiny_batch(tokenizer, examples)], 0, [7])  # step 0 of a 1:1 cycle: the generator's
    assert torch.isfinite(losses["gen_div"])


@pytest.mark.parametrize("overrides,message", [
    (("matekd.generator_layers=0",), "matekd.generator_layers must be >= 1"),
    (("train.frozen_forward_dtype=int8",), "train.frozen_forward_dtype must be null, bf16 or fp16"),
])
def test_bad_values_are_refused_by_the_config(overrides, message):
    with pytest.raises(MatekdError, match=message):
        tiny_run_config(*overrides)


def test_more_generator_layers_than_it_has_is_one_line_before_anything_runs(tmp_path):
    result = run_cli(["train", *TINY_TASK, "models.teacher_finetune_epochs=0", "matekd.generator_layers=5",
                      f"output.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "matekd: error: matekd.generator_layers is 5 but the generator has 2 encoder layers"
    assert not (tmp_path / "run").exists()


def test_run_configs_expand_environment_variables(tmp_path, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("models:\n  teacher: ${MATEKD_TEST_MODEL}/teacher\n")
    monkeypatch.setenv("MATEKD_TEST_MODEL", "/models")
    assert load_config(config).models.teacher == "/models/teacher"
    monkeypatch.delenv("MATEKD_TEST_MODEL")
    with pytest.raises(MatekdError, match="environment variable MATEKD_TEST_MODEL in '.*' is not set"):
        load_config(config)
    monkeypatch.setenv("MATEKD_TEST_MODEL", "")
    with pytest.raises(MatekdError, match="environment variable MATEKD_TEST_MODEL in '.*' is empty"):
        load_config(config)
