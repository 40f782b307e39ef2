"""The single-rank fast path (engines.build_engine at world size 1) makes the updates DeepSpeed's
own path makes: ZeRO-0 without its gradient all-reduce, ZeRO-1/2 in fp32 built as ZeRO-0. Checked
with gradient accumulation, active clipping and a trained parameter that gets no gradient."""

import copy
from functools import partial

import helpers
import pytest
import test_isolation as isolation
import torch
import torch.nn.functional as F
from helpers import tiny_batch, tiny_models, tiny_tokenizer

from matekd_ds import distributed
from matekd_ds.ds_config import finalize_ds_config, read_ds_config
from matekd_ds.engines import EngineSpec, build_engine, single_rank_ds_config

CLIP, ACCUMULATION, STEPS, MICRO = 0.05, 2, 3, 6


@pytest.fixture(scope="module")
def tokenizer_and_examples():
    return tiny_tokenizer()


def student_with_unused_weight(tokenizer) -> torch.nn.Module:
    """The tiny student plus a 2-D weight no forward uses: DeepSpeed's reduction gives it a zero
    gradient, so AdamW's weight decay still shrinks it; the fast path must do the same."""
    model = tiny_models(tokenizer)["student"]
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(2, 2)))
    return model


def train(model, stage: int, dtype: str, fast: bool, batches) -> tuple:
    distributed.init()
    config = finalize_ds_config(read_ds_config(f"zero{stage}"), micro_batch=MICRO, grad_accum=ACCUMULATION,
                                world_size=1, clip=CLIP, dtype=dtype, zero_stage=None)
    engine = build_engine(model, EngineSpec("student", config, 1e-3, 0.01, 100), single_rank_fast_path=fast)
    torch.manual_seed(0)  # the same dropout masks on both paths
    for batch in batches:
        engine.backward(loss(engine, batch))
        engine.step()
    return engine, {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"])


def first_step_gradient_norm(model, batches) -> float:
    model = copy.deepcopy(model).eval()
    (sum(loss(model, b) for b in batches[:ACCUMULATION]) / ACCUMULATION).backward()
    return torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm().item()


@pytest.mark.parametrize("stage,dtype", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (0, "bf16")])
def test_fast_path_updates_like_deepspeeds_path(stage, dtype, tokenizer_and_examples):
    tokenizer, examples = tokenizer_and_examples
    batches = [tiny_batch(tokenizer, examples[i * MICRO:], MICRO) for i in range(STEPS * ACCUMULATION)]
    model = student_with_unused_weight(tokenizer)
    assert first_step_gradient_norm(model, batches) > 10 * CLIP  # so every step clips
    normal, expected = train(copy.deepcopy(model), stage, dtype, False, batches)
    fast, got = train(copy.deepcopy(model), stage, dtype, True, batches)

    assert normal.zero_optimization_stage() == stage and fast.zero_optimization_stage() == 0
    assert fast.global_steps == normal.global_steps == STEPS
    assert fast.lr_scheduler.state_dict() == normal.lr_scheduler.state_dict()
    # the gradient norm the trainer's health check reads: ZeRO-1/2 report it, and so does the fast path
    norm = fast.get_global_grad_norm()
    assert norm is not None and float(norm) > CLIP
    if stage > 0:
        torch.testing.assert_close(float(norm), float(normal.get_global_grad_norm()), rtol=1e-5, atol=0)
    if dtype == "fp32":  # (bf16 cannot hold 1 - 3e-5)
        assert not torch.equal(expected["unused"], torch.ones(2, 2)), "weight decay never reached the unused weight"
    for name, value in expected.items():
        if stage == 0:  # the same optimizer on the same gradients: bit for bit
            assert torch.equal(got[name], value), name
        else:  # ZeRO's flat partition vs per-tensor AdamW: the clip coefficient's last bits
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("stage", [1, 2])
def test_half_precision_and_offload_keep_their_zero_stage(stage):
    for preset in ("bf16", "offload"):
        config = finalize_ds_config(read_ds_config(f"zero{stage}+{preset}"), micro_batch=MICRO, grad_accum=1,
                                    world_size=1, clip=CLIP, dtype="bf16" if preset == "bf16" else "fp32",
                                    zero_stage=None)
        assert single_rank_ds_config(config) is config
    fp32 = finalize_ds_config(read_ds_config(f"zero{stage}"), micro_batch=MICRO, grad_accum=1, world_size=1,
                              clip=CLIP, dtype="fp32", zero_stage=None)
    assert single_rank_ds_config(fp32)["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("stage", [1, 2])
def test_isolation_on_deepspeeds_own_zero_path(stage, tokenizer_and_examples, monkeypatch):
    """tests/test_isolation.py at ZeRO-1/2 runs the fast path (ZeRO-0) at world size 1; the same
    checks here run DeepSpeed's ZeRO-1/2 optimizers, which multi-rank runs use."""
    monkeypatch.setattr(helpers, "build_engine", partial(build_engine, single_rank_fast_path=False))
    tokenizer, _ = tokenizer_and_examples
    assert helpers.tiny_matekd(stage, tokenizer).student.zero_optimization_stage() == stage
    isolation.test_generator_step_leaves_student_untouched(stage, tokenizer_and_examples)
    isolation.test_student_step_leaves_generator_untouched(stage, tokenizer_and_examples)

