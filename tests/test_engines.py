"""RunEngines: every engine of a run from the run config."""

from __future__ import annotations

from helpers import ds_config, tiny_tokenizer

from matekd_ds import distributed, models
from matekd_ds.config import config_from_dict
from matekd_ds.engines import RunEngines


def test_trained_engines_train_with_dropout_even_from_a_pretrained_checkpoint(tmp_path):
    """from_pretrained returns a model in eval mode and DeepSpeed keeps that mode: a student or
    generator loaded from a checkpoint would train with dropout off."""
    distributed.init()
    tokenizer, _ = tiny_tokenizer()
    models.load_classifier("student", "builtin:bert-L1-H32-A2", 2, tokenizer, False).save_pretrained(tmp_path / "s")
    models.load_generator("builtin:bert-L1-H32-A2", tokenizer).save_pretrained(tmp_path / "g")
    student = models.load_classifier("student", str(tmp_path / "s"), 2, tokenizer, False)
    generator = models.load_generator(str(tmp_path / "g"), tokenizer)
    assert not student.training and not generator.training  # what transformers hands back
    cfg = config_from_dict({"train": {"max_steps": 22, "micro_batch_size": 6}})
    engines = RunEngines(cfg, {"student": ds_config(0), "generator": ds_config(0)}, "fp32", batches_per_epoch=10)
    assert engines.student_phase_steps == 22 and engines.student_optimizer_steps == 12  # 10 generator steps first
    assert engines.student(student).module.training
    assert engines.generator(generator).module.training


def test_extra_generator_steps_give_matekd_the_student_steps_of_kd():
    """With matekd.extra_generator_steps the budget counts student steps only: 155 student steps
    need 175 phase steps at n_G:n_S = 10:100, 310 need 350; without it the official count."""
    def engines(method, extra, **train):
        cfg = config_from_dict({"method": method, "train": train, "matekd": {"extra_generator_steps": extra}})
        return RunEngines(cfg, {}, "fp32", batches_per_epoch=31)
    for epochs, phase in ((5, 175), (10, 350), (1, 41)):
        kd, matekd = engines("kd", True, epochs=epochs), engines("matekd", True, epochs=epochs)
        assert matekd.student_optimizer_steps == kd.student_optimizer_steps == 31 * epochs
        assert matekd.student_phase_steps == phase
    official = engines("matekd", False, epochs=5)
    assert (official.student_phase_steps, official.student_optimizer_steps) == (155, 135)
    assert engines("matekd", True, max_steps=100).student_phase_steps == 110
