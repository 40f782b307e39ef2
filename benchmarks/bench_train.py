#!/usr/bin/env python
"""Throughput of the project's MATE-KD training step against the eager reference of the official
formulation (benchmarks/reference_matekd.py) and against the step's floor, on identical models and
batches.

    python benchmarks/bench_train.py --preset cpu-tiny|cpu-small|gpu-base|gpu-large
        [--data PATH] [--repeats N] [--cycles N] [--sweep seq|batch|teacher] [--ablate-fast-path]
        [--no-save] [KEY=VALUE ...]

KEY=VALUE overrides the preset, e.g. train.micro_batch_size=8 train.seq_len=128
matekd.student_steps=20 models.teacher.layers=4 train.zero_stage=2 (see PRESETS for the keys).

What is measured
* The project: matekd_ds MateKD with DeepSpeed engines (ZeRO stage and precision per preset),
  in-process on one rank (matekd_ds.distributed.init() makes a world of one, so the engines take
  the single-rank fast path of matekd_ds.engines.build_engine), driven through MateKD.train_step
  exactly as the trainer drives it.
* The reference: ReferenceMateKD, plain eager PyTorch + torch.optim.AdamW (autocast for bf16).
* The floor (FloorMateKD below): the unavoidable work of each step in bare PyTorch, no engines,
  hooks, masking, sampling or logging; the project's step time over the floor's is its overhead
  (overhead_vs_floor).
* All start from the same random weights (built from configs; nothing is downloaded), see the same
  batches in the same order and run full cycles of n_G generator : n_S student steps (1:10 by
  default, the official 10:100 ratio shortened); cycle c of a repeat runs batches
  c x cycle .. (c + 1) x cycle - 1. Every repeat interleaves the series step by step (step n of
  the project, the reference, the floor, then step n + 1 of each), so that a busy spell of a
  shared machine slows all of them alike; a step's time is its median over the repeats, a
  cycle's the sum of its steps'. The warm-up steps (one generator and one student step per
  series) are excluded.
* Batches: synthetic (random ids, GLUE-like lengths, see synthetic_batches), or with --data PATH
  real text: a GLUE task folder (e.g. ../shared/data/glue/SST-2) or a CSV/TSV/JSONL file
  (data.text_columns, data.label_column), tokenised by a WordPiece tokenizer built from its
  training text (matekd_ds.data.tokenizer, at most models.vocab_size tokens; nothing is
  downloaded), drawn and padded as the trainer does (TrainStream, collate). With --data the
  project also runs on length-grouped batches (data.group_by_length) of the same text.
* samples/s and real (non-pad) tokens/s over whole cycles, the padding fraction of the timed
  batches; median step times per phase.
* Breakdown: a separate profiled pass (after the timed repeats, interleaved as well) times
  every model's forward and backward with hooks:
    - forward of a model: forward pre-hook -> forward hook (for the generator: encoder pre-hook
      -> MLM-head hook, because the project calls its encoder and head separately);
    - backward of a model: a tensor hook on its output (fires when the backward reaches the
      model) -> a tensor hook on its embeddings' output (fires when it leaves the encoder);
    - "backward" and "optimizer" sections: the project's engine.backward / engine.step (wrapped
      on the instances), the reference's and the floor's loss.backward() / clip + AdamW.step;
    - "other" = step - forwards - backward - optimizer (masking, Gumbel sampling, soft
      embeddings, losses, DeepSpeed bookkeeping); "backward other" = backward - per-model spans
      (the soft-embedding and Gumbel backward, engine hooks).
  On GPU every mark synchronises, so the profiled pass is slower than the timed one; its
  figures are for attribution, the throughput comes from the un-instrumented repeats.
* Peak memory, measured during the profiled pass: GPU torch.cuda.max_memory_allocated above
  what was allocated when the side started; CPU peak RSS above the side's starting RSS, sampled
  every 5 ms from /proc/self/statm (after malloc_trim), so approximate.
* GPU MFU from the model FLOPs written down in cycle_flops(): the same count for both sides, so
  the MFU ratio equals the throughput ratio. Peak: dense bf16 tensor-core FLOPs (PEAK_BF16).
* --ablate-fast-path adds the project with DeepSpeed's own gradient path at world size 1
  (build_engine(..., single_rank_fast_path=False)) on the same batches.

Printed last, in this order: with --data `padding_fraction: A -> B` (timed batches without and
with length grouping) and `group_by_length_tokens_per_s: X.XX` (real tokens/s with grouping over
without); with --ablate-fast-path `single_rank_fast_path_speedup: X.XX`;
`overhead_vs_floor_generator: X.XX` and `overhead_vs_floor: X.XX` (the time of all generator,
resp. student, steps of the project over the floor's, on the same batches); and last exactly `speedup: X.XX` (project samples/s /
reference samples/s on the same batches, the project in its default configuration; for a sweep,
the geometric mean over its points). JSON (and a plot for sweeps) goes to benchmarks/results/
unless --no-save.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from matekd_ds.errors import MatekdError
from harness import (
    Marks, PeakMemory, Restore, apply_overrides, device_name, device_slug, hook_model, provenance, pyplot,
    quiet_libraries, release_memory, save_json, synchronizer, time_method_as_section, today,
)
from reference_matekd import ReferenceMateKD

# Dense bf16 tensor-core peak, FLOP/s (NVIDIA datasheets, SXM parts; H100 PCIe is lower).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12}

ROBERTA = {"distil": dict(layers=6, hidden=768, heads=12, ffn=3072),
           "base": dict(layers=12, hidden=768, heads=12, ffn=3072),
           "large": dict(layers=24, hidden=1024, heads=16, ffn=4096)}
# The CPU presets' BERT-like shapes; "teacher" sweeps pick one of these three.
BERT_CPU = {"distil": dict(layers=2, hidden=384, heads=12, ffn=1536),
            "base": dict(layers=6, hidden=384, heads=12, ffn=1536),
            "large": dict(layers=12, hidden=512, heads=8, ffn=2048)}
BERT_TINY = {"distil": dict(layers=1, hidden=128, heads=4, ffn=512),
             "base": dict(layers=2, hidden=128, heads=4, ffn=512),
             "large": dict(layers=4, hidden=256, heads=4, ffn=1024)}


def preset(family: str, vocab: int, sizes: dict, teacher: str, batch: int, seq: int, dtype: str,
           repeats: int, sweeps: dict) -> dict[str, Any]:
    return {
        # vocab_size: the models' vocabulary; with --data, the cap of the tokenizer built from the
        # text, and the models get the tokenizer's actual size.
        "models": {"family": family, "vocab_size": vocab, "num_labels": 2,
                   "teacher": dict(sizes[teacher]), "student": dict(sizes["distil"]),
                   "generator": dict(sizes["distil"]), "teacher_sizes": sizes},
        "train": {"micro_batch_size": batch, "seq_len": seq, "dtype": dtype, "zero_stage": 0,
                  "ds_config": "zero0", "lr": 2e-5, "weight_decay": 0.01, "clip": 5.0},
        "matekd": {"generator_lr": 5e-7, "generator_clip": 5.0, "generator_steps": 1, "student_steps": 10,
                   "mask_prob": 0.3, "tau": 1.0, "temperature": 1.0},
        # The project's train.cache_teacher_logits (its default: on): the frozen teacher's clean
        # logits come from a table built once, before timing, as the pipeline does per run.
        # single_rank_fast_path: build_engine's, on by default at world size 1 as in a run.
        "project": {"cache_teacher_logits": True, "single_rank_fast_path": True},
        # Synthetic batches: lengths log-normal around mean_length_fraction x seq_len. --data:
        # truncation at max_length (the run config's data.max_length), and the columns of a
        # CSV/TSV/JSONL file (a GLUE folder knows its own); label_names: its classes, when its
        # labels are names (e.g. '["DESC", "ENTY", ...]'), else labels are 0..K-1.
        "data": {"mean_length_fraction": 0.45, "length_sigma": 0.5, "min_length": 8, "pad_to_longest": False,
                 "max_length": 128, "text_columns": ["text"], "label_column": "label", "label_names": None},
        # threads: torch intra-op threads, 0 = torch's default (on a shared CPU, 1 avoids the
        # OpenMP stalls of a thread descheduled by other processes; all sides use the same).
        "bench": {"repeats": repeats, "cycles": 1, "seed": 0, "profile_student_steps": 1, "threads": 0},
        "sweeps": sweeps,
    }


PRESETS = {
    "cpu-tiny": preset("bert", 4096, BERT_TINY, "base", 8, 32, "fp32", 2,
                       {"seq": [16, 32, 64], "batch": [4, 8, 16], "teacher": ["distil", "base", "large"]}),
    "cpu-small": preset("bert", 30522, BERT_CPU, "base", 16, 64, "fp32", 3,
                        {"seq": [32, 64, 128], "batch": [8, 16, 32], "teacher": ["distil", "base", "large"]}),
    "gpu-base": preset("roberta", 50265, ROBERTA, "base", 32, 128, "bf16", 5,
                       {"seq": [64, 128, 256, 512], "batch": [8, 16, 32, 64, 128],
                        "teacher": ["distil", "base", "large"]}),
    "gpu-large": preset("roberta", 50265, ROBERTA, "large", 32, 128, "bf16", 5,
                        {"seq": [64, 128, 256, 512], "batch": [8, 16, 32, 64],
                         "teacher": ["distil", "base", "large"]}),
}

# Token ids of the special tokens: bert-base-uncased's and roberta-base's vocabularies (synthetic
# batches); with --data, the built tokenizer's (config models.special_ids).
SPECIAL_IDS = {"bert": {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103},
               "roberta": {"pad": 1, "unk": 3, "cls": 0, "sep": 2, "mask": 50264}}


# ---------------------------------------------------------------------------------------------
# Configuration


def with_teacher(config: dict, size: str) -> dict:
    config = copy.deepcopy(config)
    config["models"]["teacher"] = dict(config["models"]["teacher_sizes"][size])
    return config


def special_ids(config: dict) -> dict[str, int]:
    m = config["models"]
    return m.get("special_ids") or SPECIAL_IDS[m["family"]]


# ---------------------------------------------------------------------------------------------
# Models and batches


def model_config(family: str, vocab: int, shape: dict, num_labels: int, pad_id: int):
    from transformers import BertConfig, RobertaConfig

    common = dict(vocab_size=vocab, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                  num_attention_heads=shape["heads"], intermediate_size=shape["ffn"], num_labels=num_labels)
    if family == "roberta":
        return RobertaConfig(max_position_embeddings=514, pad_token_id=pad_id, bos_token_id=0, eos_token_id=2,
                             type_vocab_size=1, layer_norm_eps=1e-5, **common)
    return BertConfig(max_position_embeddings=512, pad_token_id=pad_id, **common)


def build_models(config: dict) -> dict[str, nn.Module]:
    """Random-weight teacher and student (sequence classifiers) and generator (masked LM)."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    m, pad = config["models"], special_ids(config)["pad"]
    torch.manual_seed(config["bench"]["seed"])
    classifier = lambda role: AutoModelForSequenceClassification.from_config(  # noqa: E731
        model_config(m["family"], m["vocab_size"], m[role], m["num_labels"], pad))
    generator = AutoModelForMaskedLM.from_config(model_config(m["family"], m["vocab_size"], m["generator"], 1, pad))
    return {"teacher": classifier("teacher"), "student": classifier("student"), "generator": generator}


def synthetic_batches(config: dict, count: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Random non-special ids, [CLS] ... [SEP] then padding; lengths log-normal around
    mean_length_fraction x seq_len (GLUE-like: most rows much shorter than the maximum)."""
    d, special = config["data"], special_ids(config)
    batch, seq, vocab = config["train"]["micro_batch_size"], config["train"]["seq_len"], config["models"]["vocab_size"]
    rng = torch.Generator().manual_seed(config["bench"]["seed"] + 1)
    regular = torch.tensor([i for i in range(vocab) if i not in set(special.values())])
    batches = []
    for _ in range(count):
        lengths = torch.exp(torch.randn(batch, generator=rng) * d["length_sigma"] + math.log(d["mean_length_fraction"] * seq))
        lengths = lengths.round().long().clamp(min(d["min_length"], seq), seq)
        ids = regular[torch.randint(len(regular), (batch, seq), generator=rng)]
        attention = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids[:, 0] = special["cls"]
        ids[torch.arange(batch), lengths - 1] = special["sep"]
        ids[attention == 0] = special["pad"]
        if d["pad_to_longest"]:
            ids, attention = ids[:, :int(lengths.max())], attention[:, :int(lengths.max())]
        labels = torch.randint(config["models"]["num_labels"], (batch,), generator=rng)
        index = torch.arange(len(batches) * batch, (len(batches) + 1) * batch)  # example ids (teacher table)
        batches.append({"input_ids": ids.to(device), "attention_mask": attention.to(device),
                        "labels": labels.to(device), "index": index.to(device)})
    return batches


@dataclass
class RealText:
    """A --data training set, tokenised, and its batches as the trainer would draw them."""

    name: str
    size: int
    mean_length: float
    batches: dict[str, list[dict[str, torch.Tensor]]]  # "ungrouped" / "grouped" -> micro-batches
    epoch_padding: dict[str, float]  # padding fraction over a whole epoch of each stream


def load_examples(path: Path, d: dict):
    """A GLUE task folder (its name says the task: SST-2, MNLI, ...) or a CSV/TSV/JSONL file."""
    from matekd_ds.data.glue import get_task
    from matekd_ds.data.loaders import load_glue_dir, load_table

    if path.is_dir():
        spec = get_task(path.name)
        if spec.is_regression:
            raise SystemExit(f"--data {path}: {spec.name} is a regression task; the reference implements classification")
        return load_glue_dir(spec, path, "train"), spec.num_labels
    examples = load_table(path, d["text_columns"], d["label_column"], d["label_names"])
    return examples, len(d["label_names"]) if d["label_names"] else max(int(ex.label) for ex in examples) + 1


def real_text(config: dict, path: Path, count: int, device: torch.device) -> RealText:
    """Tokenise the training text and draw `count` micro-batches from the trainer's stream, without
    and with length grouping (data.group_by_length), padded by the trainer's collate. Sets the
    models' vocabulary, labels and special ids in `config` to the tokenizer's and the task's."""
    from matekd_ds.data.batching import TrainStream, collate, encode, to_device
    from matekd_ds.data.tokenizer import train_wordpiece

    examples, num_labels = load_examples(path, config["data"])
    tokenizer = train_wordpiece([t for ex in examples for t in ex.texts], config["models"]["vocab_size"])
    data = encode(examples, tokenizer, config["data"]["max_length"], regression=False)
    config["models"].update(vocab_size=len(tokenizer), num_labels=num_labels, special_ids={
        "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id, "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id, "mask": tokenizer.mask_token_id})
    micro, seed = config["train"]["micro_batch_size"], config["bench"]["seed"]
    lengths = [len(ids) for ids in data.input_ids]
    batches, epoch_padding = {}, {}
    for name, grouped in (("ungrouped", False), ("grouped", True)):
        stream = TrainStream.over(data, micro, 0, 1, seed, group_by_length=grouped)
        if stream.batches_per_epoch < count:
            raise SystemExit(f"--data {path}: {len(data)} examples make {stream.batches_per_epoch} batches of {micro}; "
                             f"the benchmark needs {count}")
        drawn = stream.batches()
        epoch = [next(drawn) for _ in range(stream.batches_per_epoch)]
        epoch_padding[name] = padding_fraction([[lengths[i] for i in b] for b in epoch])
        batches[name] = [to_device(collate(data, indices, tokenizer.pad_token_id), device) for indices in epoch[:count]]
    return RealText(str(path), len(data), statistics.mean(lengths), batches, epoch_padding)


def padding_fraction(batch_lengths: list[list[int]]) -> float:
    """Padding positions over all positions, each batch padded to its longest sequence."""
    real = sum(sum(lengths) for lengths in batch_lengths)
    return 1 - real / sum(max(lengths) * len(lengths) for lengths in batch_lengths)


# ---------------------------------------------------------------------------------------------
# The sides: the project, the reference, the floor


@dataclass
class Side:
    name: str
    method: Any  # MateKD, ReferenceMateKD or FloorMateKD
    models: dict[str, nn.Module]  # teacher, student, generator as this side runs them
    step: Any  # (batch, step, seed) -> losses

    def phase(self, step: int) -> str:
        return self.method.phase(step)


def ds_engine_config(config: dict, clip: float) -> dict:
    from matekd_ds.ds_config import finalize_ds_config, read_ds_config

    t = config["train"]
    return finalize_ds_config(read_ds_config(t["ds_config"]), micro_batch=t["micro_batch_size"], grad_accum=1,
                              world_size=1, clip=clip, dtype=t["dtype"], zero_stage=t["zero_stage"])


def clean_logit_table(teacher: nn.Module, batches) -> torch.Tensor:
    """The frozen teacher's clean logits of every example in `batches`, by example id."""
    size = 1 + max(int(b["index"].max()) for b in batches)
    table = None
    with torch.no_grad():
        for batch in batches:
            logits = teacher(**model_inputs(batch)).logits.float()
            if table is None:
                table = torch.zeros(size, logits.shape[-1], device=logits.device)
            table[batch["index"]] = logits
    return table


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def build_project(config: dict, models: dict[str, nn.Module], device: torch.device, batches, *,
                  name: str = "project", fast_path: bool | None = None) -> Side:
    from matekd_ds.engines import EngineSpec, build_engine, place_frozen_teacher
    from matekd_ds.methods import MateKD
    from matekd_ds.perturb import Perturber
    from matekd_ds.teacher import Teacher

    t, mk, p = config["train"], config["matekd"], config["project"]
    fast = p["single_rank_fast_path"] if fast_path is None else fast_path
    never = 10**9  # the linear schedule's horizon: the learning rate stays ~constant, as in the reference
    student = build_engine(models["student"], EngineSpec("student", ds_engine_config(config, t["clip"]),
                                                         t["lr"], t["weight_decay"], never), single_rank_fast_path=fast)
    generator = build_engine(models["generator"], EngineSpec("generator", ds_engine_config(config, mk["generator_clip"]),
                                                             mk["generator_lr"], 0.0, never, schedule="constant"),
                             single_rank_fast_path=fast)
    teacher = place_frozen_teacher(models["teacher"], t["dtype"], device)
    table = clean_logit_table(teacher, batches) if p["cache_teacher_logits"] else None
    special = special_ids(config)
    perturber = Perturber(sorted(set(special.values())), special["mask"], mk["mask_prob"], mk["tau"])
    method = MateKD(student, generator, Teacher(teacher, clean_table=table),
                    perturber, regression=False, temperature=mk["temperature"],
                    loss_weights=[1 / 3, 1 / 3, 1 / 3], generator_steps=mk["generator_steps"],
                    student_steps=mk["student_steps"])
    step = lambda batch, i, seed: method.train_step([batch], i, [seed])  # noqa: E731
    return Side(name, method, {"teacher": teacher, "student": student.module, "generator": generator.module}, step)


def build_reference(config: dict, models: dict[str, nn.Module], device: torch.device) -> Side:
    t, mk = config["train"], config["matekd"]
    models = {role: m.to(device) for role, m in models.items()}
    models["teacher"].eval()
    special = special_ids(config)
    method = ReferenceMateKD(
        models["teacher"], models["student"], models["generator"], mask_token_id=special["mask"],
        special_ids=special.values(), mask_prob=mk["mask_prob"], tau=mk["tau"], temperature=mk["temperature"],
        student_lr=t["lr"], generator_lr=mk["generator_lr"], weight_decay=t["weight_decay"], clip=t["clip"],
        generator_clip=mk["generator_clip"], generator_steps=mk["generator_steps"], student_steps=mk["student_steps"],
        amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(t["dtype"]))
    return Side("reference", method, models, method.train_step)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(F.softmax(teacher_logits.float() / temperature, dim=-1) * log_p).sum(-1).mean()


@dataclass
class FloorInputs:
    """What the floor takes as given for a batch (drawn once, before timing): the mask, the
    masked and the perturbed ids, the teacher's clean logits."""

    mask: torch.Tensor
    masked_ids: torch.Tensor
    perturbed_ids: torch.Tensor
    teacher_clean: torch.Tensor


class FloorMateKD:
    """The unavoidable work of MATE-KD's two steps, in bare PyTorch: no engines, hooks, masking,
    sampling or logging. The project's step time over this one is what engines and bookkeeping
    cost (overhead_vs_floor).

      student step:   generator encoder on the masked text and its MLM head on the masked rows
                      (no gradient), teacher on the perturbed text (no gradient), student
                      forward + backward on clean ⊕ perturbed rows (2B), the ⅓ + ⅓ + ⅓ loss;
                      the update: clip + fused AdamW (the project's optimizer, per-tensor).
      generator step: generator encoder + MLM head on the masked rows, forward and backward; the
                      straight-through one-hot of its softmax, y @ E into teacher and frozen
                      student, the divergence's backward through both; clip + fused AdamW.

    Mask, perturbed ids and clean teacher logits come precomputed (FloorInputs): masking and
    sampling are the overhead's, the clean logits the project's table lookup."""

    def __init__(self, config: dict, models: dict[str, nn.Module], device: torch.device):
        from matekd_ds.engines import build_optimizer
        from matekd_ds.models import masked_lm_parts
        from matekd_ds.perturb import Perturber

        t, mk = config["train"], config["matekd"]
        self.teacher, self.student, self.generator = models["teacher"], models["student"], models["generator"]
        self.parts = masked_lm_parts(self.generator)
        on_cuda = device.type == "cuda"
        self.optimizers = {"student": build_optimizer(self.student, t["lr"], t["weight_decay"], on_cuda),
                           "generator": build_optimizer(self.generator, mk["generator_lr"], 0.0, on_cuda)}
        self.clips = {"student": t["clip"], "generator": mk["generator_clip"]}
        self.generator_steps, self.student_steps = mk["generator_steps"], mk["student_steps"]
        self.temperature, self.vocab = mk["temperature"], config["models"]["vocab_size"]
        special = special_ids(config)
        self.perturber = Perturber(sorted(set(special.values())), special["mask"], mk["mask_prob"], mk["tau"])
        self.inputs: dict[tuple[int, int], FloorInputs] = {}
        self.section = lambda name: contextlib.nullcontext()  # the profiled pass times "backward", "optimizer"

    def phase(self, step: int) -> str:
        from matekd_ds.methods.matekd import cycle_phase

        return cycle_phase(step, self.generator_steps, self.student_steps)

    def train_step(self, batch: dict[str, torch.Tensor], step: int, seed: int) -> None:
        inputs = self.prepare(batch, seed)
        if self.phase(step) == "generator":
            self.generator_step(batch, inputs)
        else:
            self.student_step(batch, inputs)

    @torch.no_grad()
    def prepare(self, batch: dict[str, torch.Tensor], seed: int) -> FloorInputs:
        key = (id(batch), seed)
        if key not in self.inputs:
            mb = self.perturber.mask_batch(batch, seed)
            rng = torch.Generator().manual_seed(seed)
            samples = torch.randint(self.vocab, (int(mb.mask.sum()),), generator=rng).to(mb.mask.device)
            clean = self.teacher(**model_inputs(batch)).logits
            self.inputs[key] = FloorInputs(mb.mask, batch["input_ids"].masked_fill(mb.mask, self.perturber.mask_token_id),
                                           batch["input_ids"].masked_scatter(mb.mask, samples), clean)
        return self.inputs[key]

    def student_step(self, batch: dict[str, torch.Tensor], x: FloorInputs) -> None:
        kwargs = {k: v for k, v in model_inputs(batch).items() if k != "input_ids"}
        with torch.no_grad():
            hidden = self.parts.encoder(input_ids=x.masked_ids, **kwargs)[0]
            self.parts.head(hidden[x.mask])
            teacher_perturbed = self.teacher(input_ids=x.perturbed_ids, **kwargs).logits
        doubled = {k: torch.cat([v, v]) for k, v in kwargs.items()}
        logits = self.student(input_ids=torch.cat([batch["input_ids"], x.perturbed_ids]), **doubled).logits
        clean, perturbed = logits.chunk(2)
        loss = (F.cross_entropy(clean.float(), batch["labels"]) + soft_cross_entropy(clean, x.teacher_clean, self.temperature)
                + soft_cross_entropy(perturbed, teacher_perturbed, self.temperature)) / 3
        self.update("student", self.student, loss)

    def generator_step(self, batch: dict[str, torch.Tensor], x: FloorInputs) -> None:
        kwargs = {k: v for k, v in model_inputs(batch).items() if k != "input_ids"}
        hidden = self.parts.encoder(input_ids=x.masked_ids, **kwargs)[0]
        soft = self.parts.head(hidden[x.mask]).float().softmax(-1)
        hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
        y = hard - soft.detach() + soft  # straight-through: one-hot values, softmax gradient
        self.student.requires_grad_(False)  # frozen: gradients flow through it, not into it
        try:
            student_logits = self.student(inputs_embeds=self.soft_embeds(self.student, batch, x, y), **kwargs).logits
            teacher_logits = self.teacher(inputs_embeds=self.soft_embeds(self.teacher, batch, x, y), **kwargs).logits
            self.update("generator", self.generator, -soft_cross_entropy(student_logits, teacher_logits, self.temperature))
        finally:
            self.student.requires_grad_(True)

    @staticmethod
    def soft_embeds(model: nn.Module, batch, x: FloorInputs, y: torch.Tensor) -> torch.Tensor:
        embedding = model.get_input_embeddings()
        return embedding(batch["input_ids"]).masked_scatter(x.mask.unsqueeze(-1), y @ embedding.weight)

    def update(self, role: str, model: nn.Module, loss: torch.Tensor) -> None:
        optimizer = self.optimizers[role]
        with self.section("backward"):
            loss.backward()
        with self.section("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clips[role])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def build_floor(config: dict, models: dict[str, nn.Module], device: torch.device) -> Side:
    models = {role: m.to(device) for role, m in models.items()}
    models["teacher"].eval().requires_grad_(False)
    floor = FloorMateKD(config, models, device)
    return Side("floor", floor, models, floor.train_step)


def build_sides(config: dict, device: torch.device, batches, ablate_fast_path: bool = False) -> list[Side]:
    """Project, reference and floor (and with `ablate_fast_path` the project without the
    single-rank fast path), each on its own copy of the same initial weights."""
    from matekd_ds import distributed

    distributed.init()
    models = build_models(config)
    for role in ("student", "generator"):
        models[role].train()  # dropout on, as in training, on every side
    copies = [copy.deepcopy(models) for _ in range(3 if ablate_fast_path else 2)]  # before DeepSpeed may cast to bf16
    sides = [build_project(config, models, device, batches), build_reference(config, copies[0], device),
             build_floor(config, copies[1], device)]
    if ablate_fast_path:
        sides.append(build_project(config, copies[2], device, batches, name="project_no_fast_path", fast_path=False))
    return sides


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Series:
    """One timed series: a side on a list of batches (the project runs two with --data)."""

    label: str
    side: Side
    batches: list[dict[str, torch.Tensor]]


def step_seed(config: dict, step: int) -> int:
    return config["bench"]["seed"] * 1_000_003 + step * 104_729


def cycle_length(config: dict) -> int:
    return config["matekd"]["generator_steps"] + config["matekd"]["student_steps"]


def cycle_phase(config: dict, step: int) -> str:
    from matekd_ds.methods.matekd import cycle_phase as phase_of

    return phase_of(step, config["matekd"]["generator_steps"], config["matekd"]["student_steps"])


def timed_batches(config: dict) -> int:
    return config["bench"]["cycles"] * cycle_length(config)


def prepare(series: Series, config: dict) -> None:
    """What a side takes as given per batch (the floor's inputs), computed before any timing."""
    if hasattr(series.side.method, "prepare"):
        for n, batch in enumerate(series.batches[:timed_batches(config)]):
            series.side.method.prepare(batch, step_seed(config, n))


def warm_up(series: Series, config: dict, sync) -> None:
    """One generator and one student step: allocator, kernels, optimizer state."""
    for step in (0, config["matekd"]["generator_steps"]):
        series.side.step(series.batches[step], step, step_seed(config, step))
    sync()


def timed_repeat(series: list[Series], config: dict, sync) -> dict[str, list[float]]:
    """One repeat of every series' cycles, interleaved step by step (step n of each series, then
    step n + 1 of each): on a shared, noisy machine a busy spell slows every series alike.
    Seconds of each step, per series."""
    seconds: dict[str, list[float]] = {s.label: [] for s in series}
    length = cycle_length(config)
    for n in range(timed_batches(config)):
        for s in series:
            sync()
            began = time.perf_counter()
            s.side.step(s.batches[n], n % length, step_seed(config, n))
            sync()
            seconds[s.label].append(time.perf_counter() - began)
    return seconds


# ---------------------------------------------------------------------------------------------
# The profiled pass: per-model forward/backward with hooks, sections, memory


def instrument(side: Side, marks: Marks) -> list:
    from matekd_ds.models import masked_lm_parts

    handles = []
    for role in ("teacher", "student"):
        model = side.models[role]
        handles += hook_model(role, model, model, model.base_model.embeddings, marks)
    generator = side.models["generator"]
    parts = masked_lm_parts(generator)
    handles += hook_model("generator", parts.encoder, parts.head, generator.base_model.embeddings, marks)
    if side.name.startswith("project"):
        for engine in side.method.engines.values():
            for method_name, section in (("backward", "backward"), ("step", "optimizer")):
                handles.append(time_method_as_section(engine, method_name, marks, section))
    else:  # the reference and the floor call self.section("backward" / "optimizer")
        side.method.section = marks.section
        handles.append(Restore(side.method, "section", lambda name: contextlib.nullcontext()))
    return handles


def breakdown(marks: Marks, total: float) -> dict[str, float]:
    out: dict[str, float] = {"step": total}
    for role in ("generator", "teacher", "student"):
        out[f"{role}_forward"] = marks.forward_seconds(role)
        out[f"{role}_backward"] = marks.backward_seconds(role)
    out["backward"] = marks.sections.get("backward", 0.0)
    out["optimizer"] = marks.sections.get("optimizer", 0.0)
    out["backward_other"] = out["backward"] - sum(out[f"{r}_backward"] for r in ("generator", "teacher", "student"))
    out["other"] = total - sum(out[f"{r}_forward"] for r in ("generator", "teacher", "student")) \
        - out["backward"] - out["optimizer"]
    return out


def profiled_pass(series: Series, config: dict, device: torch.device) -> dict[str, Any]:
    sync = synchronizer(device)
    marks = Marks(sync)
    side, n_gen = series.side, config["matekd"]["generator_steps"]
    steps = list(range(n_gen)) + list(range(n_gen, n_gen + min(config["bench"]["profile_student_steps"],
                                                               config["matekd"]["student_steps"])))
    handles = instrument(side, marks)
    per_phase: dict[str, list[dict[str, float]]] = {"generator": [], "student": []}
    try:
        with PeakMemory(device) as memory:
            for i in steps:
                marks.reset()
                sync()
                began = time.perf_counter()
                side.step(series.batches[i], i, step_seed(config, i))
                sync()
                per_phase[side.phase(i)].append(breakdown(marks, time.perf_counter() - began))
    finally:
        for handle in handles:
            handle.remove()
    medians = {phase: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for phase, rows in per_phase.items() if rows}
    return {"breakdown_s": medians, "peak_memory_extra_bytes": memory.peak_extra}


# ---------------------------------------------------------------------------------------------
# FLOPs


def encoder_flops_per_token(shape: dict, seq: float) -> float:
    """Forward matmul FLOPs per token of one encoder: 2 x (QKVO 4H^2 + FFN 2HF) per layer, plus
    the attention scores and the weighted sum, 2 x 2 x seq x H per layer."""
    h, f, layers = shape["hidden"], shape["ffn"], shape["layers"]
    return layers * (2 * (4 * h * h + 2 * h * f) + 4 * seq * h)


def cycle_flops(config: dict, masked_rows: float, seq: float | None = None) -> float:
    """Model FLOPs of one cycle of the algorithm, the SAME count for every side (the reference
    executes more: the full-vocabulary head and the one-hot products on every position):
      trained model fwd+bwd = 3 x forward; frozen model with input gradients = 2 x forward;
      forward only = 1 x forward; T = batch x seq (padding is computed too), M = masked rows;
      seq: the batches' (mean) padded length, default train.seq_len.
      generator step: generator 3F_g T + its MLM head 3 x 2(H^2 + HV) M,
                      student 2F_s T, teacher 2F_t T, the soft embeddings y @ E fwd+bwd 2 x 2MVH
                      for student and teacher;
      student step:   generator F_g T + head 2(H^2 + HV) M, teacher 2T x F_t (clean + perturbed),
                      student 3 x 2T x F_s."""
    m, t = config["models"], config["train"]
    seq, vocab = seq or t["seq_len"], m["vocab_size"]
    tokens = t["micro_batch_size"] * seq
    f = {role: encoder_flops_per_token(m[role], seq) for role in ("teacher", "student", "generator")}
    h_g = m["generator"]["hidden"]
    head = 2 * (h_g * h_g + h_g * vocab) * masked_rows
    soft = sum(4 * masked_rows * vocab * m[role]["hidden"] for role in ("teacher", "student"))
    generator_step = 3 * f["generator"] * tokens + 3 * head + 2 * f["student"] * tokens + 2 * f["teacher"] * tokens + soft
    student_step = f["generator"] * tokens + head + 2 * tokens * f["teacher"] + 3 * 2 * tokens * f["student"]
    mk = config["matekd"]
    return mk["generator_steps"] * generator_step + mk["student_steps"] * student_step


def peak_flops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda" or dtype != "bf16":
        return None  # fp32 has no meaningful tensor-core peak to compare with; CPU: n/a
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


# ---------------------------------------------------------------------------------------------
# One measurement


PROFILED = ("project", "reference", "floor")


def measure(config: dict, device: torch.device, data: Path | None = None, ablate_fast_path: bool = False) -> dict[str, Any]:
    """Every series timed side by side (interleaved repeats); figures per series, the speedup
    over the reference and the overheads over the floor. `data`: real text instead of synthetic
    batches, the project also on length-grouped batches of it."""
    sync = synchronizer(device)
    count = timed_batches(config)
    text = real_text(config, data, count, device) if data else None
    default = text.batches["ungrouped"] if text else synthetic_batches(config, count, device)
    everything = default + (text.batches["grouped"] if text else [])
    sides = {side.name: side for side in build_sides(config, device, everything, ablate_fast_path)}
    series = [Series("project", sides["project"], default)]
    if text:
        series.append(Series("project_grouped", sides["project"], text.batches["grouped"]))
    series += [Series(name, side, default) for name, side in sides.items() if name != "project"]
    for s in series:
        prepare(s, config)
        warm_up(s, config, sync)
    runs = {s.label: [] for s in series}
    for _ in range(config["bench"]["repeats"]):
        for label, seconds in timed_repeat(series, config, sync).items():
            runs[label].append(seconds)
    profiles = {s.label: profiled_pass(s, config, device) for s in series if s.label in PROFILED}
    figures = {s.label: summarise(runs[s.label], profiles.get(s.label), config, s.batches[:count], device) for s in series}
    figures.update(comparisons(figures))
    if text:
        figures["data"] = {"path": text.name, "examples": text.size, "mean_length": text.mean_length,
                           "epoch_padding_fraction": text.epoch_padding}
    del sides, series
    release_memory(device)
    return figures


def comparisons(figures: dict) -> dict[str, float]:
    p, r, floor = figures["project"], figures["reference"], figures["floor"]
    out = {"speedup": p["samples_per_s"] / r["samples_per_s"],
           # the same batches on both sides: time of all student (generator) steps over the floor's
           "overhead_vs_floor": p["student_steps_s"] / floor["student_steps_s"],
           "overhead_vs_floor_generator": p["generator_steps_s"] / floor["generator_steps_s"]}
    if "project_grouped" in figures:
        out["group_by_length_tokens_per_s"] = figures["project_grouped"]["tokens_per_s"] / p["tokens_per_s"]
    if "project_no_fast_path" in figures:
        out["single_rank_fast_path_speedup"] = p["samples_per_s"] / figures["project_no_fast_path"]["samples_per_s"]
    return out


def summarise(runs: list[list[float]], profile: dict | None, config: dict, batches, device: torch.device) -> dict[str, Any]:
    """`runs`: each repeat's step times. A step's time is its median over the repeats; a cycle's,
    the sum of its steps'."""
    cycles, length = config["bench"]["cycles"], cycle_length(config)
    steps = [statistics.median(r[n] for r in runs) for n in range(len(runs[0]))]
    phases = {phase: [t for n, t in enumerate(steps) if cycle_phase(config, n % length) == phase]
              for phase in ("generator", "student")}
    seconds = sum(steps)
    samples = sum(len(b["input_ids"]) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    positions = sum(b["attention_mask"].numel() for b in batches)
    masked = config["matekd"]["mask_prob"] * statistics.mean(
        int(b["attention_mask"].sum()) - 2 * len(b["input_ids"]) for b in batches)
    out = {
        "cycle_seconds_median": seconds / cycles,
        "cycle_seconds_all": [sum(r) / cycles for r in runs],
        "step_seconds_all": runs,
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,  # real (non-pad) tokens
        "padding_fraction": 1 - tokens / positions,
        "generator_step_s_median": statistics.median(phases["generator"]),
        "student_step_s_median": statistics.median(phases["student"]),
        "generator_steps_s": sum(phases["generator"]),
        "student_steps_s": sum(phases["student"]),
        "model_flops_per_cycle": cycle_flops(config, masked, seq=positions / samples),
    }
    if profile:
        out.update(breakdown_s=profile["breakdown_s"], peak_memory_extra_bytes=profile["peak_memory_extra_bytes"],
                   peak_memory_kind="cuda max_memory_allocated above start" if device.type == "cuda"
                   else "RSS above start (sampled)")
    peak = peak_flops(device, config["train"]["dtype"])
    out["mfu"] = out["model_flops_per_cycle"] / (seconds / cycles) / peak if peak else None
    return out


# ---------------------------------------------------------------------------------------------
# Reporting


def describe(config: dict, device: torch.device, data: Path | None = None) -> str:
    m, t, mk = config["models"], config["train"], config["matekd"]
    shape = lambda s: f"{s['layers']}L/H{s['hidden']}/A{s['heads']}/F{s['ffn']}"  # noqa: E731
    batches = (f"batch {t['micro_batch_size']} of {data} (truncated at {config['data']['max_length']})" if data
               else f"batch {t['micro_batch_size']} x seq {t['seq_len']}")
    return (f"{m['family']} V={m['vocab_size']}: teacher {shape(m['teacher'])}, student {shape(m['student'])}, "
            f"generator {shape(m['generator'])}; {batches}, {t['dtype']}, "
            f"DeepSpeed {t['ds_config']} ZeRO-{t['zero_stage']}, teacher clean-logit table "
            f"{'on' if config['project']['cache_teacher_logits'] else 'off'}, single-rank fast path "
            f"{'on' if config['project']['single_rank_fast_path'] else 'off'}; cycle {mk['generator_steps']}:{mk['student_steps']}, "
            f"{config['bench']['repeats']} repeats x {config['bench']['cycles']} cycle(s) on {device_name(device)}")


def print_figures(figures: dict) -> None:
    labels = [k for k in ("project", "project_grouped", "project_no_fast_path", "reference", "floor") if k in figures]
    heads = {"project_grouped": "grouped", "project_no_fast_path": "no fast", "project": "project"}
    rows = [("samples/s", "samples_per_s", 1, "{:.1f}"), ("real tokens/s", "tokens_per_s", 1, "{:.0f}"),
            ("padding fraction", "padding_fraction", 1, "{:.3f}"),
            ("generator step ms", "generator_step_s_median", 1e3, "{:.1f}"),
            ("student step ms", "student_step_s_median", 1e3, "{:.1f}"),
            ("peak memory extra MiB", "peak_memory_extra_bytes", 1 / 2**20, "{:.0f}")]
    print(f"{'':34s}" + "".join(f"{heads.get(label, label):>12s}" for label in labels))
    for title, key, scale, fmt in rows:
        cells = [fmt.format(figures[label][key] * scale) if key in figures[label] else "" for label in labels]
        print(f"{title:34s}" + "".join(f"{c:>12s}" for c in cells))
    if figures["project"]["mfu"] is not None:
        print(f"{'MFU':34s}" + "".join(f"{figures[label]['mfu']:>12.1%}" for label in labels))
    profiled = [label for label in labels if "breakdown_s" in figures[label]]
    for phase in ("generator", "student"):
        print(f"{'breakdown of a ' + phase + ' step, ms':34s}" + "".join(f"{label:>12s}" for label in profiled))
        keys = figures["project"]["breakdown_s"].get(phase, {})
        for key in keys:
            print(f"  {key:32s}" + "".join(f"{figures[label]['breakdown_s'].get(phase, {}).get(key, float('nan')) * 1e3:>12.1f}"
                                          for label in profiled))


def print_summary_lines(figures: dict) -> None:
    """The result lines, `speedup:` last."""
    if "group_by_length_tokens_per_s" in figures:
        epoch = figures["data"]["epoch_padding_fraction"]
        print(f"padding_fraction: {figures['project']['padding_fraction']:.3f} -> "
              f"{figures['project_grouped']['padding_fraction']:.3f} (timed batches; whole epoch: "
              f"{epoch['ungrouped']:.3f} -> {epoch['grouped']:.3f})")
        print(f"group_by_length_tokens_per_s: {figures['group_by_length_tokens_per_s']:.2f}")
    if "single_rank_fast_path_speedup" in figures:
        print(f"single_rank_fast_path_speedup: {figures['single_rank_fast_path_speedup']:.2f}")
    print(f"overhead_vs_floor_generator: {figures['overhead_vs_floor_generator']:.2f}")
    print(f"overhead_vs_floor: {figures['overhead_vs_floor']:.2f}")
    print(f"speedup: {figures['speedup']:.2f}")


def plot_sweep(kind: str, points: list[dict], path) -> None:
    plt = pyplot()
    if plt is None:
        return
    values = [str(p["value"]) for p in points]
    fig, (ax, steps) = plt.subplots(1, 2, figsize=(11, 4))
    for side, style in (("project", "-"), ("reference", "-"), ("floor", ":")):
        ax.plot(values, [p["figures"][side]["samples_per_s"] for p in points], marker="o", linestyle=style, label=side)
    xlabel = {"seq": "sequence length", "batch": "batch size", "teacher": "teacher size"}[kind]
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples/s (MATE-KD cycle)")
    ax.set_yscale("log")
    twin = ax.twinx()
    twin.plot(values, [p["figures"]["speedup"] for p in points], color="gray", linestyle="--", label="speedup")
    twin.set_ylabel("speedup (project / reference)")
    twin.set_ylim(bottom=0)
    ax.legend(loc="upper left")
    for side, style in (("project", "-"), ("reference", "-"), ("floor", ":")):
        for phase, marker in (("student", "o"), ("generator", "s")):
            steps.plot(values, [p["figures"][side][f"{phase}_step_s_median"] * 1e3 for p in points], marker=marker,
                       linestyle=style, label=f"{side} {phase} step")
    steps.set_xlabel(xlabel)
    steps.set_ylabel("median step time, ms")
    steps.set_yscale("log")
    steps.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"[bench] plot: {path}")


# ---------------------------------------------------------------------------------------------
# Main


SWEEP_KEYS = {"seq": "train.seq_len", "batch": "train.micro_batch_size"}


def sweep_configs(config: dict, kind: str) -> list[tuple[Any, dict]]:
    values = config["sweeps"][kind]
    if kind == "teacher":
        return [(v, with_teacher(config, v)) for v in values]
    return [(v, apply_overrides(config, [f"{SWEEP_KEYS[kind]}={v}"])) for v in values]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--data", type=Path, help="real text: a GLUE task folder or a CSV/TSV/JSONL file")
    parser.add_argument("--repeats", type=int, help="timed repeats per series (default: the preset's)")
    parser.add_argument("--cycles", type=int, help="cycles per repeat (default 1; 3 with --data)")
    parser.add_argument("--sweep", choices=["seq", "batch", "teacher"])
    parser.add_argument("--ablate-fast-path", action="store_true",
                        help="also time the project without the single-rank fast path")
    parser.add_argument("--no-save", action="store_true", help="print only; write no JSON or plot")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.data and args.sweep:
        parser.error("--sweep runs on synthetic batches; drop --data")
    if args.data and not args.data.exists():
        parser.error(f"--data {args.data}: no such file or folder")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet_libraries()
    config = apply_overrides(PRESETS[args.preset], args.overrides)
    if args.repeats is not None:
        config["bench"]["repeats"] = args.repeats
    config["bench"]["cycles"] = args.cycles or (3 if args.data else config["bench"]["cycles"])
    if config["bench"]["threads"]:
        torch.set_num_threads(config["bench"]["threads"])
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if config["train"]["dtype"] != "fp32" and device.type != "cuda":
        raise SystemExit(f"preset {args.preset} runs in {config['train']['dtype']}: it needs a GPU")
    stamp = today()
    meta = provenance(device, preset=args.preset)
    if args.sweep:
        points = []
        for value, point_config in sweep_configs(config, args.sweep):
            print(f"[bench] sweep {args.sweep}={value}: {describe(point_config, device)}", flush=True)
            figures = measure(point_config, device, ablate_fast_path=args.ablate_fast_path)
            print_figures(figures)
            points.append({"value": value, "config": point_config, "figures": figures})
        speedup = math.exp(statistics.mean(math.log(p["figures"]["speedup"]) for p in points))
        if not args.no_save:
            name = f"train_sweep-{args.sweep}_{args.preset}_{device_slug(device)}_{stamp}"
            path = save_json(name, {**meta, "sweep": args.sweep, "points": points, "speedup_geomean": speedup})
            plot_sweep(args.sweep, points, path.with_suffix(".png"))
        for key in ("overhead_vs_floor", "speedup"):
            print(f"{key} per {args.sweep}: " + ", ".join(f"{p['value']}: {p['figures'][key]:.2f}" for p in points))
        print(f"speedup: {speedup:.2f}")
        return
    print(f"[bench] {args.preset}: {describe(config, device, args.data)}", flush=True)
    try:
        figures = measure(config, device, args.data, args.ablate_fast_path)
    except MatekdError as err:  # unreadable --data: one line, as the CLI says it
        raise SystemExit(f"bench_train: error: {err}") from None
    print_figures(figures)
    if not args.no_save:
        kind = f"data-{args.data.stem.lower()}_" if args.data else ""
        save_json(f"train_{kind}{args.preset}_{device_slug(device)}_{stamp}", {**meta, "config": config, "figures": figures})
    print_summary_lines(figures)


if __name__ == "__main__":
    main()
