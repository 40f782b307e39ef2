"""Models that never exist whole on one host: built straight into their ZeRO-3 partitions.

`build_partitioned(factory, ds_config)` constructs a model inside `deepspeed.zero.Init`: each
parameter is partitioned over the ranks as soon as its module exists, so a rank only ever holds
its partitions plus the parameters of the one module being built. Weights are not initialised
there: `load_partitions(model, files)` fills each rank's partition of every parameter from the
checkpoint's files, reading only that rank's byte range of each tensor (safetensors: pread, no
memory map; legacy .bin: a memory map, only the rank's slice touched), and `init_missing` then
initialises what the checkpoint lacks (a new classifier head; everything, for a builtin model)
one module at a time, the Hugging Face way (`model._init_weights`).

ZeRO-3 layout (deepspeed/runtime/zero/partition_parameters.py): a parameter of n elements is
flattened and padded to a multiple of the world size; rank r holds elements [r*p, (r+1)*p) of
it in `param.ds_tensor`, p = ceil(n / world), the last partition's tail is padding.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from matekd_ds.errors import MatekdError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def freed_blocks_returned_to_the_os() -> Iterator[None]:
    """While a model is built, every block of 128 KiB or more that is freed goes back to the OS;
    afterwards, on a CPU (where ZeRO-3 gathers each layer's weights into host memory), every
    block of 1 MiB or more.

    zero.Init allocates each parameter whole, copies this rank's partition out and frees it, and
    a ZeRO-3 forward gathers each layer and frees it: glibc's default raises its mmap threshold
    after such frees, so later blocks come from the heap and their freed memory stays resident.
    Measured on 2 CPU ranks: 0.3 x the model per rank while building, and the whole model's size
    again during a forward of a 1.2 GB teacher; with the fixed thresholds, the partitions plus
    one module, and +20 MB. On a GPU the gathers live in device memory: the threshold is left at
    what glibc's dynamic rule grows it to (32 MiB). No-op without glibc, or when the user set
    MALLOC_MMAP_THRESHOLD_ themselves."""
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    try:
        yield
    finally:
        libc.malloc_trim(0)
        on_cpu = not torch.cuda.is_available()
        threshold = (1 if on_cpu else 32) * 1024 * 1024
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)


def _no_init_weights():
    """transformers' switch that skips weight initialisation at construction (the checkpoint
    overwrites it; init_missing does the rest); a no-op context where it does not exist."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def build_partitioned(factory: Callable[[], nn.Module], ds_config: dict[str, Any]) -> nn.Module:
    """`factory()` (e.g. AutoModelForSequenceClassification.from_config(config)) with every
    parameter partitioned over the ranks from the start and left uninitialised: call
    load_partitions and init_missing next. Collective; needs the process group."""
    import deepspeed
    import torch._dynamo  # noqa: F401 - imported before zero.Init patches torch.Tensor.__new__ (torch's
    # dynamo polyfills, imported lazily inside the block otherwise, refuse the patched signature)

    with freed_blocks_returned_to_the_os(), deepspeed.zero.Init(config_dict_or_path=ds_config), _no_init_weights():
        model = factory()
    # transformers ties the MLM decoder to the word embeddings by comparing shapes, which are
    # empty placeholders inside zero.Init: tie again now that the parameters know their shapes
    model.tie_weights()
    return model


def init_missing(model: nn.Module, missing: list[str]) -> None:
    """Initialise the named parameters the Hugging Face way (`model._init_weights(module)` on
    each module that owns one), gathering one module at a time: rank 0 initialises, every rank
    keeps its partition. Collective."""
    import deepspeed

    missing_ids = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in set(missing)}
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not any(id(p) in missing_ids for p in own):
            continue
        with deepspeed.zero.GatheredParameters(own, modifier_rank=0), torch.no_grad():
            if deepspeed.comm.get_rank() == 0:
                model._init_weights(module)


# ---------------------------------------------------------------------------------------------
# Filling partitions from a checkpoint


def checkpoint_files(folder: Path) -> list[Path] | None:
    """The checkpoint's weight files (safetensors preferred; one file, or the shards its index
    names), or None when the folder has none."""
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
        if (folder / single_name).is_file():
            return [folder / single_name]
    return None


def _parameters_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every name a parameter answers to, tied aliases included (a tied MLM decoder and the
    word embeddings are one parameter under two names)."""
    return dict(model.named_parameters(remove_duplicate=False))


def checkpoint_key_to_parameter(key: str, names: dict[str, Any], prefix: str) -> str | None:
    """The model's name for checkpoint key `key`: as is, with or without the base-model prefix
    (an encoder checkpoint loaded into a model with a head, or the reverse), or with the legacy
    LayerNorm names (gamma/beta)."""
    candidates = [key]
    if key.endswith(".gamma") or key.endswith(".beta"):
        candidates.append(key.rsplit(".", 1)[0] + (".weight" if key.endswith(".gamma") else ".bias"))
    for name in list(candidates):
        candidates.append(f"{prefix}.{name}")
        if name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1:])
    return next((c for c in candidates if c in names), None)


def _partition_range(param: nn.Parameter) -> tuple[int, int]:
    """[start, end) of the flattened parameter this rank holds (end <= numel; may be empty)."""
    import torch.distributed as dist

    size = param.ds_tensor.ds_numel
    rank = dist.get_rank(group=param.ds_process_group)
    start = size * rank
    return start, min(start + size, param.ds_numel)


# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors: the format is
# an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
# the raw little-endian tensor bytes)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsFile:
    """Reads any element range of any tensor of a .safetensors file with pread: only those bytes
    are read and nothing is memory-mapped, so a rank's resident memory grows by its share only."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        (header_len,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        if header_len <= 0 or 8 + header_len > size:
            raise MatekdError(f"{path} is not a safetensors file (or is truncated)")
        header = json.loads(os.pread(self.fd, header_len, 8))
        header.pop("__metadata__", None)
        self.data_start, self.size, self.header = 8 + header_len, size, header

    def close(self) -> None:
        os.close(self.fd)

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor `key` (all of them by default)."""
        entry = self.header[key]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise MatekdError(f"{self.path}: tensor {key} has dtype {entry['dtype']}, which cannot be loaded")
        item = torch.empty((), dtype=dtype).element_size()
        begin, stop = entry["data_offsets"]
        numel = math.prod(entry["shape"])
        end = numel if end is None else end
        first, last = self.data_start + begin + start * item, self.data_start + begin + end * item
        if stop - begin != numel * item or self.data_start + stop > self.size:
            raise MatekdError(f"{self.path} is truncated or corrupt (tensor {key})")
        data = bytearray(last - first)
        if os.preadv(self.fd, [data], first) != len(data):
            raise MatekdError(f"{self.path} is truncated (tensor {key})")
        return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)


class BinFile:
    """A legacy pytorch_model.bin read the same way: memory-mapped (weights_only), only the
    rank's slice of each tensor copied out."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # a truncated or foreign file
            raise MatekdError(f"{path} could not be read ({type(err).__name__}: {str(err)[:120]})") from None

    def close(self) -> None:
        self.state = None

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self.state[key].reshape(-1)[start:end].clone()


def open_weights(path: Path) -> SafetensorsFile | BinFile:
    return SafetensorsFile(path) if path.suffix == ".safetensors" else BinFile(path)


def _fill_partition(param: nn.Parameter, file: SafetensorsFile | BinFile, key: str) -> None:
    """Copy this rank's share of checkpoint tensor `key` into the parameter's partition."""
    if file.shape(key) != tuple(param.ds_shape):
        raise MatekdError(f"checkpoint tensor {key} has shape {list(file.shape(key))}, "
                          f"the model expects {list(param.ds_shape)}")
    start, end = _partition_range(param)
    if start < end:  # else this rank's partition is all padding
        with torch.no_grad():
            param.ds_tensor[: end - start].copy_(file.read(key, start, end))


def _fill_whole(target: torch.Tensor, file: SafetensorsFile | BinFile, key: str) -> None:
    if file.shape(key) != tuple(target.shape):
        raise MatekdError(f"checkpoint tensor {key} has shape {list(file.shape(key))}, "
                          f"the model expects {list(target.shape)}")
    with torch.no_grad():
        target.copy_(file.read(key).reshape(target.shape))


def load_partitions(model: nn.Module, files: list[Path]) -> dict[str, list[str]]:
    """Fill every partitioned parameter (and whole buffer) of `model` that the checkpoint holds;
    parameters it lacks keep their initialisation. Returns the loaded, missing and unexpected
    names. Every rank reads only its own partitions' bytes."""
    params = _parameters_by_name(model)
    targets: dict[str, Any] = {**dict(model.named_buffers()), **params}
    prefix = getattr(model, "base_model_prefix", "") or ""
    done: set[int] = set()
    loaded, unexpected = [], []
    for path in files:
        file = open_weights(path)
        try:
            for key in file.keys():
                name = checkpoint_key_to_parameter(key, targets, prefix)
                if name is None:
                    unexpected.append(key)
                    continue
                target = targets[name]
                if id(target) in done:
                    continue
                if hasattr(target, "ds_tensor"):
                    _fill_partition(target, file, key)
                else:
                    _fill_whole(target, file, key)
                done.add(id(target))
                loaded.append(name)
        finally:
            file.close()
    missing = sorted({name for name, p in params.items() if id(p) not in done})
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected}
