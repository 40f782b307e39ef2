"""A WordPiece tokenizer built from the task's own text, for builtin models that have none.

The vocabulary is chosen deterministically (characters, then whole words by frequency, ties by
spelling), so every rank of a multi-process run builds the identical tokenizer on its own; the
`tokenizers` trainers break ties differently from one process to the next.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _vocabulary(texts: Iterable[str], vocab_size: int) -> dict[str, int]:
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    # Every character, alone and as a continuation, so no word ever becomes [UNK].
    chars = sorted({c for w in words for c in w})
    pieces = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    room = max(0, vocab_size - len(pieces))
    taken = set(pieces)
    ranked = sorted((w for w in words if w not in taken), key=lambda w: (-words[w], w))
    pieces += ranked[:room]
    return {piece: i for i, piece in enumerate(pieces)}


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = _vocabulary(texts, vocab_size)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )
