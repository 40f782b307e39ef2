"""The generator's last encoder layer at the masked rows only (matekd_ds/masked_rows.py) against
the Hugging Face layer it replaces: the same output at the masked rows and the same gradients,
for BERT and RoBERTa, with padding, rows without a masked token and a lone masked row; other
encoder families keep their whole layer; MATE-KD's generator logits are unchanged."""

import pytest
import torch
from helpers import tiny_batch, tiny_tokenizer
from transformers import AutoModelForMaskedLM, BertConfig, DistilBertConfig, RobertaConfig

from matekd_ds.masked_rows import masked_rows_only, supports_masked_rows
from matekd_ds.models import load_generator, masked_lm_parts
from matekd_ds.perturb import Perturber

ATOL = 1e-5
SMALL = dict(vocab_size=300, hidden_size=48, num_attention_heads=4, intermediate_size=96)


def batch_with_holes(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, attention mask (rows padded to 23, 7, 15, 3 and 20 tokens) and a 30% mask of real
    tokens in which row 1 has no masked token and row 3 exactly one."""
    g = torch.Generator().manual_seed(seed)
    lengths = [23, 7, 15, 3, 20]
    ids = torch.randint(5, 300, (len(lengths), 23), generator=g)
    attention = (torch.arange(23)[None, :] < torch.tensor(lengths)[:, None]).long()
    mask = (torch.rand(ids.shape, generator=g) < 0.3) & attention.bool()
    mask[1] = False
    mask[3] = False
    mask[3, 1] = True
    return ids, attention, mask


@pytest.mark.parametrize("config", [BertConfig(num_hidden_layers=3, **SMALL),
                                    RobertaConfig(num_hidden_layers=2, pad_token_id=1, **SMALL)],
                         ids=["bert", "roberta"])
def test_masked_rows_equal_the_whole_layer_with_their_gradients(config):
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(config).eval()  # no dropout: both paths deterministic
    encoder = masked_lm_parts(model).encoder
    ids, attention, mask = batch_with_holes()
    assert supports_masked_rows(encoder)

    whole = encoder(input_ids=ids, attention_mask=attention)[0][mask]
    whole_grads = torch.autograd.grad(whole.pow(2).sum(), list(model.parameters()), allow_unused=True)
    with masked_rows_only(encoder, mask, attention) as used:
        rows = encoder(input_ids=ids, attention_mask=attention)[0][mask]
    assert used
    grads = torch.autograd.grad(rows.pow(2).sum(), list(model.parameters()), allow_unused=True)

    torch.testing.assert_close(rows, whole, atol=ATOL, rtol=0)
    for (name, _), got, want in zip(model.named_parameters(), grads, whole_grads):
        assert (got is None) == (want is None), name
        if want is not None:  # relative to the tensor's largest gradient (a softmax-invariant bias has ~0)
            scale = max(want.abs().max().item(), 1e-3)
            torch.testing.assert_close(got / scale, want / scale, atol=ATOL, rtol=0, msg=name)
    # the context restored the layer: the next forward runs it whole again
    torch.testing.assert_close(encoder(input_ids=ids, attention_mask=attention)[0][mask], whole, atol=0, rtol=0)


def test_other_encoder_families_run_their_whole_last_layer():
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(DistilBertConfig(vocab_size=300, dim=48, n_heads=4, hidden_dim=96,
                                                              n_layers=2)).eval()
    encoder = masked_lm_parts(model).encoder
    ids, attention, mask = batch_with_holes()
    assert not supports_masked_rows(encoder)
    whole = encoder(input_ids=ids, attention_mask=attention)[0]
    with masked_rows_only(encoder, mask, attention) as used:
        same = encoder(input_ids=ids, attention_mask=attention)[0]
    assert not used
    assert torch.equal(same, whole)


def test_matekd_generator_logits_are_the_same_with_and_without_it():
    tokenizer, examples = tiny_tokenizer()
    torch.manual_seed(0)
    generator = load_generator("builtin:bert-L2-H32-A2", tokenizer).eval()
    batch = tiny_batch(tokenizer, examples, n=6)
    fast = Perturber(tokenizer.all_special_ids, tokenizer.mask_token_id, 0.3, 1.0)
    whole = Perturber(tokenizer.all_special_ids, tokenizer.mask_token_id, 0.3, 1.0, masked_rows_last_layer=False)
    mb = fast.mask_batch(batch, seed=3)
    torch.testing.assert_close(fast.masked_logits(generator, mb), whole.masked_logits(generator, mb), atol=ATOL, rtol=0)
    sampled = fast.sample_perturbed_ids(generator, mb, seed=4)
    assert torch.equal(sampled, whole.sample_perturbed_ids(generator, mb, seed=4))
