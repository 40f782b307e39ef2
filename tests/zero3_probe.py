"""Run on several ranks by tests/test_zero3.py (`deepspeed --num_gpus 2 tests/zero3_probe.py OUT.json`):
the ZeRO-3 checks that only mean something with more than one rank. Rank 0 writes the numbers
as JSON; the test asserts on them.

1. The teacher as a ZeRO-3 inference engine (teacher-inference, and teacher-inference+offload):
   parameter bytes each rank holds against the whole model; logits against the same model
   whole on every rank; the gradient with respect to the soft one-hot y of the generator step
   (y @ E with E partitioned) against the whole model's.
2. MATE-KD with student and generator at ZeRO-3 and bf16 (the generator's optimizer states and
   parameters offloaded to CPU; teacher at ZeRO-3 too): the generator
   step leaves the student engine bit-identical and the student step the generator engine; and
   between steps each rank still holds about half of each model (nothing left gathered).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from helpers import (
    assert_same,
    param_tensors,
    snapshot_engine,
    teacher_ds_config,
    tiny_batch,
    tiny_matekd,
    tiny_models,
    tiny_tokenizer,
)

from matekd_ds import distributed
from matekd_ds.engines import build_teacher_engine
from matekd_ds.partition import param_bytes, release_backward_leftovers
from matekd_ds.perturb import Perturber, soft_embeddings


def soft_input_gradient(model, batch, mask, y0):
    """Logits of model(x ⊕ y·E) and d(sum of squared logits)/dy."""
    y = y0.clone().requires_grad_(True)
    with soft_embeddings(model, mask, y):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    (logits.float() ** 2).sum().backward()
    return logits.detach(), y.grad


def teacher_checks(tokenizer, examples, preset: str) -> dict:
    teacher = tiny_models(tokenizer)["teacher"]  # same seed, same weights on every rank
    whole = copy.deepcopy(teacher).eval().requires_grad_(False)
    engine = build_teacher_engine(teacher, teacher_ds_config(preset=preset))
    module = engine.module
    batch = tiny_batch(tokenizer, examples)
    perturber = Perturber(tokenizer.all_special_ids, tokenizer.mask_token_id, 0.3, 1.0)
    mask = perturber.mask_batch(batch, seed=3).mask
    torch.manual_seed(11)
    y0 = torch.softmax(torch.randn(int(mask.sum()), len(tokenizer)), dim=-1)
    logits, grad = soft_input_gradient(module, batch, mask, y0)
    ref_logits, ref_grad = soft_input_gradient(whole, batch, mask, y0)
    embedding = module.get_input_embeddings().weight
    resident_after_backward = embedding.numel()  # gathered for y @ E, still held
    release_backward_leftovers(engine)  # what MateKD.generator_micro_step does
    memory = param_bytes(module)
    return {
        "rank_bytes": distributed.gather_objects(memory["rank_bytes"]),
        "full_bytes": memory["full_bytes"],
        "embedding_partition_numel": distributed.gather_objects(embedding.ds_tensor.numel()),
        "embedding_numel": embedding.ds_numel,
        "embedding_resident_after_backward": resident_after_backward,
        "embedding_resident_after_release": embedding.numel(),  # a placeholder again
        "logits_max_abs_diff": (logits - ref_logits).abs().max().item(),
        "grad_max_abs_diff": (grad - ref_grad).abs().max().item(),
        "grad_max_abs": ref_grad.abs().max().item(),
        "offload": {k: v["device"] for k, v in teacher_ds_config(preset=preset)["zero_optimization"].items()
                    if k.startswith("offload_")},
    }


def isolation_checks(tokenizer, examples) -> dict:
    method = tiny_matekd(3, dtype="bf16", generator_preset="zero3+bf16+offload")
    batch = tiny_batch(tokenizer, examples)
    out = {}
    student_step = method.student_micro_step(batch, seed=1)
    before_student, before_generator = snapshot_engine(method.student), snapshot_engine(method.generator)
    generator_step = method.generator_micro_step(batch, seed=2)
    try:
        assert_same(before_student, snapshot_engine(method.student), "student")
        out["generator_step_leaves_student"] = True
    except AssertionError as err:
        out["generator_step_leaves_student"] = str(err)
    after_generator = snapshot_engine(method.generator)
    out["generator_params_changed"] = sum(not torch.equal(a, before_generator["params"][n])
                                          for n, a in after_generator["params"].items())
    method.student_micro_step(batch, seed=4)
    try:
        assert_same(after_generator, snapshot_engine(method.generator), "generator")
        out["student_step_leaves_generator"] = True
    except AssertionError as err:
        out["student_step_leaves_generator"] = str(err)
    out["student_params_changed"] = sum(not torch.equal(a, before_student["params"][n])
                                        for n, a in param_tensors(method.student.module).items())
    out["losses"] = {k: float(v.detach()) for k, v in {**student_step, **generator_step}.items()}
    for seed in (5, 6, 7):  # a generator step, then forward-only teacher passes of student steps
        (method.generator_micro_step if seed == 5 else method.student_micro_step)(batch, seed=seed)
    out["rank_fraction_between_steps"] = {}
    for role, module in (("teacher", method.teacher.module), ("student", method.student.module),
                         ("generator", method.generator.module)):
        memory = param_bytes(module)
        out["rank_fraction_between_steps"][role] = \
            max(distributed.gather_objects(memory["rank_bytes"])) / memory["full_bytes"]
    out["dtypes"] = sorted({str(p.dtype) for p in method.student.module.parameters()})
    engine = method.generator  # what DeepSpeed itself resolved
    out["generator_offload"] = {"optimizer": str(getattr(engine.zero_offload_optimizer(), "device", None)),
                                "param": str(getattr(engine.zero_offload_param(), "device", None))}
    return out


def main() -> None:
    distributed.init()
    tokenizer, examples = tiny_tokenizer()
    result = {"world_size": distributed.world_size()}
    for preset in ("teacher-inference", "teacher-inference+offload"):
        result[preset] = teacher_checks(tokenizer, examples, preset)
    result["matekd_zero3_bf16"] = isolation_checks(tokenizer, examples)
    if distributed.is_main():
        out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]  # deepspeed adds --local_rank=N
        Path(out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
    distributed.shutdown()
