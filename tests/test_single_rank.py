"""The single-rank fast path (engines.build_engine at world size 1) makes the updates DeepSpeed's
own path makes: ZeRO-0 without its gradient all-reduce, ZeRO-1/2 in fp32 built as ZeRO-0, in bf16
as DeepSpeed's BF16_Optimizer. Checked with gradient accumulation, active clipping and a trained
parameter that gets no gradient. It
replaces private members of DeepSpeed's engine, so it runs only on the DeepSpeed releases it was
verified against, and a test here fails loudly when those members stop being what it replaces."""

import copy
from functools import partial

import deepspeed
import helpers
import pytest
import test_isolation as isolation
import torch
import torch.nn.functional as F
from helpers import tiny_batch, tiny_models, tiny_tokenizer

from matekd_ds import distributed, engines
from matekd_ds.ds_config import finalize_ds_config, read_ds_config
from matekd_ds.engines import EngineSpec, build_engine, single_rank_bf16_optimizer, single_rank_ds_config

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
    engine = build_engine(model, EngineSpec("student", config, 1e-3, 0.01, 100, single_rank_fast_path=fast))
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


needs_fast_path = pytest.mark.skipif(not engines.fast_path_supported(),
                                     reason=f"DeepSpeed {deepspeed.__version__} is outside the fast path's verified "
                                            f"range {engines.FAST_PATH_DEEPSPEED}: every engine takes DeepSpeed's path")


@needs_fast_path
@pytest.mark.parametrize("stage,dtype", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (0, "bf16"), (1, "bf16"),
                                         (2, "bf16")])
def test_fast_path_updates_like_deepspeeds_path(stage, dtype, tokenizer_and_examples):
    tokenizer, examples = tokenizer_and_examples
    batches = [tiny_batch(tokenizer, examples[i * MICRO:], MICRO) for i in range(STEPS * ACCUMULATION)]
    model = student_with_unused_weight(tokenizer)
    assert first_step_gradient_norm(model, batches) > 10 * CLIP  # so every step clips
    normal, expected = train(copy.deepcopy(model), stage, dtype, False, batches)
    fast, got = train(copy.deepcopy(model), stage, dtype, True, batches)

    assert normal.zero_optimization_stage() == stage
    if dtype == "bf16" and stage > 0:  # one flat fused update instead of ZeRO's per-tensor checks
        assert type(fast.optimizer).__name__ == "BF16_Optimizer"
    else:
        assert fast.zero_optimization_stage() == 0
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
        if stage == 0 or dtype == "bf16":  # the same update on the same gradients: bit for bit
            assert torch.equal(got[name], value), name
        else:  # ZeRO's flat partition vs per-tensor AdamW: the clip coefficient's last bits
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("stage", [1, 2])
def test_which_engine_a_single_rank_config_becomes(stage, tmp_path):
    def finalized(spec: str, dtype: str) -> dict:
        return finalize_ds_config(read_ds_config(spec), micro_batch=MICRO, grad_accum=1, world_size=1, clip=CLIP,
                                  dtype=dtype, zero_stage=None)

    for spec, dtype in ((f"zero{stage}+fp16", "fp16"), (f"zero{stage}+offload", "fp32"),
                        (f"zero{stage}+bf16+offload", "bf16")):  # fp16's loss scaling, offload: kept
        config = finalized(spec, dtype)
        assert single_rank_ds_config(config) is config and not single_rank_bf16_optimizer(config)
    assert single_rank_ds_config(finalized(f"zero{stage}", "fp32"))["zero_optimization"] == {"stage": 0}
    bf16 = single_rank_ds_config(finalized(f"zero{stage}+bf16", "bf16"))
    assert bf16["zero_optimization"] == {"stage": 1} and bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    assert single_rank_bf16_optimizer(finalized(f"zero{stage}+bf16", "bf16"))
    asked = tmp_path / "bf16-grads.json"  # bf16 gradient accumulation asked for: DeepSpeed's ZeRO
    asked.write_text('{"data_types": {"grad_accum_dtype": "bf16"}}')
    config = finalized(f"zero{stage}+bf16+{asked}", "bf16")
    assert single_rank_ds_config(config) is config


@pytest.mark.parametrize("stage", [1, 2])
def test_isolation_on_deepspeeds_own_zero_path(stage, tokenizer_and_examples, monkeypatch):
    """tests/test_isolation.py at ZeRO-1/2 runs the fast path (ZeRO-0) at world size 1; the same
    checks here run DeepSpeed's ZeRO-1/2 optimizers, which multi-rank runs use."""
    plain = partial(helpers.tiny_matekd, overrides=("deepspeed.single_rank_fast_path=false",))
    monkeypatch.setattr(isolation, "tiny_matekd", plain)
    assert plain(stage).student.zero_optimization_stage() == stage
    isolation.test_generator_step_leaves_student_untouched(stage, tokenizer_and_examples)
    isolation.test_student_step_leaves_generator_untouched(stage, tokenizer_and_examples)



def test_deepspeed_still_calls_what_the_fast_path_replaces(tokenizer_and_examples):
    """On the installed DeepSpeed, a plain fp32 ZeRO-0 engine calls allreduce_gradients once per
    backward at an accumulation boundary and clip_fp32_gradients once per step, and keeps the
    norm in _global_grad_norm: the members the fast path replaces. If this fails, DeepSpeed's
    internals changed: re-verify the fast path and move engines.FAST_PATH_DEEPSPEED."""
    if not engines.fast_path_supported():
        pytest.skip(f"DeepSpeed {deepspeed.__version__} is outside {engines.FAST_PATH_DEEPSPEED}; nothing is replaced")
    tokenizer, examples = tokenizer_and_examples
    distributed.init()
    config = finalize_ds_config(read_ds_config("zero0"), micro_batch=MICRO, grad_accum=1, world_size=1, clip=CLIP,
                                dtype="fp32", zero_stage=None)
    engine = build_engine(tiny_models(tokenizer)["student"], EngineSpec("student", config, 1e-3, 0.01, 100,
                                                                       single_rank_fast_path=False))
    calls = {"allreduce_gradients": 0, "clip_fp32_gradients": 0}
    for name in calls:
        original = getattr(engine, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(engine, name, counted)
    for step in range(2):
        engine.backward(loss(engine, tiny_batch(tokenizer, examples[step * MICRO:], MICRO)))
        engine.step()
    assert calls == {"allreduce_gradients": 2, "clip_fp32_gradients": 2}, calls
    assert "_global_grad_norm" in vars(engine)


def test_outside_the_verified_deepspeed_range_engines_take_deepspeeds_path(tokenizer_and_examples, monkeypatch):
    tokenizer, _ = tokenizer_and_examples
    distributed.init()
    first, beyond = engines.FAST_PATH_DEEPSPEED
    monkeypatch.setattr(deepspeed, "__version__", f"{beyond[0]}.{beyond[1]}.0")
    assert not engines.fast_path_supported()
    config = finalize_ds_config(read_ds_config("zero2"), micro_batch=MICRO, grad_accum=1, world_size=1, clip=CLIP,
                                dtype="fp32", zero_stage=None)
    engine = build_engine(tiny_models(tokenizer)["student"], EngineSpec("student", config, 1e-3, 0.01, 100))
    assert engine.zero_optimization_stage() == 2 and "allreduce_gradients" not in vars(engine)
    monkeypatch.setattr(deepspeed, "__version__", f"{first[0]}.{first[1]}.3")
    assert engines.fast_path_supported()
    assert engines.deepspeed_release("0.19.8+cpu") == (0, 19) and engines.deepspeed_release("1.2rc1") == (1, 2)
