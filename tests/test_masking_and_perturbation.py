"""Masking, the straight-through Gumbel perturbation and the soft input embeddings."""

import torch
from helpers import soft_inputs_embeds, tiny_batch, tiny_tokenizer

from matekd_ds.kernels import gumbel_softmax_sample
from matekd_ds.masking import apply_mask, choose_mask
from matekd_ds.models import load_classifier, load_generator
from matekd_ds.perturb import Perturber

SPECIAL = [0, 1, 2]  # pad, cls, sep in these synthetic batches
PAD = 0


def synthetic_ids(batch=64, length=40, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    lengths = torch.randint(5, length + 1, (batch,), generator=g)
    attention = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 1
    ids[torch.arange(batch), lengths - 1] = 2
    ids[attention == 0] = PAD
    return ids, attention


def test_mask_never_touches_special_or_pad_tokens():
    ids, attention = synthetic_ids()
    for seed in range(20):
        mask = choose_mask(ids, attention, SPECIAL, 0.9, torch.Generator().manual_seed(seed))
        assert not mask[attention == 0].any()
        assert not mask[torch.isin(ids, torch.tensor(SPECIAL))].any()


def test_mask_rate_is_close_to_p():
    ids, attention = synthetic_ids(batch=512, length=64)
    candidates = (attention.bool() & ~torch.isin(ids, torch.tensor(SPECIAL))).sum().item()
    for p in (0.15, 0.3, 0.5):
        mask = choose_mask(ids, attention, SPECIAL, p, torch.Generator().manual_seed(1))
        rate = mask.sum().item() / candidates
        # Binomial std over ~16k candidates is < 0.004: 0.015 is about 4 standard deviations.
        assert abs(rate - p) < 0.015, (p, rate)


def test_mask_is_a_function_of_the_seed():
    ids, attention = synthetic_ids()
    a = choose_mask(ids, attention, SPECIAL, 0.3, torch.Generator().manual_seed(7))
    b = choose_mask(ids, attention, SPECIAL, 0.3, torch.Generator().manual_seed(7))
    c = choose_mask(ids, attention, SPECIAL, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_apply_mask_replaces_only_masked_positions():
    ids, attention = synthetic_ids()
    mask = choose_mask(ids, attention, SPECIAL, 0.3, torch.Generator().manual_seed(0))
    out = apply_mask(ids, mask, 99)
    assert (out[mask] == 99).all() and torch.equal(out[~mask], ids[~mask])


def test_straight_through_forward_is_one_hot_and_gradient_is_the_soft_paths():
    logits = torch.randn(13, 37, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(13, 37, dtype=torch.float64)
    ids, hard = gumbel_softmax_sample(logits, tau=0.7, hard=True, seed=11, backend="torch")
    assert torch.equal(hard, torch.nn.functional.one_hot(ids, 37).to(hard.dtype))
    (grad_hard,) = torch.autograd.grad((hard * weights).sum(), logits)
    _, soft = gumbel_softmax_sample(logits, tau=0.7, hard=False, seed=11, backend="torch")
    (grad_soft,) = torch.autograd.grad((soft * weights).sum(), logits)
    torch.testing.assert_close(grad_hard, grad_soft)
    assert grad_hard.abs().sum() > 0


def test_soft_embeddings_equal_the_lookup_of_sampled_ids_and_reach_the_generator():
    tokenizer, examples = tiny_tokenizer()
    torch.manual_seed(0)
    student = load_classifier("student", "builtin:bert-L1-H32-A2", 2, tokenizer, False)
    generator = load_generator("builtin:bert-L1-H32-A2", tokenizer).eval()  # no dropout: two calls agree
    perturber = Perturber(tokenizer.all_special_ids, tokenizer.mask_token_id, 0.3, 1.0)
    batch = tiny_batch(tokenizer, examples)
    mb = perturber.mask_batch(batch, seed=3)
    assert mb.mask.any()

    y = perturber.sample_straight_through(generator, mb, seed=4)
    assert y.shape == (int(mb.mask.sum()), len(tokenizer))  # masked rows only
    embeds = soft_inputs_embeds(student, mb, y)
    perturbed = perturber.sample_perturbed_ids(generator, mb, seed=4)  # same seed: same tokens
    assert torch.equal(perturbed[~mb.mask], batch["input_ids"][~mb.mask])
    torch.testing.assert_close(embeds, student.get_input_embeddings()(perturbed))

    embeds.sum().backward()
    grads = [p.grad for p in generator.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_student_steps_sample_ids_only(monkeypatch):
    """sample_perturbed_ids goes through the ids-only sampler (no [M, V] one-hot is built), and
    its ids are the straight-through sampler's for the same seed (torch backend)."""
    import matekd_ds.perturb as perturb

    tokenizer, examples = tiny_tokenizer()
    torch.manual_seed(0)
    generator = load_generator("builtin:bert-L1-H32-A2", tokenizer).eval()
    perturber = Perturber(tokenizer.all_special_ids, tokenizer.mask_token_id, 0.3, 1.0)
    mb = perturber.mask_batch(tiny_batch(tokenizer, examples), seed=2)
    with torch.no_grad():
        expected, _ = gumbel_softmax_sample(perturber.masked_logits(generator, mb), seed=3, backend="torch")

    def no_one_hot(*args, **kwargs):
        raise AssertionError("a student step built the straight-through one-hot")

    monkeypatch.setattr(perturb, "gumbel_softmax_sample", no_one_hot)
    perturbed = perturber.sample_perturbed_ids(generator, mb, seed=3)
    assert torch.equal(perturbed[mb.mask], expected)
    assert torch.equal(perturbed[~mb.mask], mb.input_ids[~mb.mask])
