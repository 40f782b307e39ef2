"""ZeRO-3: the teacher as a partitioned inference engine, the generator step's soft one-hot times a
partitioned word-embedding matrix, and exports gathered from partitions.

In-process tests run as a world of one: ZeRO-3 still partitions there (outside the forward of
its module a parameter is an empty placeholder), so a product with E computed anywhere but where
ZeRO-3 has gathered E fails. test_two_ranks runs tests/zero3_probe.py on 2 CPU ranks, where each
rank holds half of every parameter.

Tolerances (fp32, CPU): logits of the ZeRO-3 teacher equal the whole model's to 1e-6 (measured:
0.0); gradients with respect to the soft one-hot to 1e-5 x their largest magnitude (measured:
7e-13 on a largest of 3e-6, i.e. 2e-7 relative: DeepSpeed's ZeRO-3 linear layers reduce in
another order).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import REPO, run_cli, soft_inputs_embeds, teacher_ds_config, tiny_batch, tiny_models, tiny_tokenizer

from matekd_ds import distributed
from matekd_ds.engines import build_teacher_engine
from matekd_ds.partition import gathered_state_dict, param_bytes, release_backward_leftovers
from matekd_ds.perturb import Perturber, soft_embeddings

GRAD_RTOL = 1e-5
LOGITS_ATOL = 1e-6


@pytest.fixture(scope="module")
def setup():
    tokenizer, examples = tiny_tokenizer()
    batch = tiny_batch(tokenizer, examples)
    mask = Perturber(tokenizer.all_special_ids, tokenizer.mask_token_id, 0.3, 1.0).mask_batch(batch, seed=3).mask
    torch.manual_seed(11)
    y0 = torch.softmax(torch.randn(int(mask.sum()), len(tokenizer)), dim=-1)
    return tokenizer, batch, mask, y0


def _soft_forward(model, batch, mask, y0, via_hook=True):
    y = y0.clone().requires_grad_(True)
    kwargs = {"attention_mask": batch["attention_mask"]}
    if via_hook:
        with soft_embeddings(model, mask, y):
            logits = model(input_ids=batch["input_ids"], **kwargs).logits
    else:
        mb = type("MB", (), {"input_ids": batch["input_ids"], "mask": mask})
        logits = model(inputs_embeds=soft_inputs_embeds(model, mb, y), **kwargs).logits
    (logits ** 2).sum().backward()
    return logits.detach(), y.grad


def test_soft_embeddings_equal_the_inputs_embeds_path_bit_for_bit(setup):
    """The in-forward product is the same computation as y @ E spliced into inputs_embeds."""
    tokenizer, batch, mask, y0 = setup
    model = tiny_models(tokenizer)["teacher"].eval().requires_grad_(False)
    hooked, hooked_grad = _soft_forward(model, batch, mask, y0, via_hook=True)
    spliced, spliced_grad = _soft_forward(model, batch, mask, y0, via_hook=False)
    assert torch.equal(hooked, spliced) and torch.equal(hooked_grad, spliced_grad)
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.equal(plain, hooked), "the soft rows changed nothing"
    assert torch.equal(plain, model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)


def test_zero3_teacher_gathers_the_partitioned_embedding_where_y_meets_it(setup):
    tokenizer, batch, mask, y0 = setup
    distributed.init()
    teacher = tiny_models(tokenizer)["teacher"]
    whole = copy.deepcopy(teacher).eval().requires_grad_(False)
    engine = build_teacher_engine(teacher, teacher_ds_config())
    module = engine.module
    weight = module.get_input_embeddings().weight
    assert weight.numel() == 0 and weight.ds_numel == whole.get_input_embeddings().weight.numel()
    # Control: y @ E outside the embedding's forward meets the empty placeholder.
    with pytest.raises(RuntimeError):
        _soft_forward(module, batch, mask, y0, via_hook=False)

    logits, grad = _soft_forward(module, batch, mask, y0)
    ref_logits, ref_grad = _soft_forward(whole, batch, mask, y0)
    assert (logits - ref_logits).abs().max() <= LOGITS_ATOL
    assert (grad - ref_grad).abs().max() <= GRAD_RTOL * ref_grad.abs().max()
    assert ref_grad.abs().max() > 0
    assert all(p.grad is None for p in module.parameters())
    assert weight.numel() > 0  # still gathered: its module's post-backward hook never fires...
    release_backward_leftovers(engine)
    assert weight.numel() == 0  # ...until released, as the generator step does


def test_gathered_state_dict_and_export_of_a_zero3_module(setup, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from matekd_ds.run_dir import export_model

    tokenizer, _, _, _ = setup
    distributed.init()
    teacher = tiny_models(tokenizer)["teacher"]
    whole = copy.deepcopy(teacher)
    engine = build_teacher_engine(teacher, teacher_ds_config())
    assert param_bytes(engine.module)["partitioned"]
    state = gathered_state_dict(engine.module)
    reference = whole.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    export_model(engine.module, tokenizer, tmp_path / "teacher")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "teacher").state_dict()
    assert all(torch.equal(reloaded[k], reference[k]) for k in reference)


def test_two_ranks(tmp_path):
    """tests/zero3_probe.py on 2 CPU ranks: partitioning, gathers, isolation at ZeRO-3 + bf16."""
    out = tmp_path / "probe.json"
    launcher = REPO / "tests" / "zero3_probe.py"
    result = run_cli([], cwd=tmp_path, ranks=2, script=launcher, script_args=[str(out)])
    assert result.returncode == 0, result.stderr[-4000:]
    probe = json.loads(out.read_text())
    assert probe["world_size"] == 2
    for preset in ("teacher-inference", "teacher-inference+offload"):
        t = probe[preset]
        ratio = max(t["rank_bytes"]) / t["full_bytes"]
        print(f"[zero3 probe] {preset}: teacher parameter bytes per rank / whole = {ratio:.4f}; "
              f"logits diff {t['logits_max_abs_diff']:.2e}; soft-input gradient diff {t['grad_max_abs_diff']:.2e} "
              f"(largest {t['grad_max_abs']:.2e})")
        assert ratio <= 0.55
        assert t["embedding_partition_numel"] == [t["embedding_numel"] // 2] * 2
        assert t["embedding_resident_after_backward"] == t["embedding_numel"]
        assert t["embedding_resident_after_release"] == 0
        assert t["logits_max_abs_diff"] <= LOGITS_ATOL
        assert t["grad_max_abs_diff"] <= GRAD_RTOL * t["grad_max_abs"] and t["grad_max_abs"] > 0
    assert probe["teacher-inference+offload"]["offload"] == {"offload_param": "cpu"}
    iso = probe["matekd_zero3_bf16"]
    assert iso["generator_step_leaves_student"] is True, iso["generator_step_leaves_student"]
    assert iso["student_step_leaves_generator"] is True, iso["student_step_leaves_generator"]
    assert iso["generator_params_changed"] > 0 and iso["student_params_changed"] > 0
    assert iso["dtypes"] == ["torch.bfloat16"]
    assert all("cpu" in device for device in iso["generator_offload"].values()), iso["generator_offload"]
    print(f"[zero3 probe] parameter bytes per rank / whole, between MATE-KD steps: "
          f"{iso['rank_fraction_between_steps']}")
    assert all(f <= 0.55 for f in iso["rank_fraction_between_steps"].values()), iso["rank_fraction_between_steps"]
    assert all(v == v and abs(v) < 1e3 for v in iso["losses"].values())


def test_zero3_engines_hold_only_partitions_between_steps(setup):
    """The teacher runs forward-only passes (student steps) and forward+backward passes
    (generator steps). With DeepSpeed's prefetch or reuse distance on, a forward-only pass after
    a recorded forward+backward trace keeps the weights gathered for a backward that never
    comes: the whole teacher on every rank. teacher-inference turns both off."""
    from helpers import tiny_matekd

    tokenizer, batch, _, _ = setup
    method = tiny_matekd(3)

    def resident(module):  # whole (gathered) copies of partitioned, non-persistent parameters
        return [n for n, p in module.named_parameters() if p.numel() and not p.ds_persist]

    for step in range(7):
        if step % 3 == 0:
            method.generator_micro_step(batch, seed=step)
        else:
            method.student_micro_step(batch, seed=step)
        for role, module in (("teacher", method.teacher.module), ("student", method.student.module),
                             ("generator", method.generator.module)):
            assert resident(module) == [], (step, role, resident(module))
