"""What ZeRO-3 changes for code that touches weights directly: parameter counts and bytes of a
partitioned module (and the per-rank memory record of metrics.json), its full state dict
gathered for export, and releasing what a backward outside its engine left gathered.

Under ZeRO-3 a parameter's `.data` is an empty placeholder outside the forward of the module
that owns it; the rank's share lives in `param.ds_tensor` (1/world of the flattened tensor, on
the device or offloaded), and `param.ds_numel` / `param.ds_shape` describe the whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from matekd_ds import distributed


def is_partitioned(module: nn.Module) -> bool:
    """True when ZeRO-3 manages the parameters of `module`."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def param_numel(module: nn.Module) -> int:
    """Parameters of the whole model, partitioned or not."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def param_bytes(module: nn.Module) -> dict[str, Any]:
    """Bytes of parameters this rank holds, by device, and the whole model's bytes.

    A ZeRO-3 parameter counts its partition (`ds_tensor`) plus whatever full copy is resident
    right now (a persistent small parameter, or one gathered for a forward in progress)."""
    by_device: dict[str, int] = {}
    full = 0
    for p in module.parameters():
        full += getattr(p, "ds_numel", p.numel()) * p.element_size()
        held = [p.data] if not hasattr(p, "ds_tensor") else [p.ds_tensor, p.data]
        for t in held:
            if t is not None and t.numel():
                by_device[t.device.type] = by_device.get(t.device.type, 0) + _nbytes(t)
    return {"rank_bytes": sum(by_device.values()), "rank_bytes_by_device": by_device, "full_bytes": full,
            "partitioned": is_partitioned(module)}


def gathered_state_dict(module: nn.Module, rank0_only: bool = True,
                        keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor] | None:
    """The full state dict of a ZeRO-3 module (the entries `keep` accepts), on the CPU, gathered
    one module at a time (the device never holds more than one layer's full weights); modules
    with nothing to keep are not gathered. Collective: every rank calls it; with rank0_only the
    other ranks get None."""
    import deepspeed

    wanted = keep or (lambda key: True)
    keys = {k for k in module.state_dict(keep_vars=True) if wanted(k)}
    holder = distributed.is_main() or not rank0_only  # this rank keeps the copies
    out: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}  # tied parameters: one copy under each name

    def walk(mod: nn.Module, prefix: str) -> None:
        params = [p for name, p in mod.named_parameters(recurse=False) if prefix + name in keys]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if holder:
                for name, p in mod.named_parameters(recurse=False):
                    if prefix + name in keys:
                        if id(p) not in copies:
                            copies[id(p)] = p.detach().to("cpu", copy=True)
                        out[prefix + name] = copies[id(p)]
        if holder:
            for name, b in mod.named_buffers(recurse=False):
                if b is not None and prefix + name in keys:
                    out[prefix + name] = b.detach().to("cpu", copy=True)
        for name, child in mod.named_children():
            walk(child, prefix + name + ".")

    walk(module, "")
    return out if holder else None


def release_backward_leftovers(engine) -> None:
    """Free the ZeRO-3 parameters of `engine`'s module that a backward left gathered.

    DeepSpeed frees a module's gathered weights when the backward has passed through that
    module's inputs; a module whose inputs need no gradient (the word embeddings, fed token
    ids) keeps them until its engine's own backward ends. A backward through a module without
    its engine (the generator step, through the frozen student and the ZeRO-3 teacher) must
    release them itself, or each rank keeps a whole embedding matrix. No-op below ZeRO-3."""
    offload = getattr(engine, "optimizer", None)
    offload = getattr(offload, "parameter_offload", offload)  # ZeRO-3 training engine / inference engine
    release = getattr(offload, "release_backward_leftovers", None)
    if release is not None:
        release()


def memory_record(module: nn.Module, ds_config: dict[str, Any] | None) -> dict[str, Any]:
    """Parameter bytes of `module` on every rank against the whole model's, with its ZeRO stage
    and offload (for metrics.json). A collective: every rank calls it."""
    local = param_bytes(module)
    per_rank = distributed.gather_objects(local["rank_bytes"])
    zero = (ds_config or {}).get("zero_optimization", {})
    offload = {k: zero[k]["device"] for k in ("offload_param", "offload_optimizer") if zero.get(k)}
    return {"zero_stage": zero.get("stage") if ds_config else None, "offload": offload,
            "partitioned": local["partitioned"], "param_bytes_full": local["full_bytes"],
            "param_bytes_per_rank": per_rank, "param_bytes_rank_max": max(per_rank),
            "param_bytes_rank_fraction": max(per_rank) / max(1, local["full_bytes"])}
