#!/usr/bin/env python
"""Throughput of the project's MATE-KD training step against the eager reference of the official
formulation (benchmarks/reference_matekd.py), on identical models and batches.

    python benchmarks/bench_train.py --preset cpu-tiny|cpu-small|gpu-base|gpu-large
        [--repeats N] [--cycles N] [--sweep seq|batch|teacher] [--no-save] [KEY=VALUE ...]

KEY=VALUE overrides the preset, e.g. train.micro_batch_size=8 train.seq_len=128
matekd.student_steps=20 models.teacher.layers=4 train.zero_stage=2 (see PRESETS for the keys).

What is measured
* The project: matekd_ds MateKD with DeepSpeed engines (ZeRO stage and precision per preset),
  in-process on one rank (matekd_ds.distributed.init() makes a world of one), driven through
  MateKD.train_step exactly as the trainer drives it.
* The reference: ReferenceMateKD, plain eager PyTorch + torch.optim.AdamW (autocast for bf16).
* Both start from the same random weights (built from configs; nothing is downloaded), see
  the same batches in the same order and run full cycles of n_G generator : n_S student steps
  (1:10 by default, the official 10:100 ratio shortened). Repeats are interleaved
  (project, reference, project, reference, ...) and medians are reported; the warm-up steps
  (one generator and one student step per side) are excluded.
* samples/s and tokens/s (real, non-pad tokens) over whole cycles; median step times per phase.
* Breakdown: a separate profiled pass (after the timed repeats, interleaved as well) times
  every model's forward and backward with hooks:
    - forward of a model: forward pre-hook -> forward hook (for the generator: encoder pre-hook
      -> MLM-head hook, because the project calls its encoder and head separately);
    - backward of a model: a tensor hook on its output (fires when the backward reaches the
      model) -> a tensor hook on its embeddings' output (fires when it leaves the encoder);
    - "backward" and "optimizer" sections: the project's engine.backward / engine.step (wrapped
      on the instances), the reference's loss.backward() / clip + AdamW.step;
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

The last line printed is exactly `speedup: X.XX` (project samples/s / reference samples/s; for a
sweep, the geometric mean over its points). JSON (and a plot for sweeps) goes to
benchmarks/results/ unless --no-save.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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
        "models": {"family": family, "vocab_size": vocab, "num_labels": 2,
                   "teacher": dict(sizes[teacher]), "student": dict(sizes["distil"]),
                   "generator": dict(sizes["distil"]), "teacher_sizes": sizes},
        "train": {"micro_batch_size": batch, "seq_len": seq, "dtype": dtype, "zero_stage": 0,
                  "ds_config": "zero0", "lr": 2e-5, "weight_decay": 0.01, "clip": 5.0},
        "matekd": {"generator_lr": 5e-7, "generator_clip": 5.0, "generator_steps": 1, "student_steps": 10,
                   "mask_prob": 0.3, "tau": 1.0, "temperature": 1.0},
        # The project's train.cache_teacher_logits (its default: on): the frozen teacher's clean
        # logits come from a table built once, before timing, as the pipeline does per run.
        "project": {"cache_teacher_logits": True},
        "data": {"mean_length_fraction": 0.45, "length_sigma": 0.5, "min_length": 8, "pad_to_longest": False},
        # threads: torch intra-op threads, 0 = torch's default (on a shared CPU, 1 avoids the
        # OpenMP stalls of a thread descheduled by other processes; both sides use the same).
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

# Token ids of the special tokens: bert-base-uncased's and roberta-base's vocabularies.
SPECIAL_IDS = {"bert": {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103},
               "roberta": {"pad": 1, "unk": 3, "cls": 0, "sep": 2, "mask": 50264}}


# ---------------------------------------------------------------------------------------------
# Configuration


def with_teacher(config: dict, size: str) -> dict:
    config = copy.deepcopy(config)
    config["models"]["teacher"] = dict(config["models"]["teacher_sizes"][size])
    return config


# ---------------------------------------------------------------------------------------------
# Models and batches


def model_config(family: str, vocab: int, shape: dict, num_labels: int):
    from transformers import BertConfig, RobertaConfig

    common = dict(vocab_size=vocab, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                  num_attention_heads=shape["heads"], intermediate_size=shape["ffn"], num_labels=num_labels)
    if family == "roberta":
        return RobertaConfig(max_position_embeddings=514, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                             type_vocab_size=1, layer_norm_eps=1e-5, **common)
    return BertConfig(max_position_embeddings=512, pad_token_id=0, **common)


def build_models(config: dict) -> dict[str, nn.Module]:
    """Random-weight teacher and student (sequence classifiers) and generator (masked LM)."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    m = config["models"]
    torch.manual_seed(config["bench"]["seed"])
    classifier = lambda role: AutoModelForSequenceClassification.from_config(  # noqa: E731
        model_config(m["family"], m["vocab_size"], m[role], m["num_labels"]))
    generator = AutoModelForMaskedLM.from_config(model_config(m["family"], m["vocab_size"], m["generator"], 1))
    return {"teacher": classifier("teacher"), "student": classifier("student"), "generator": generator}


def synthetic_batches(config: dict, count: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Random non-special ids, [CLS] ... [SEP] then padding; lengths log-normal around
    mean_length_fraction x seq_len (GLUE-like: most rows much shorter than the maximum)."""
    d, special = config["data"], SPECIAL_IDS[config["models"]["family"]]
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


# ---------------------------------------------------------------------------------------------
# The two sides


@dataclass
class Side:
    name: str
    method: Any  # MateKD or ReferenceMateKD
    models: dict[str, nn.Module]  # teacher, student, generator as this side runs them
    step: Any  # (batch, step, seed) -> losses

    def phase(self, step: int) -> str:
        return self.method.phase(step)


def ds_engine_config(config: dict, clip: float) -> dict:
    from matekd_ds.ds_config import finalize_ds_config, read_ds_config

    t = config["train"]
    return finalize_ds_config(read_ds_config(t["ds_config"]), micro_batch=t["micro_batch_size"], grad_accum=1,
                              world_size=1, clip=clip, dtype=t["dtype"], zero_stage=t["zero_stage"])


def project_teacher(teacher: nn.Module, batches, cache: bool):
    """The project's Teacher; with `cache`, its table of clean logits for these batches."""
    from matekd_ds.teacher import Teacher

    if not cache:
        return Teacher(teacher)
    count = sum(len(b["index"]) for b in batches)
    table = None
    with torch.no_grad():
        for batch in batches:
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            if table is None:
                table = torch.zeros(count, logits.shape[-1], device=logits.device)
            table[batch["index"]] = logits
    return Teacher(teacher, clean_table=table)


def build_project(config: dict, models: dict[str, nn.Module], device: torch.device, batches) -> Side:
    from matekd_ds.engines import EngineSpec, build_engine, place_frozen_teacher
    from matekd_ds.methods import MateKD
    from matekd_ds.perturb import Perturber

    t, mk = config["train"], config["matekd"]
    never = 10**9  # the linear schedule's horizon: the learning rate stays ~constant, as in the reference
    student = build_engine(models["student"], EngineSpec("student", ds_engine_config(config, t["clip"]),
                                                         t["lr"], t["weight_decay"], never))
    generator = build_engine(models["generator"], EngineSpec("generator", ds_engine_config(config, mk["generator_clip"]),
                                                             mk["generator_lr"], 0.0, never, schedule="constant"))
    teacher = place_frozen_teacher(models["teacher"], t["dtype"], device)
    special = SPECIAL_IDS[config["models"]["family"]]
    perturber = Perturber(sorted(set(special.values())), special["mask"], mk["mask_prob"], mk["tau"])
    method = MateKD(student, generator, project_teacher(teacher, batches, config["project"]["cache_teacher_logits"]),
                    perturber, regression=False, temperature=mk["temperature"],
                    loss_weights=[1 / 3, 1 / 3, 1 / 3], generator_steps=mk["generator_steps"],
                    student_steps=mk["student_steps"])
    step = lambda batch, i, seed: method.train_step([batch], i, [seed])  # noqa: E731
    return Side("project", method, {"teacher": teacher, "student": student.module, "generator": generator.module}, step)


def build_reference(config: dict, models: dict[str, nn.Module], device: torch.device) -> Side:
    t, mk = config["train"], config["matekd"]
    models = {role: m.to(device) for role, m in models.items()}
    models["teacher"].eval()
    special = SPECIAL_IDS[config["models"]["family"]]
    method = ReferenceMateKD(
        models["teacher"], models["student"], models["generator"], mask_token_id=special["mask"],
        special_ids=special.values(), mask_prob=mk["mask_prob"], tau=mk["tau"], temperature=mk["temperature"],
        student_lr=t["lr"], generator_lr=mk["generator_lr"], weight_decay=t["weight_decay"], clip=t["clip"],
        generator_clip=mk["generator_clip"], generator_steps=mk["generator_steps"], student_steps=mk["student_steps"],
        amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(t["dtype"]))
    return Side("reference", method, models, method.train_step)


def build_sides(config: dict, device: torch.device, batches) -> tuple[Side, Side]:
    from matekd_ds import distributed

    distributed.init()
    models = build_models(config)
    for role in ("student", "generator"):
        models[role].train()  # dropout on, as in training, on both sides
    reference_models = copy.deepcopy(models)  # before DeepSpeed may cast the project's to bf16
    return build_project(config, models, device, batches), build_reference(config, reference_models, device)


# ---------------------------------------------------------------------------------------------
# Timing


def step_seed(config: dict, step: int) -> int:
    return config["bench"]["seed"] * 1_000_003 + step * 104_729


def cycle_length(config: dict) -> int:
    return config["matekd"]["generator_steps"] + config["matekd"]["student_steps"]


def warm_up(side: Side, config: dict, batches, sync) -> None:
    """One generator and one student step: allocator, kernels, optimizer state."""
    for step in (0, config["matekd"]["generator_steps"]):
        side.step(batches[step], step, step_seed(config, step))
    sync()


def timed_cycles(side: Side, config: dict, batches, sync) -> dict[str, Any]:
    steps = {"generator": [], "student": []}
    sync()
    start = time.perf_counter()
    for _ in range(config["bench"]["cycles"]):
        for i in range(cycle_length(config)):
            began = time.perf_counter()
            side.step(batches[i], i, step_seed(config, i))
            sync()
            steps[side.phase(i)].append(time.perf_counter() - began)
    return {"seconds": time.perf_counter() - start, "steps": steps}


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
    if side.name == "project":
        for engine in side.method.engines.values():
            for method_name, section in (("backward", "backward"), ("step", "optimizer")):
                handles.append(time_method_as_section(engine, method_name, marks, section))
    else:
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


def profiled_pass(side: Side, config: dict, batches, device: torch.device) -> dict[str, Any]:
    sync = synchronizer(device)
    marks = Marks(sync)
    n_gen = config["matekd"]["generator_steps"]
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
                side.step(batches[i], i, step_seed(config, i))
                sync()
                per_phase[side.phase(i)].append(breakdown(marks, time.perf_counter() - began))
    finally:
        for handle in handles:
            handle.remove()
    medians = {phase: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for phase, rows in per_phase.items() if rows}
    return {"breakdown_s": medians, "peak_memory_extra_bytes": memory.peak_extra}


# ---------------------------------------------------------------------------------------------
# FLOPs


def encoder_flops_per_token(shape: dict, seq: int) -> float:
    """Forward matmul FLOPs per token of one encoder: 2 x (QKVO 4H^2 + FFN 2HF) per layer, plus
    the attention scores and the weighted sum, 2 x 2 x seq x H per layer."""
    h, f, layers = shape["hidden"], shape["ffn"], shape["layers"]
    return layers * (2 * (4 * h * h + 2 * h * f) + 4 * seq * h)


def cycle_flops(config: dict, masked_rows: float) -> float:
    """Model FLOPs of one cycle of the algorithm, the SAME count for both sides (the reference
    executes more: the full-vocabulary head and the one-hot products on every position):
      trained model fwd+bwd = 3 x forward; frozen model with input gradients = 2 x forward;
      forward only = 1 x forward; T = batch x seq (padding is computed too), M = masked rows.
      generator step: generator 3F_g T + its MLM head 3 x 2(H^2 + HV) M,
                      student 2F_s T, teacher 2F_t T, the soft embeddings y @ E fwd+bwd 2 x 2MVH
                      for student and teacher;
      student step:   generator F_g T + head 2(H^2 + HV) M, teacher 2T x F_t (clean + perturbed),
                      student 3 x 2T x F_s."""
    m, t = config["models"], config["train"]
    seq, vocab = t["seq_len"], m["vocab_size"]
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


def measure(config: dict, device: torch.device) -> dict[str, Any]:
    sync = synchronizer(device)
    batches = synthetic_batches(config, cycle_length(config), device)
    project, reference = build_sides(config, device, batches)
    sides = (project, reference)
    for side in sides:
        warm_up(side, config, batches, sync)
    runs = {side.name: [] for side in sides}
    for _ in range(config["bench"]["repeats"]):
        for side in sides:  # interleaved: project, reference, project, reference, ...
            runs[side.name].append(timed_cycles(side, config, batches, sync))
    profiles = {side.name: profiled_pass(side, config, batches, device) for side in sides}
    figures = {side.name: summarise(runs[side.name], profiles[side.name], config, batches, device) for side in sides}
    figures["speedup"] = figures["project"]["samples_per_s"] / figures["reference"]["samples_per_s"]
    del project, reference, sides
    release_memory(device)
    return figures


def summarise(runs: list[dict], profile: dict, config: dict, batches, device: torch.device) -> dict[str, Any]:
    cycles = config["bench"]["cycles"]
    seconds = statistics.median(r["seconds"] for r in runs)
    samples = cycles * sum(len(b["input_ids"]) for b in batches)
    tokens = cycles * sum(int(b["attention_mask"].sum()) for b in batches)
    masked = config["matekd"]["mask_prob"] * statistics.mean(
        int(b["attention_mask"].sum()) - 2 * len(b["input_ids"]) for b in batches)
    out = {
        "cycle_seconds_median": seconds / cycles,
        "cycle_seconds_all": [r["seconds"] / cycles for r in runs],
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "generator_step_s_median": statistics.median(s for r in runs for s in r["steps"]["generator"]),
        "student_step_s_median": statistics.median(s for r in runs for s in r["steps"]["student"]),
        "breakdown_s": profile["breakdown_s"],
        "peak_memory_extra_bytes": profile["peak_memory_extra_bytes"],
        "peak_memory_kind": "cuda max_memory_allocated above start" if device.type == "cuda" else "RSS above start (sampled)",
        "model_flops_per_cycle": cycle_flops(config, masked),
    }
    peak = peak_flops(device, config["train"]["dtype"])
    out["mfu"] = out["model_flops_per_cycle"] / (seconds / cycles) / peak if peak else None
    return out


# ---------------------------------------------------------------------------------------------
# Reporting


def describe(config: dict, device: torch.device) -> str:
    m, t, mk = config["models"], config["train"], config["matekd"]
    shape = lambda s: f"{s['layers']}L/H{s['hidden']}/A{s['heads']}/F{s['ffn']}"  # noqa: E731
    return (f"{m['family']} V={m['vocab_size']}: teacher {shape(m['teacher'])}, student {shape(m['student'])}, "
            f"generator {shape(m['generator'])}; batch {t['micro_batch_size']} x seq {t['seq_len']}, {t['dtype']}, "
            f"DeepSpeed {t['ds_config']} ZeRO-{t['zero_stage']}, teacher clean-logit table "
            f"{'on' if config['project']['cache_teacher_logits'] else 'off'}; cycle {mk['generator_steps']}:{mk['student_steps']}, "
            f"{config['bench']['repeats']} repeats x {config['bench']['cycles']} cycle(s) on {device_name(device)}")


def print_figures(figures: dict) -> None:
    p, r = figures["project"], figures["reference"]
    rows = [("samples/s", "samples_per_s", 1, "{:.1f}"), ("tokens/s", "tokens_per_s", 1, "{:.0f}"),
            ("generator step ms", "generator_step_s_median", 1e3, "{:.1f}"),
            ("student step ms", "student_step_s_median", 1e3, "{:.1f}"),
            ("peak memory extra MiB", "peak_memory_extra_bytes", 1 / 2**20, "{:.0f}")]
    print(f"{'':34s}{'project':>12s}{'reference':>12s}")
    for label, key, scale, fmt in rows:
        print(f"{label:34s}{fmt.format(p[key] * scale):>12s}{fmt.format(r[key] * scale):>12s}")
    if p["mfu"] is not None:
        print(f"{'MFU':34s}{p['mfu']:>12.1%}{r['mfu']:>12.1%}")
    for phase in ("generator", "student"):
        print(f"breakdown of one {phase} step, ms (profiled pass)")
        pb, rb = p["breakdown_s"].get(phase, {}), r["breakdown_s"].get(phase, {})
        for key in pb:
            print(f"  {key:32s}{pb[key] * 1e3:>12.1f}{rb.get(key, float('nan')) * 1e3:>12.1f}")


def plot_sweep(kind: str, points: list[dict], path) -> None:
    plt = pyplot()
    if plt is None:
        return
    values = [str(p["value"]) for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    for side in ("project", "reference"):
        ax.plot(values, [p["figures"][side]["samples_per_s"] for p in points], marker="o", label=side)
    ax.set_xlabel({"seq": "sequence length", "batch": "batch size", "teacher": "teacher size"}[kind])
    ax.set_ylabel("samples/s")
    ax.set_yscale("log")
    twin = ax.twinx()
    twin.plot(values, [p["figures"]["speedup"] for p in points], color="gray", linestyle="--", label="speedup")
    twin.set_ylabel("speedup (project / reference)")
    ax.legend(loc="upper left")
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
    parser.add_argument("--repeats", type=int, help="timed repeats per side (default: the preset's)")
    parser.add_argument("--cycles", type=int, help="cycles per repeat (default 1)")
    parser.add_argument("--sweep", choices=["seq", "batch", "teacher"])
    parser.add_argument("--no-save", action="store_true", help="print only; write no JSON or plot")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet_libraries()
    config = apply_overrides(PRESETS[args.preset], args.overrides)
    if args.repeats is not None:
        config["bench"]["repeats"] = args.repeats
    if args.cycles is not None:
        config["bench"]["cycles"] = args.cycles
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
            figures = measure(point_config, device)
            print_figures(figures)
            points.append({"value": value, "config": point_config, "figures": figures})
        speedup = math.exp(statistics.mean(math.log(p["figures"]["speedup"]) for p in points))
        if not args.no_save:
            name = f"train_sweep-{args.sweep}_{args.preset}_{device_slug(device)}_{stamp}"
            path = save_json(name, {**meta, "sweep": args.sweep, "points": points, "speedup_geomean": speedup})
            plot_sweep(args.sweep, points, path.with_suffix(".png"))
        print(f"speedups per {args.sweep}: " + ", ".join(f"{p['value']}: {p['figures']['speedup']:.2f}" for p in points))
        print(f"speedup: {speedup:.2f}")
        return
    print(f"[bench] {args.preset}: {describe(config, device)}", flush=True)
    figures = measure(config, device)
    print_figures(figures)
    if not args.no_save:
        save_json(f"train_{args.preset}_{device_slug(device)}_{stamp}", {**meta, "config": config, "figures": figures})
    print(f"speedup: {figures['speedup']:.2f}")


if __name__ == "__main__":
    main()
