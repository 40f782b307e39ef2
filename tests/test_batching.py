"""Rank sharding of training batches and of evaluation; the synthetic task."""

from matekd_ds.data import synthetic
from matekd_ds.data.batching import TrainStream, collate, encode, eval_shard
from matekd_ds.data.tokenizer import train_wordpiece


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_ranks_get_disjoint_equal_shards_of_each_epoch():
    size, micro, world = 103, 4, 3
    streams = [TrainStream(size, micro, r, world, seed=1) for r in range(world)]
    per_epoch = streams[0].batches_per_epoch
    assert per_epoch == 103 // 12
    epoch = [sum(take(s.batches(), per_epoch), []) for s in streams]
    flat = sum(epoch, [])
    assert len(flat) == len(set(flat)) == per_epoch * micro * world  # no example twice in an epoch
    second = [sum(take(s.batches(per_epoch), per_epoch), []) for s in streams]
    assert sorted(sum(second, [])) != sorted(flat) or second != epoch  # a new permutation per epoch


def test_stream_resumes_at_any_position():
    stream = TrainStream(50, 4, 1, 2, seed=3)
    full = take(stream.batches(), 20)
    for start in (0, 5, 6, 13):
        assert take(stream.batches(start), 20 - start) == full[start:]


def test_eval_shards_cover_every_example_once_after_dedupe():
    for size in (1, 2, 7, 10, 101):
        for world in (1, 2, 3, 4):
            shards = [eval_shard(size, r, world) for r in range(world)]
            assert len({len(s) for s in shards}) == 1  # equal forward counts on every rank
            assert sorted(set(sum(shards, []))) == list(range(size))


def test_collate_pads_dynamically():
    tok = train_wordpiece(["a b c d e f", "a b"], 100)
    data = encode([synthetic.Example(("a b c d e f",), 1), synthetic.Example(("a b",), 0)], tok, 32, False)
    batch = collate(data, [1], tok.pad_token_id)
    assert batch["input_ids"].shape == (1, 4)  # [CLS] a b [SEP]: padded to this batch's longest only
    batch = collate(data, [0, 1], tok.pad_token_id, pad_to_multiple=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum().item() == 8 + 4
    assert (batch["input_ids"][1, 4:] == tok.pad_token_id).all()
    assert batch["labels"].tolist() == [1, 0] and batch["index"].tolist() == [0, 1]


def test_synthetic_task_is_deterministic_balanced_and_compositional():
    a, b = synthetic.generate(2000, 7), synthetic.generate(2000, 7)
    assert a == b
    positive = sum(ex.label for ex in a) / len(a)
    assert 0.4 < positive < 0.6
    # The same adjective appears with both labels: a bag of words cannot solve the task.
    by_word = {}
    for ex in a:
        for word in ex.texts[0].split():
            by_word.setdefault(word, set()).add(ex.label)
    assert all(by_word[adj] == {0, 1} for adj in ("good", "boring") if adj in by_word)
    negated = [ex for ex in a if ex.texts[0].endswith(("not good", "never good"))
               and " but " not in ex.texts[0] and "not true" not in ex.texts[0] and "although" not in ex.texts[0]]
    assert negated and all(ex.label == 0 for ex in negated)


def test_builtin_tokenizer_is_identical_across_processes():
    """Each rank builds it independently: it must not depend on hash seeds or thread timing."""
    import os
    import subprocess
    import sys

    code = ("from matekd_ds.data import synthetic; from matekd_ds.data.tokenizer import train_wordpiece;"
            "ex = synthetic.generate(500, 3); t = train_wordpiece([e.texts[0] for e in ex], 120);"
            "print(sorted(t.get_vocab().items()))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
               for seed in (1, 2, 3)}
    assert len(outputs) == 1
