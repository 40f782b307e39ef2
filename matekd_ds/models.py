"""Teacher, student and generator: loading, the shared-vocabulary check, and the pieces of a
masked LM that MATE-KD calls separately (encoder, MLM head, word embeddings)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
)

from matekd_ds.errors import MatekdError

BUILTIN_PREFIX = "builtin:"
# name -> (layers, hidden, heads, ffn). Tiny enough for the 3-minute offline default on 2 cores.
BUILTIN_SHAPES = {
    "tiny-teacher": (4, 128, 4, 512),
    "tiny-student": (1, 64, 2, 256),
    "tiny-generator": (2, 64, 2, 256),
}
_BUILTIN_PATTERN = re.compile(r"bert-L(\d+)-H(\d+)(?:-A(\d+))?(?:-F(\d+))?(?:-V(\d+))?$")


def is_builtin(spec: str) -> bool:
    return spec.startswith(BUILTIN_PREFIX)


def builtin_config(spec: str, vocab_size: int, pad_token_id: int, max_positions: int = 512) -> BertConfig:
    """`builtin:tiny-teacher` or `builtin:bert-L4-H256[-A4][-F1024][-V30522]`: a BERT config,
    random init. Its vocabulary is the tokenizer's (`vocab_size`), or with -V that many
    embedding rows, at least the tokenizer's (a checkpoint's padded vocabulary, or a benchmark's
    model of a real model's shape)."""
    name = spec[len(BUILTIN_PREFIX):]
    if name in BUILTIN_SHAPES:
        layers, hidden, heads, ffn = BUILTIN_SHAPES[name]
    elif (match := _BUILTIN_PATTERN.match(name)):
        layers, hidden = int(match[1]), int(match[2])
        heads = int(match[3]) if match[3] else max(1, hidden // 64)
        ffn = int(match[4]) if match[4] else 4 * hidden
        if match[5]:
            if int(match[5]) < vocab_size:
                raise MatekdError(f"builtin model '{spec}': {match[5]} embedding rows, fewer than the tokenizer's "
                                  f"{vocab_size} tokens")
            vocab_size = int(match[5])
    else:
        valid = ", ".join(BUILTIN_SHAPES)
        raise MatekdError(f"unknown builtin model '{spec}' (valid: {valid}, or builtin:bert-L<layers>-H<hidden>"
                          "[-A<heads>][-F<ffn>][-V<vocabulary>])")
    if hidden % heads:
        raise MatekdError(f"builtin model '{spec}': hidden {hidden} is not divisible by {heads} heads")
    return BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
    )


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a local path.
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or Path(spec).exists()


def _pretrained(loader: Callable, role: str, spec: str, **kwargs) -> nn.Module:
    """`loader(spec)`, any failure (missing files, a truncated or corrupt weight file, a config
    transformers cannot read) as one line naming the role and the path."""
    if _looks_like_path(spec) and not Path(spec).expanduser().exists():
        raise MatekdError(f"could not load the {role} from '{spec}': no such file or directory")
    try:
        return loader(spec, **kwargs)
    except MatekdError:
        raise
    except Exception as err:  # OSError, ValueError, SafetensorError, RuntimeError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        kind = "" if isinstance(err, (OSError, ValueError, KeyError)) else f"{type(err).__name__}: "
        raise MatekdError(f"could not load the {role} from '{spec}': {kind}{first or type(err).__name__}") from None


def check_label_count(role: str, spec: str, num_labels: int) -> None:
    """A checkpoint that already is a sequence classifier must have the task's number of labels
    (one fine-tuned on another task would load with a re-initialised head, or not at all)."""
    config = _pretrained(AutoConfig.from_pretrained, role, spec)
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if is_classifier and config.num_labels != num_labels:
        raise MatekdError(f"the {role} '{spec}' is a classifier with {config.num_labels} labels, "
                          f"but the task has {num_labels}")


def classifier_config(role: str, spec: str, num_labels: int, tokenizer, regression: bool):
    """The config a teacher or student is built from (label count checked), without its weights."""
    problem = "regression" if regression else "single_label_classification"
    if is_builtin(spec):
        config = builtin_config(spec, len(tokenizer), tokenizer.pad_token_id)
        config.num_labels, config.problem_type = num_labels, problem
        return config
    check_label_count(role, spec, num_labels)
    return _pretrained(AutoConfig.from_pretrained, role, spec, num_labels=num_labels, problem_type=problem)


def generator_config(spec: str, tokenizer):
    if is_builtin(spec):
        return builtin_config(spec, len(tokenizer), tokenizer.pad_token_id)
    return _pretrained(AutoConfig.from_pretrained, "generator", spec)


def load_classifier(role: str, spec: str, num_labels: int, tokenizer, regression: bool,
                    zero3_config: dict | None = None) -> nn.Module:
    """Teacher or student: AutoModelForSequenceClassification from a path, hub id or builtin.
    With `zero3_config` it is built straight into its ZeRO-3 partitions (zero3_load.py)."""
    config = classifier_config(role, spec, num_labels, tokenizer, regression)
    if zero3_config is not None:
        return _load_partitioned(AutoModelForSequenceClassification, role, spec, config, zero3_config)
    if is_builtin(spec):
        return AutoModelForSequenceClassification.from_config(config)
    return _pretrained(AutoModelForSequenceClassification.from_pretrained, role, spec, config=config)


def load_generator(spec: str, tokenizer, zero3_config: dict | None = None) -> nn.Module:
    """The generator: AutoModelForMaskedLM. An encoder checkpoint without an MLM head gets a
    fresh head whose decoder is tied to the word embeddings (transformers does the tying)."""
    config = generator_config(spec, tokenizer)
    if zero3_config is not None:
        return _load_partitioned(AutoModelForMaskedLM, "generator", spec, config, zero3_config)
    if is_builtin(spec):
        return AutoModelForMaskedLM.from_config(config)
    return _pretrained(AutoModelForMaskedLM.from_pretrained, "generator", spec)


def _local_checkpoint(role: str, spec: str) -> Path:
    """A local folder holding the checkpoint of a path or hub id (downloaded once, by rank 0)."""
    if Path(spec).expanduser().is_dir():
        return Path(spec).expanduser()
    from huggingface_hub import snapshot_download

    from matekd_ds import distributed

    def fetch() -> Path:
        return Path(_pretrained(snapshot_download, role, spec,
                                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]))

    if distributed.is_main():
        fetch()
    distributed.barrier()
    return fetch()  # in the cache now: no download


def _load_partitioned(auto_class, role: str, spec: str, config, zero3_config: dict) -> nn.Module:
    """Built under deepspeed.zero.Init and filled partition by partition from the checkpoint's
    files: no rank ever holds the whole model (zero3_load.py). What the checkpoint lacks (a new
    head; everything, for a builtin model) is initialised the Hugging Face way."""
    from matekd_ds.zero3_load import build_partitioned, checkpoint_files, init_missing, load_partitions

    model = build_partitioned(lambda: auto_class.from_config(config), zero3_config)
    if is_builtin(spec):
        init_missing(model, [name for name, _ in model.named_parameters()])
        return model
    folder = _local_checkpoint(role, spec)
    files = checkpoint_files(folder)
    if files is None:
        raise MatekdError(f"could not load the {role} from '{spec}': no model.safetensors or pytorch_model.bin there")
    try:
        report = load_partitions(model, files)
    except MatekdError as err:
        raise MatekdError(f"could not load the {role} from '{spec}': {err}") from None
    except Exception as err:  # a truncated or corrupt shard
        raise MatekdError(f"could not load the {role} from '{spec}': {type(err).__name__}: {err}") from None
    init_missing(model, report["missing"])
    return model


def load_tokenizer(spec: str, role: str = "tokenizer"):
    return _pretrained(AutoTokenizer.from_pretrained, role, spec)


def vocab_size(model: nn.Module) -> int:
    weight = model.get_input_embeddings().weight
    return weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]  # ZeRO-3: the whole matrix's


def check_shared_vocabulary(models: dict[str, nn.Module], tokenizer) -> None:
    """MATE-KD swaps token ids and one-hots between models: one vocabulary, or nothing works."""
    sizes = {role: vocab_size(m) for role, m in models.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{role} {size}" for role, size in sizes.items())
        raise MatekdError(f"vocabulary mismatch: {listed} embedding rows; the models must share one vocabulary")
    size = next(iter(sizes.values()))
    if len(tokenizer) > size:
        raise MatekdError(f"the tokenizer has {len(tokenizer)} tokens but the models have only {size} embedding rows")
    if tokenizer.mask_token_id is None:
        raise MatekdError("the tokenizer has no mask token; MATE-KD's generator needs one")


# The files a saved tokenizer consists of (one of them at least); a model folder without any has none.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "spm.model", "tokenizer.model")


def has_tokenizer_files(spec: str) -> bool:
    """Whether `spec` ships a tokenizer: a local folder must hold its files; a hub id may."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        return not _looks_like_path(spec)
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def check_tokenizers_agree(specs: dict[str, str], tokenizer) -> None:
    """When several model directories ship tokenizers, they must be the same vocabulary. A folder
    without tokenizer files has nothing to compare (transformers would return an empty
    tokenizer for it): the embedding-size check still applies."""
    reference = tokenizer.get_vocab()
    for role, spec in specs.items():
        if is_builtin(spec) or not has_tokenizer_files(spec):
            continue
        try:
            other = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError, KeyError):
            continue  # no tokenizer there: the embedding-size check still applies
        if other.get_vocab() != reference:
            raise MatekdError(f"vocabulary mismatch: the {role} '{spec}' has a different tokenizer vocabulary")


# Models whose position ids start after the padding index (RoBERTa's convention): pad_id + 1
# of their position embeddings are never used for tokens.
_POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod",
                            "roberta-prelayernorm", "bart", "mbart")


def max_input_length(config) -> int | None:
    """The longest input a model's position embeddings cover, or None when it has no absolute
    positions (DeBERTa-v2 with relative attention only)."""
    if getattr(config, "position_biased_input", True) is False:
        return None
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    if getattr(config, "model_type", "") in _POSITIONS_AFTER_PADDING:
        positions -= (getattr(config, "pad_token_id", 1) or 0) + 1
    return positions


def check_input_length(models: dict[str, nn.Module], max_length: int) -> None:
    for role, model in models.items():
        limit = max_input_length(model.config)
        if limit is not None and max_length > limit:
            raise MatekdError(f"data.max_length {max_length} is longer than the {role}'s position embeddings "
                              f"allow ({limit} tokens); set data.max_length <= {limit}")


def check_student_layers(teacher_config, layers: list[int]) -> None:
    n_teacher = teacher_config.num_hidden_layers
    if not layers or any(not 0 <= i < n_teacher for i in layers):
        raise MatekdError(f"models.student_init_from_teacher_layers must pick layers in 0..{n_teacher - 1} "
                          f"(the teacher has {n_teacher}), got {layers}")


def teacher_key_in_student(key: str, layers: list[int]) -> bool:
    """Whether a DistilBERT-style student cut from `layers` takes teacher weight `key`."""
    match = re.search(r"\.layer\.(\d+)\.", key)
    return match is None or int(match[1]) in layers


def init_student_from_teacher(teacher: nn.Module, layers: list[int],
                              state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """DistilBERT-style: a student with the teacher's embeddings, head and the chosen layers.
    `state_dict`: the teacher's full weights when its module holds only ZeRO-3 partitions."""
    check_student_layers(teacher.config, layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    student = AutoModelForSequenceClassification.from_config(config)
    source = {new: old for new, old in enumerate(layers)}
    state = {}
    for key, value in (state_dict if state_dict is not None else teacher.state_dict()).items():
        match = re.search(r"\.layer\.(\d+)\.", key)
        if match is None:
            state[key] = value
            continue
        old = int(match[1])
        for new, picked in source.items():
            if picked == old:
                state[key.replace(f".layer.{old}.", f".layer.{new}.", 1)] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise MatekdError(f"could not initialise the student from teacher layers {layers}: missing {missing[:3]}")
    return student


def encoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The stack of encoder layers of a Hugging Face encoder model (`<base>.encoder.layer`, or
    DistilBERT's `<base>.transformer.layer`), or None."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for path in (("encoder", "layer"), ("transformer", "layer")):
        node = base
        for part in path:
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList):
            return node
    return None


def check_generator_layers(generator: nn.Module, keep: int) -> None:
    """matekd.generator_layers: the generator must have that many encoder layers to keep."""
    layers = encoder_layers(generator)
    if layers is None:
        raise MatekdError(f"matekd.generator_layers: cannot find the encoder layers of {type(generator).__name__}")
    if keep > len(layers):
        raise MatekdError(f"matekd.generator_layers is {keep} but the generator has {len(layers)} encoder layers")


def keep_first_layers(model: nn.Module, keep: int) -> nn.Module:
    """`model` with its first `keep` encoder layers only (in place; its head stays): a cheaper
    generator that starts from the same weights."""
    check_generator_layers(model, keep)
    del encoder_layers(model)[keep:]
    for key in ("num_hidden_layers", "n_layers"):
        if hasattr(model.config, key):
            setattr(model.config, key, keep)
    return model


# ---------------------------------------------------------------------------------------------
# The generator, split into encoder and MLM head so that logits are computed at masked rows only.


@dataclass
class MaskedLMParts:
    encoder: nn.Module  # input_ids, attention_mask -> hidden states [B, L, H]
    head: Callable[[torch.Tensor], torch.Tensor]  # hidden [M, H] -> logits [M, V]


def masked_lm_parts(model: nn.Module) -> MaskedLMParts:
    encoder = getattr(model, model.base_model_prefix, None)
    for name in ("cls", "lm_head", "lm_predictions", "generator_lm_head"):
        head = getattr(model, name, None)
        if head is not None and encoder is not None:
            if name == "generator_lm_head":  # ELECTRA splits its head in two
                predictions = model.generator_predictions
                return MaskedLMParts(encoder, lambda h, head=head, predictions=predictions: head(predictions(h)))
            return MaskedLMParts(encoder, head)
    if encoder is not None and hasattr(model, "vocab_projector"):  # DistilBERT
        def distilbert_head(h):
            h = model.activation(model.vocab_transform(h))
            return model.vocab_projector(model.vocab_layer_norm(h))
        return MaskedLMParts(encoder, distilbert_head)
    raise MatekdError(
        f"unsupported generator architecture {type(model).__name__}: cannot find its MLM head "
        "(supported: BERT, RoBERTa/XLM-R, DeBERTa, ELECTRA, DistilBERT families)"
    )

