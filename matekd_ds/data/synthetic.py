"""The embedded offline task: procedurally generated sentiment with compositional structure.

A bag of words cannot solve it: the label of a review depends on negation ("not good"), on
double negation ("it is not true that the plot was not clever"), and on contrast, where only the
clause after "but"/"although" counts. A tiny teacher learns it well; a tinier student less so,
which leaves room for distillation to show.
"""

from __future__ import annotations

import random

from matekd_ds.data.loaders import Example

POSITIVE = (
    "good", "great", "wonderful", "brilliant", "charming", "delightful", "superb", "moving",
    "clever", "funny", "fresh", "gripping", "elegant", "beautiful", "smart", "warm",
)
NEGATIVE = (
    "bad", "awful", "boring", "dull", "terrible", "clumsy", "tedious", "bland",
    "messy", "weak", "stale", "painful", "silly", "ugly", "flat", "lazy",
)
SUBJECTS = (
    "the film", "the movie", "the plot", "the acting", "the script", "the ending", "the music",
    "the cast", "the story", "the dialogue", "this sequel", "the direction", "the pacing",
)
VERBS = ("is", "was", "seems", "felt", "looks", "remains", "turned out")
NEGATORS = ("not", "never", "hardly")
INTENSIFIERS = ("very", "really", "quite", "truly", "rather", "so", "extremely")
OPENERS = ("honestly ,", "overall ,", "i think", "in the end ,", "to be fair ,")
LABEL_NAMES = ("negative", "positive")


def _clause(rng: random.Random) -> tuple[str, int]:
    """One clause and its polarity (1 positive, 0 negative)."""
    polarity = rng.randint(0, 1)
    adjective = rng.choice(POSITIVE if polarity else NEGATIVE)
    words = [rng.choice(SUBJECTS), rng.choice(VERBS)]
    negated = rng.random() < 0.4
    if negated:
        words.append(rng.choice(NEGATORS))
    if rng.random() < 0.4:
        words.append(rng.choice(INTENSIFIERS))
    words.append(adjective)
    return " ".join(words), polarity ^ int(negated)


def _sentence(rng: random.Random) -> tuple[str, int]:
    text, label = _clause(rng)
    shape = rng.random()
    if shape < 0.25:  # contrast: only the second clause counts
        other, label = _clause(rng)
        text = f"{text} but {other}"
    elif shape < 0.4:  # concession: the main clause counts, the "although" clause does not
        other, _ = _clause(rng)
        text = f"although {other} , {text}"
    elif shape < 0.5:  # double negation flips the clause again
        text, label = f"it is not true that {text}", 1 - label
    if rng.random() < 0.3:
        text = f"{rng.choice(OPENERS)} {text}"
    return text, label


def generate(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text, label = _sentence(rng)
        out.append(Example(texts=(text,), label=label))
    return out


def splits(train_size: int, dev_size: int, seed: int) -> dict[str, list[Example]]:
    # Different seeds per split: the dev set is drawn independently of the training set.
    return {"train": generate(train_size, seed), "dev": generate(dev_size, seed + 1)}
