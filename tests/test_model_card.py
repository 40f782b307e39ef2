"""The model card is a pure function of the run's config, metrics and robustness record, and
RunDir renders and writes it from what it holds in memory: never from its own files read back."""

from __future__ import annotations

import json

import pytest
import yaml

from matekd_ds import model_card
from matekd_ds.config import load_config
from matekd_ds.run_dir import RunDir

CUSTOM = ["task=custom", "data.train_file=train.jsonl", "data.dev_file=dev.jsonl", "data.text_columns=[question]",
          "data.label_names=[neg,pos,meh]", "method=kd", "train.max_steps=7", "models.teacher=./my-teacher"]
METRICS = {"status": "completed", "world_size": 2, "dtype": "bf16",
           "teacher": {"params": 4_200_000, "dev": {"dev": {"accuracy": 0.9, "main": 0.9}}},
           "student": {"params": 1_100_000, "steps": 7},
           "final": {"dev": {"accuracy": 0.75, "main": 0.75}},
           "best": {"step": 5, "dev": {"dev": {"accuracy": 0.8, "main": 0.8}}}}
ROBUSTNESS = {"settings": {"generator": "gen", "mask_prob": 0.3, "tau": 1.0, "seed": 0}, "teacher": "t",
              "splits": {"dev": {"clean": {"model": {"accuracy": 0.75}, "teacher": {"accuracy": 0.9},
                                           "agreement": 0.8, "kl": 0.1},
                                 "perturbed": {"model": {"accuracy": 0.6}, "teacher": {"accuracy": 0.7},
                                               "agreement": 0.65, "kl": 0.3},
                                 "changed_token_fraction": 0.28}}}


def _front_and_body(card: str) -> tuple[dict, str]:
    _, front, body = card.split("---\n", 2)
    return yaml.safe_load(front), body


def test_render_is_a_function_of_its_arguments(tmp_path, monkeypatch):
    cfg = load_config(None, CUSTOM)
    monkeypatch.chdir(tmp_path)  # nothing there to read: the card must not need any file
    card = model_card.render(cfg, METRICS, None, "my-run", "student")
    assert card == model_card.render(cfg, METRICS, None, "my-run", "student")
    meta, body = _front_and_body(card)
    assert meta["model-index"][0]["name"] == "my-run-student"
    assert meta["model-index"][0]["results"][0]["metrics"] == [
        {"type": "accuracy", "value": 0.75, "name": "dev accuracy (dev)"}]
    for expected in ("| task | `custom`: neg, pos, meh |", "| method | `kd` |",
                     "| teacher | `./my-teacher`, 4.20M parameters |", "| parameters | 1.10M |",
                     "| global batch size | 64 |", "Precision: bf16; 2 rank(s).",
                     "Dev set, end of training.", "The teacher on the same dev set:"):
        assert expected in body, expected
    assert "## Robustness" not in body
    best = _front_and_body(model_card.render(cfg, METRICS, None, "my-run", "student_best"))[1]
    assert "Dev set, best evaluation (step 5)." in best and "| dev | accuracy | 0.8000 |" in best
    assert list(tmp_path.iterdir()) == []


def test_render_with_robustness_and_before_any_metrics():
    cfg = load_config(None, CUSTOM)
    body = _front_and_body(model_card.render(cfg, METRICS, ROBUSTNESS, "r", "student"))[1]
    assert "## Robustness" in body
    assert "| dev | student | accuracy | 0.7500 | 0.6000 |" in body
    assert "| dev | student vs teacher | kl | 0.1000 | 0.3000 |" in body
    early = _front_and_body(model_card.render(cfg, {}, None, "r", "student"))[1]
    assert "Dev set, not recorded yet." in early and "1 rank(s)" in early


# ---------------------------------------------------------------------------------------------
# RunDir: the cards from memory


@pytest.fixture(scope="module")
def tiny():
    """A tokenizer and a 3-class classifier small enough to export in a moment."""
    from transformers import BertConfig, BertForSequenceClassification

    from matekd_ds.data.tokenizer import train_wordpiece

    tokenizer = train_wordpiece(["what is it", "the film is good", "not bad at all"], 60)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3, pad_token_id=tokenizer.pad_token_id)
    return tokenizer, BertForSequenceClassification(config)


def _opened(tmp_path, tiny, resume: bool = False) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.open(load_config(None, [*CUSTOM, f"output.dir={tmp_path / 'run'}"]), resume, tiny[0])
    return run


def test_exports_and_cards_come_from_memory_not_from_the_files(tmp_path, tiny):
    tokenizer, model = tiny
    run = _opened(tmp_path, tiny)
    assert yaml.safe_load(run.config_file.read_text())["task"] == "custom"
    run.write_metrics({"status": "running", "world_size": 1})
    # what RunDir wrote, damaged on disk behind its back: the export must not read it
    run.config_file.write_text("task: [broken")
    run.metrics_file.write_text("{broken")
    run.export("student", model, tokenizer)
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "meh"}
    assert json.loads((run.model_dir("student") / "config.json").read_text())["label2id"] \
        == {"neg": 0, "pos": 1, "meh": 2}
    assert "Dev set, not recorded yet." in (run.model_dir("student") / "README.md").read_text()
    run.export("student_best", model, tokenizer)

    metrics = dict(METRICS)
    run.write_metrics(metrics)
    metrics["final"] = {"dev": {"accuracy": 0.0}}  # the caller's dict, changed after the write
    run.write_robustness(ROBUSTNESS)
    run.refresh_cards()
    for name in ("student", "student_best"):
        card = (run.model_dir(name) / "README.md").read_text()
        assert "## Robustness" in card and "| dev | student | accuracy | 0.7500 | 0.6000 |" in card
    assert "| dev | accuracy | 0.7500 |" in (run.model_dir("student") / "README.md").read_text()
    assert json.loads(run.robustness_file.read_text()) == ROBUSTNESS
    assert run.read_robustness() == ROBUSTNESS
    assert not [p for p in run.path.rglob("*") if p.name.endswith((".tmp", ".old"))]


def test_a_generator_export_has_no_card_and_refresh_skips_missing_exports(tmp_path, tiny):
    tokenizer, model = tiny
    run = _opened(tmp_path, tiny)
    run.refresh_cards()  # no student yet: nothing to write
    assert not run.model_dir("student").exists()
    run.export("generator_warm", model, tokenizer)
    assert not (run.model_dir("generator_warm") / "README.md").exists()


def test_another_process_reads_the_state_from_the_files(tmp_path, tiny):
    """`matekd eval RUN --perturbed`: a RunDir on a finished run, refreshing its cards."""
    tokenizer, model = tiny
    trained = _opened(tmp_path, tiny)
    trained.write_metrics(METRICS)
    trained.export("student", model, tokenizer)
    (tmp_path / "run" / "train.jsonl").unlink(missing_ok=True)  # the training file may be gone by now

    later = RunDir(tmp_path / "run")
    with pytest.raises(RuntimeError, match="open"):
        later.refresh_cards()  # nothing to render from yet
    later.read_state()
    later.write_robustness(ROBUSTNESS)
    later.refresh_cards()
    card = (later.model_dir("student") / "README.md").read_text()
    assert "## Robustness" in card and "Dev set, end of training." in card
    assert RunDir(tmp_path / "run").read_state().read_robustness() == ROBUSTNESS


def test_a_resumed_run_keeps_its_robustness_record_and_a_damaged_one_is_one_line(tmp_path, tiny):
    from matekd_ds.errors import MatekdError

    tokenizer, model = tiny
    first = _opened(tmp_path, tiny)
    first.write_robustness(ROBUSTNESS)
    resumed = _opened(tmp_path, tiny, resume=True)
    resumed.write_metrics(METRICS)
    resumed.export("student", model, tokenizer)
    assert "## Robustness" in (resumed.model_dir("student") / "README.md").read_text()

    resumed.robustness_file.write_text("{not json")
    with pytest.raises(MatekdError, match="robustness.json is not valid JSON"):
        RunDir(tmp_path / "run").read_robustness()
