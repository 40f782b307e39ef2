"""Models that never exist whole on one host: ZeRO-3 models are built straight into their
partitions (matekd_ds/zero3_load.py) and filled from safetensors shards, each rank reading only
its own share. Checked on 1 and 2 CPU ranks against the same checkpoint loaded whole."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, run_cli, tiny_tokenizer

from matekd_ds.zero3_load import checkpoint_key_to_parameter


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three local checkpoints with awkward shapes (nothing divides by the world size)."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

    tokenizer, _ = tiny_tokenizer()
    root = tmp_path_factory.mktemp("zero3_checkpoints")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=38, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=75, num_labels=3, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    BertForSequenceClassification(config).save_pretrained(root / "classifier_sharded", max_shard_size="60KB")
    BertForMaskedLM(config).save_pretrained(root / "masked_lm_tied", max_shard_size="80KB")
    BertModel(config).save_pretrained(root / "encoder_as_classifier")
    for name in ("classifier_sharded", "masked_lm_tied", "encoder_as_classifier"):
        tokenizer.save_pretrained(root / name)
    assert len(list((root / "classifier_sharded").glob("*.safetensors"))) > 2
    return root


@pytest.mark.parametrize("ranks", [1, 2])
def test_partitioned_loading_equals_loading_whole(checkpoints, tmp_path, ranks):
    out = tmp_path / "probe.json"
    result = run_cli([], cwd=REPO, ranks=ranks, script=REPO / "tests" / "zero3_load_probe.py",
                     script_args=[str(checkpoints), str(out)])
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(out.read_text())
    assert len(results) == 6
    for case, r in results.items():
        assert r["world_size"] == ranks and r["partitioned"], case
        expected_dtype = ["torch.bfloat16"] if case.endswith("bf16") else ["torch.float32"]
        assert r["dtypes"] == expected_dtype, case
        assert r["keys"] == r["reference_keys"], case
        if case.startswith("encoder_as_classifier"):  # the head is new: initialised, not loaded
            assert r["differing"] == ["classifier.weight"], case
        else:
            assert r["differing"] == [], case
        # each rank holds 1/world of the parameters (+ padding and the few small ones ZeRO keeps whole)
        assert r["rank_fraction"] <= 1 / ranks + 0.06, case


def test_checkpoint_keys_map_onto_the_model():
    names = {"bert.embeddings.LayerNorm.weight": 0, "bert.encoder.layer.0.output.dense.weight": 0, "classifier.bias": 0}
    assert checkpoint_key_to_parameter("classifier.bias", names, "bert") == "classifier.bias"
    assert checkpoint_key_to_parameter("encoder.layer.0.output.dense.weight", names, "bert") == \
        "bert.encoder.layer.0.output.dense.weight"  # an encoder checkpoint without the prefix
    assert checkpoint_key_to_parameter("bert.embeddings.LayerNorm.gamma", names, "bert") == \
        "bert.embeddings.LayerNorm.weight"  # the legacy name
    assert checkpoint_key_to_parameter("cls.predictions.bias", names, "bert") is None


# ---------------------------------------------------------------------------------------------
# A teacher that does not fit one rank's host-memory budget


@pytest.fixture(scope="module")
def big_teacher(tmp_path_factory):
    """A 1.2 GB teacher (24 layers, hidden 1024) in 200 MB safetensors shards, with its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer, _ = tiny_tokenizer()
    folder = tmp_path_factory.mktemp("big_teacher") / "teacher"
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, num_labels=2, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(folder, max_shard_size="200MB")
    tokenizer.save_pretrained(folder)
    teacher_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return folder, teacher_bytes


def _budgeted_kd_run(teacher, out, report, budget: int, ranks: int):
    args = ["train", "task=synthetic", "data.synthetic.train_size=64", "data.synthetic.dev_size=32",
            "data.max_length=32", "method=kd", f"models.teacher={teacher}", "models.student=builtin:bert-L1-H32-A2",
            "deepspeed.teacher=teacher-inference", "train.max_steps=4", "train.micro_batch_size=8",
            "eval.every_steps=2", "eval.batch_size=16", "logging.progress=false", "logging.tensorboard=false",
            "output.checkpoint_every=0", f"output.dir={out}"]
    env = {"MATEKD_RSS_BUDGET": str(budget), "MATEKD_RSS_REPORT": str(report)}
    return run_cli([], cwd=out.parent, ranks=ranks, env=env, script=REPO / "tests" / "rss_budget_run.py",
                   script_args=args)


def test_a_teacher_larger_than_one_ranks_host_budget_trains_on_two_ranks(big_teacher, tmp_path):
    """Each rank may grow by 0.85 x the teacher's bytes (a watchdog on its RSS ends it at once
    past that, as an out-of-memory kill would). Two ranks, each building and holding half of the
    ZeRO-3 teacher, train and evaluate within it; one rank, holding all of it, cannot."""
    teacher, teacher_bytes = big_teacher
    budget = int(0.85 * teacher_bytes)

    two = _budgeted_kd_run(teacher, tmp_path / "two", tmp_path / "two_rss", budget, ranks=2)
    assert two.returncode == 0, two.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"two_rss.{rank}").read_text())
        assert not report["over_budget"] and report["peak_growth"] < budget, report
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and len(metrics["evaluations"]) == 2
    assert metrics["memory"]["teacher"]["param_bytes_rank_fraction"] <= 0.55

    one = _budgeted_kd_run(teacher, tmp_path / "one", tmp_path / "one_rss", budget, ranks=1)
    assert one.returncode == 86, one.stderr[-4000:]
    assert json.loads((tmp_path / "one_rss.0").read_text())["over_budget"]
