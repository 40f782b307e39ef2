"""data.group_by_length: TrainStream's length-grouped batches keep the stream's contract (batches
per epoch, the examples of each epoch, the ranks' shares, determinism, resume at any position)
and leave little padding; the cached clean-teacher logits are per example, so grouping does not
touch them."""

import random

import pytest
import torch
from helpers import tiny_models, tiny_tokenizer

from matekd_ds.callbacks import Callbacks
from matekd_ds.config import load_config
from matekd_ds.data.batching import Encoded, TrainStream, collate, encode
from matekd_ds.evaluation import predict
from matekd_ds.trainer import LoopConfig, Trainer

SIZE, MICRO = 1003, 8


def skewed_lengths(size: int = SIZE, seed: int = 0) -> list[int]:
    """GLUE-like: mostly short, a long tail (4..60 tokens)."""
    rng = random.Random(seed)
    return [min(60, max(4, int(rng.lognormvariate(2.4, 0.6)))) for _ in range(size)]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def epoch_batches(stream: TrainStream, epoch: int) -> list[list[int]]:
    n = stream.batches_per_epoch
    return take(stream.batches(epoch * n), n)


def padding_fraction(batches, lengths) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - real / padded


@pytest.mark.parametrize("world", [1, 3])
def test_grouping_keeps_each_epochs_batches_and_examples(world):
    lengths = skewed_lengths()
    for epoch in (0, 1, 4):
        shares = {}
        for grouped in (False, True):
            streams = [TrainStream(SIZE, MICRO, r, world, seed=5, lengths=lengths if grouped else None)
                       for r in range(world)]
            assert streams[0].batches_per_epoch == SIZE // (MICRO * world)
            batches = [epoch_batches(s, epoch) for s in streams]
            assert all(len(b) == MICRO for rank in batches for b in rank)
            flat = [i for rank in batches for b in rank for i in b]
            assert len(flat) == len(set(flat)), "an example twice in one epoch"
            shares[grouped] = sorted(flat)
        assert shares[True] == shares[False], "grouping changed which examples the epoch covers"


def test_grouped_batches_are_of_one_length_in_a_random_order():
    lengths = skewed_lengths()
    plain, grouped = (TrainStream(SIZE, MICRO, 0, 1, seed=5, lengths=x) for x in (None, lengths))
    plain_batches, grouped_batches = epoch_batches(plain, 0), epoch_batches(grouped, 0)
    assert padding_fraction(plain_batches, lengths) > 0.3
    assert padding_fraction(grouped_batches, lengths) < 0.02
    longest = [max(lengths[i] for i in b) for b in grouped_batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    # The batch order, not only the tie-breaking, changes from epoch to epoch and with the seed.
    assert [max(lengths[i] for i in b) for b in epoch_batches(grouped, 1)] != longest
    other_seed = TrainStream(SIZE, MICRO, 0, 1, seed=6, lengths=lengths)
    assert [max(lengths[i] for i in b) for b in epoch_batches(other_seed, 0)] != longest


def test_grouped_global_batches_are_split_by_rank_from_one_order():
    """Every rank computes the same epoch order; rank r's micro-batch b is slice r of the global
    micro-batch b, so the ranks of one step run batches of nearly one length."""
    lengths, world = skewed_lengths(), 3
    streams = [TrainStream(SIZE, MICRO, r, world, seed=5, lengths=lengths) for r in range(world)]
    per_rank = [epoch_batches(s, 2) for s in streams]
    order = streams[0]._epoch_order(2).tolist()
    steps = []
    for b, step in enumerate(zip(*per_rank)):
        assert [i for micro in step for i in micro] == order[b * world * MICRO:(b + 1) * world * MICRO]
        steps.append([lengths[i] for micro in step for i in micro])
    # each global micro-batch is one stretch of the epoch's examples sorted by length
    assert all(step == sorted(step) for step in steps)
    assert sum(sorted(steps), []) == sorted(sum(steps, []))


def test_grouped_stream_is_deterministic_and_resumes_at_any_position():
    lengths = skewed_lengths()
    stream = TrainStream(SIZE, MICRO, 1, 2, seed=3, lengths=lengths)
    full = take(stream.batches(), 200)  # over three epochs (62 batches each)
    assert take(TrainStream(SIZE, MICRO, 1, 2, seed=3, lengths=list(lengths)).batches(), 200) == full
    for start in (0, 1, 61, 62, 63, 150):
        assert take(stream.batches(start), 200 - start) == full[start:]


def test_ungrouped_order_is_unchanged():
    """Checkpoints written before data.group_by_length existed resume on the same batches."""
    stream = TrainStream(50, 4, 1, 2, seed=3)
    g = torch.Generator().manual_seed(3 * 100_003 + 0)
    order = torch.randperm(50, generator=g).tolist()
    assert take(stream.batches(), 6) == [order[(b * 2 + 1) * 4:(b * 2 + 2) * 4] for b in range(6)]


def test_lengths_must_match_the_dataset():
    with pytest.raises(ValueError, match="3 lengths for 4 examples"):
        TrainStream(4, 2, 0, 1, seed=0, lengths=[1, 2, 3])


def test_run_config_reaches_the_trainers_stream():
    data = Encoded([[1] * n for n in skewed_lengths(64)], None, [0] * 64, regression=False)
    for flag in (False, True):
        cfg = load_config(overrides=[f"data.group_by_length={str(flag).lower()}"])
        loop = LoopConfig.of_run(cfg, "student", total_steps=1, dtype="fp32")
        trainer = Trainer(None, data, 0, torch.device("cpu"), loop, None, None, None, Callbacks())
        assert (trainer.stream.lengths is not None) == flag
        if flag:
            assert trainer.stream.lengths.tolist() == [len(ids) for ids in data.input_ids]


def test_cached_teacher_logits_serve_grouped_batches():
    """The table is indexed by example: a grouped batch's lookup equals the teacher on that batch."""
    tokenizer, examples = tiny_tokenizer()
    data = encode(examples[:96], tokenizer, 32, regression=False)
    teacher = tiny_models(tokenizer)["teacher"].eval()
    table = torch.from_numpy(predict(teacher, data, 16, tokenizer.pad_token_id, torch.device("cpu")))
    stream = TrainStream.over(data, 8, 0, 1, seed=1, group_by_length=True)
    for indices in take(stream.batches(), 4):
        batch = collate(data, indices, tokenizer.pad_token_id)
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(table[batch["index"]], logits, rtol=1e-4, atol=1e-5)
