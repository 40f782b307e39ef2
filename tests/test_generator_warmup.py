"""A generator built from an encoder checkpoint (no MLM head) gets a tied head and an MLM warm-up."""

import json

import torch
from helpers import run_cli, tiny_run_config, tiny_tokenizer
from transformers import BertConfig, BertModel

from matekd_ds import models
from matekd_ds.assembly import build_generator_warmup, run_engines, run_inputs
from matekd_ds.data.batching import collate, encode
from matekd_ds.methods.mlm import mlm_evaluate


def _encoder_checkpoint(path, tokenizer):
    """An encoder-only checkpoint, like all-MiniLM-L6-v2: BertModel, no MLM head."""
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_encoder_checkpoint_gets_an_mlm_head_tied_to_its_embeddings(tmp_path):
    tokenizer, _ = tiny_tokenizer()
    path = _encoder_checkpoint(tmp_path / "encoder", tokenizer)
    generator = models.load_generator(str(path), tokenizer)
    decoder = models.masked_lm_parts(generator)
    embeddings = generator.get_input_embeddings().weight
    head_weight = generator.get_output_embeddings().weight
    assert head_weight is embeddings or head_weight.data_ptr() == embeddings.data_ptr()
    # the encoder's pretrained weights were kept (only the head is new)
    saved = BertModel.from_pretrained(path)
    assert torch.equal(saved.embeddings.word_embeddings.weight, embeddings)
    assert decoder.encoder is generator.bert


def test_mlm_warmup_teaches_the_generator_the_task_text(tmp_path):
    tokenizer, examples = tiny_tokenizer()
    encoder = _encoder_checkpoint(tmp_path / "encoder", tokenizer)
    inputs = run_inputs(tiny_run_config(f"models.generator={encoder}", "deepspeed.generator=zero2",
                                        "train.micro_batch_size=16", "matekd.generator_mlm_warmup_steps=60",
                                        "matekd.generator_mlm_warmup_lr=3e-3", "matekd.generator_mlm_warmup_ratio=0",
                                        "matekd.generator_mlm_warmup_weight_decay=0"))
    method = build_generator_warmup(inputs, run_engines(inputs), inputs.models.generator)
    engine, perturber = method.engines["generator"], method.perturber
    train = encode(examples[:200], tokenizer, 32, regression=False)
    dev = encode(examples[200:260], tokenizer, 32, regression=False)
    before = mlm_evaluate(engine.module, perturber, dev, 32, tokenizer.pad_token_id, torch.device("cpu"))
    again = mlm_evaluate(engine.module, perturber, dev, 32, tokenizer.pad_token_id, torch.device("cpu"))
    assert before == again  # fixed masks: comparable across the warm-up
    for step in range(60):
        batch = collate(train, [(step * 16 + i) % len(train) for i in range(16)], tokenizer.pad_token_id)
        method.train_step([batch], step, [step])
    after = mlm_evaluate(engine.module, perturber, dev, 32, tokenizer.pad_token_id, torch.device("cpu"))
    assert after["loss"] < before["loss"] - 0.5, (before, after)
    assert after["accuracy"] > before["accuracy"] + 0.1, (before, after)


def test_warmup_generator_command_exports_a_generator_that_matekd_loads(tmp_path):
    tokenizer, examples = tiny_tokenizer()
    base = ["task=synthetic", "data.synthetic.train_size=300", "data.synthetic.dev_size=80", "data.max_length=32",
            "models.teacher_finetune_epochs=0", "logging.progress=false", "train.micro_batch_size=16"]
    warm_dir = tmp_path / "warm"
    result = run_cli(["warmup-generator", *base, "matekd.generator_mlm_warmup_steps=12",
                      "matekd.generator_mlm_warmup_lr=0.003", "eval.every_steps=6", f"output.dir={warm_dir}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generator warmed up" in result.stdout
    metrics = json.loads((warm_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and "student" not in metrics
    warm = metrics["generator_warmup"]
    assert warm["steps"] == 12 and warm["dev_after"]["loss"] < warm["dev_before"]["loss"]
    assert (warm_dir / "generator_warm" / "config.json").is_file() and not (warm_dir / "student").exists()

    # the warmed generator serves a MATE-KD run as is
    run = tmp_path / "run"
    result = run_cli(["train", *base, f"models.generator={warm_dir / 'generator_warm'}",
                      f"models.tokenizer={warm_dir / 'tokenizer'}", "train.max_steps=3",
                      "matekd.generator_steps=1", "matekd.student_steps=1", f"output.dir={run}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"


def test_warmup_generator_command_needs_warmup_steps(tmp_path):
    result = run_cli(["warmup-generator", f"output.dir={tmp_path / 'w'}"], cwd=tmp_path)
    assert result.returncode == 2 and "generator_mlm_warmup_steps > 0" in result.stderr
    assert not (tmp_path / "w").exists()
