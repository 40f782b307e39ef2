"""The control arms of issue 27 and the adversary probe: is MATE-KD's gain the adversary's, or
masked-LM data augmentation's? `matekd.perturbation: random` (uniform random tokens at the same
masks, no generator at all), `matekd.generator_steps: 0` (a generator that is never trained), and
`matekd.adversary_probe` (the trained generator's divergence against its warm copy's, and how far
its weights moved). Tiny runs through `matekd train`'s own factory (pipeline.run_training)."""

from __future__ import annotations

import contextlib
import json
import signal

import pytest
import torch
import yaml
from helpers import TINY_TASK, matekd_in_process, tiny_batch, tiny_run_config, tiny_tokenizer
from test_recovery import assert_same_run

from matekd_ds import pipeline
from matekd_ds.assembly import run_inputs
from matekd_ds.callbacks import RunCallback
from matekd_ds.errors import MatekdError
from matekd_ds.experiment.plan import plan
from matekd_ds.experiment.spec import read_spec
from matekd_ds.faults import FaultInjection
from matekd_ds.perturb import Perturber, RandomTokens
from matekd_ds.run_dir import RunDir
from matekd_ds.summary import adversary_line, summary_rows

# A tiny MATE-KD run: 1:2 cycles (generator steps at 0, 3, 6, ...), every step logged, a checkpoint
# every 2 steps, one evaluation at the end, no latency timing.
RUN = ("train.micro_batch_size=8", "matekd.student_steps=2", "output.checkpoint_every=2", "eval.every_steps=0",
       "logging.log_every=1", "logging.progress=false", "logging.tensorboard=false", "eval.deployment_latency=false")


@contextlib.contextmanager
def kept_signal_handlers():
    """run_training installs the run's SIGTERM/SIGINT handlers in this process: put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def own_signal_handlers():
    with kept_signal_handlers():
        yield


def run_config(out, *overrides: str):
    return tiny_run_config(*RUN, f"output.dir={out}", *overrides)


class SeenEngines(RunCallback):
    """What each student-phase step trained, and the method's engines."""

    def __init__(self):
        self.trained: list[str] = []
        self.engines: dict = {}

    def on_step_end(self, event) -> bool:
        if event.phase == "student":
            self.trained.append(event.trained)
            self.engines = event.engines
        return False


def scalar_names(out) -> set[str]:
    return {line.split(",")[1] for line in (out / "logs/scalars.csv").read_text().splitlines()[1:]}


# ---------------------------------------------------------------------------------------------
# The random-token sampler


def masked_and_random(seed: int):
    tokenizer, examples = tiny_tokenizer()
    batch = tiny_batch(tokenizer, examples, n=16)
    mb = Perturber.for_run(tiny_run_config().matekd, tokenizer).mask_batch(batch, seed)
    return tokenizer, mb, RandomTokens.for_run(tokenizer).sample_perturbed_ids(None, mb, seed + 1)


def test_random_tokens_rewrite_the_masked_positions_alone_never_with_a_special_token():
    tokenizer, mb, ids = masked_and_random(seed=11)
    assert mb.mask.sum() > 20
    assert torch.equal(ids[~mb.mask], mb.input_ids[~mb.mask])
    drawn = ids[mb.mask]
    assert not torch.isin(drawn, torch.tensor(tokenizer.all_special_ids)).any()
    assert bool(((drawn >= 0) & (drawn < len(tokenizer))).all())
    assert (drawn != mb.input_ids[mb.mask]).float().mean() > 0.9  # a draw may hit the original token
    assert len(set(drawn.tolist())) > len(drawn) // 2  # spread over the vocabulary


def test_random_tokens_are_reproducible_per_seed():
    _, mb, first = masked_and_random(seed=11)
    _, _, again = masked_and_random(seed=11)
    other = RandomTokens.for_run(tiny_tokenizer()[0]).sample_perturbed_ids(None, mb, seed=99)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# ---------------------------------------------------------------------------------------------
# Config: the new keys, their one-line errors, and what random implies


def test_random_takes_the_generator_steps_and_warm_up_as_zero():
    m = tiny_run_config("matekd.perturbation=random", "matekd.generator_steps=5",
                        "matekd.generator_mlm_warmup_steps=7").matekd
    assert (m.generator_steps, m.generator_mlm_warmup_steps) == (0, 0)
    assert tiny_run_config("method=kd", "matekd.adversary_probe=true").method == "kd"  # matekd keys, kd ignores


@pytest.mark.parametrize("overrides, fragment", [
    (["matekd.perturbation=adversarial"], "matekd.perturbation must be one of generator, random, got 'adversarial'"),
    (["matekd.adversary_probe=maybe"], "config key 'matekd.adversary_probe' must be true or false"),
    (["matekd.adversary_probe_batches=0"], "matekd.adversary_probe_batches must be >= 1, got 0"),
    (["matekd.adversary_probe=true", "matekd.perturbation=random"], "matekd.perturbation random has none"),
    (["matekd.adversary_probe=true", "matekd.generator_steps=0"], "matekd.generator_steps 0 never trains it"),
    (["matekd.adversary_probe=true", "deepspeed.generator=zero3"],
     "matekd.adversary_probe keeps a whole copy of the generator: use deepspeed.generator below ZeRO-3"),
    (["method=kd-aug", "matekd.adversary_probe=true"], "method kd-aug never trains it (use method matekd)"),
    (["method=kd-aug", "deepspeed.generator=zero3"], "method kd-aug keeps its frozen generator whole on every rank"),
])
def test_bad_values_of_the_new_keys_are_one_line_before_anything_is_written(tmp_path, capfd, overrides, fragment):
    out = tmp_path / "run"
    code, _, err = matekd_in_process(capfd, "train", *TINY_TASK, "models.teacher_finetune_epochs=0",
                                     *overrides, f"output.dir={out}")
    errors = [line for line in err.splitlines() if line.startswith("matekd: error: ")]
    assert code == 2 and len(errors) == 1 and fragment in errors[0], err[-3000:]
    assert "Traceback" not in err and not out.exists()


def test_a_spec_whose_random_arm_has_no_generator_plans_no_warm_up_for_it(tmp_path):
    spec = {"output_dir": str(tmp_path / "sweep"), "tasks": {"synthetic": {}}, "methods": ["kd", "matekd-random"],
            "seeds": [1], "teacher": {"model": "builtin:tiny-teacher"},
            "method_overrides": {"matekd-random": {"method": "matekd", "matekd": {"perturbation": "random"}}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = {run.name: run for run in plan(read_spec(path))}  # no generator.model needed
    assert set(runs) == {"teacher", "kd-seed1", "matekd-random-seed1"}
    warmed = {"model": "builtin:tiny-generator", "mlm_warmup": {"matekd": {"generator_mlm_warmup_steps": 3}}}
    spec.update(methods=["matekd", "matekd-random"], generator=warmed)
    path.write_text(yaml.safe_dump(spec))
    runs = {run.name: run for run in plan(read_spec(path))}
    assert runs["matekd-seed1"].needs == ["teacher", "generator"]
    assert runs["matekd-random-seed1"].needs == ["teacher"]
    assert runs["matekd-random-seed1"].config["matekd"]["perturbation"] == "random"


# ---------------------------------------------------------------------------------------------
# The random-token arm, end to end


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """A finished random-token run whose models.generator does not exist (and whose warm-up
    steps are set): nothing may try to load or warm it up. (run dir, metrics, engines seen)."""
    out = tmp_path_factory.mktemp("random") / "run"
    seen = SeenEngines()
    cfg = run_config(out, "train.max_steps=6", "matekd.perturbation=random", "models.generator=/no/such/generator",
                     "matekd.generator_mlm_warmup_steps=5")
    with kept_signal_handlers():  # a module fixture: set up before the autouse one
        metrics = pipeline.run_training(cfg, callbacks=[seen])
    return out, metrics, seen


def test_a_random_token_run_trains_the_student_alone(random_run):
    out, metrics, seen = random_run
    assert metrics["status"] == "completed" and metrics["perturbation"] == "random"
    assert set(seen.engines) == {"student"} and seen.trained == ["student"] * 6
    assert "generator_warmup" not in metrics and not (out / "generator_warm").exists()
    assert set(metrics["memory"]) == {"teacher", "student"}
    assert (out / "checkpoints/student/student").is_dir() and not (out / "checkpoints/student/generator").exists()
    assert not any("generator" in key for key in json.loads((out / "checkpoints/LAYOUT.json").read_text()))
    saved = yaml.safe_load((out / "config.yaml").read_text())["matekd"]
    assert (saved["perturbation"], saved["generator_steps"], saved["generator_mlm_warmup_steps"]) == ("random", 0, 0)
    names = scalar_names(out)
    assert "student/div_perturbed" in names and not any(n.startswith("generator/") for n in names)


def test_a_random_token_run_says_so_in_its_model_card_and_summary(random_run):
    out, metrics, _ = random_run
    card = (out / "student/README.md").read_text()
    assert "| generator | random tokens (uniform over the vocabulary without its special tokens)" in card
    assert "/no/such/generator" not in card and "generator learning rate" not in card
    assert summary_rows(metrics)[-1][0] == "student (matekd, random tokens)"


def test_a_random_token_run_resumes_bit_identically_and_keeps_its_perturbation(random_run, tmp_path):
    reference, _, _ = random_run
    out = tmp_path / "run"
    cfg = run_config(out, "train.max_steps=6", "matekd.perturbation=random", "models.generator=/no/such/generator",
                     "matekd.generator_mlm_warmup_steps=5")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run_training(cfg, callbacks=[FaultInjection(crash_after=(3, "student"))])
    with pytest.raises(MatekdError, match="'matekd.perturbation' differs from the run"):
        pipeline.run_training(run_config(out, "train.max_steps=6", "models.generator=/no/such/generator"), resume=True)
    pipeline.run_training(cfg, resume=True)
    assert_same_run(reference, out)


# ---------------------------------------------------------------------------------------------
# The frozen generator (generator_steps 0)


def test_generator_steps_zero_never_steps_the_generator(tmp_path):
    seen = SeenEngines()
    cfg = run_config(tmp_path / "run", "train.max_steps=4", "matekd.generator_steps=0", "matekd.generator_lr=0.1")
    pipeline.run_training(cfg, callbacks=[seen])
    assert seen.trained == ["student"] * 4
    generator = seen.engines["generator"]  # built, with an optimizer it never uses
    assert generator.global_steps == 0
    initial = dict(run_inputs(cfg).models.generator.named_parameters())
    for name, param in generator.module.named_parameters():
        assert torch.equal(param.detach().cpu(), initial[name].detach()), name


# ---------------------------------------------------------------------------------------------
# The adversary probe


def test_at_generator_lr_zero_the_probe_sees_no_change_and_changes_no_training(tmp_path):
    out, unprobed = tmp_path / "run", tmp_path / "unprobed"
    metrics = pipeline.run_training(run_config(out, "train.max_steps=6", "matekd.adversary_probe=true",
                                               "matekd.adversary_probe_batches=2", "matekd.generator_lr=0"))
    pipeline.run_training(run_config(unprobed, "train.max_steps=6", "matekd.generator_lr=0"))
    assert_same_run(unprobed, out)  # its draws are seeded apart and its forwards run without dropout
    assert "adversary" not in RunDir(unprobed).read_metrics()
    records = metrics["adversary"]
    assert [r["step"] for r in records] == [1, 4]  # after each generator phase: steps 0 and 3
    for record in records:
        assert record["weight_change"] == record["weight_change_max"] == 0.0
        assert record["div_trained"] == record["div_warm"] > 0
    assert {"generator/adversary_div_trained", "generator/adversary_weight_change"} <= scalar_names(out)
    assert adversary_line(metrics).startswith("adversary after step 4 (2 generator phases)")


def test_a_trained_generator_moves_and_its_records_survive_a_resume(tmp_path):
    out = tmp_path / "run"
    cfg = run_config(out, "train.max_steps=8", "matekd.adversary_probe=true", "matekd.adversary_probe_batches=2",
                     "matekd.generator_lr=1e-2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run_training(cfg, callbacks=[FaultInjection(crash_after=(5, "student"))])
    metrics = pipeline.run_training(cfg, resume=True)  # from the checkpoint at step 4
    records = metrics["adversary"]
    assert [r["step"] for r in records] == [1, 4, 7]
    assert all(r["weight_change"] > 0 and r["weight_change_max"] > 0 for r in records)
    assert records[-1]["weight_change"] > records[0]["weight_change"]
    assert RunDir(out).read_metrics()["adversary"] == records
