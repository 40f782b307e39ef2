"""Run by tests/test_zero3_loading.py on 1 and 2 ranks (`deepspeed --num_gpus 2
tests/zero3_load_probe.py MODELS_DIR OUT.json`): models built straight into their ZeRO-3
partitions from safetensors checkpoints, against the same checkpoints loaded whole.

For each checkpoint (a sharded classifier, a masked LM with a tied decoder, an encoder without a
head loaded as a classifier) and precision (fp32; bf16 partitions from an fp32 checkpoint): the
fraction of the parameter bytes each rank holds after building, and every weight gathered back
against the whole model's (bf16: the whole model cast to bf16). Rank 0 writes the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from helpers import teacher_ds_config, tiny_tokenizer

from matekd_ds import distributed, models
from matekd_ds.partition import gathered_state_dict, param_bytes

CASES = {"classifier_sharded": "classifier", "masked_lm_tied": "generator", "encoder_as_classifier": "classifier"}


def load(kind: str, folder: Path, tokenizer, dtype: str):
    config = teacher_ds_config(dtype)
    if kind == "generator":
        return models.load_generator(str(folder), tokenizer, zero3_config=config)
    return models.load_classifier("teacher", str(folder), 3, tokenizer, False, zero3_config=config)


def whole(kind: str, folder: Path, tokenizer):
    if kind == "generator":
        return models.load_generator(str(folder), tokenizer)
    return models.load_classifier("teacher", str(folder), 3, tokenizer, False)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    root, out = Path(args[0]), Path(args[1])
    distributed.init()
    tokenizer, _ = tiny_tokenizer()
    results = {}
    for name, kind in CASES.items():
        for dtype in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = load(kind, root / name, tokenizer, dtype)
            held = param_bytes(model)
            fraction = max(distributed.gather_objects(held["rank_bytes"])) / held["full_bytes"]
            state = gathered_state_dict(model)
            if not distributed.is_main():
                continue
            reference = whole(kind, root / name, tokenizer).state_dict()
            cast = torch.bfloat16 if dtype == "bf16" else torch.float32
            differing = sorted(k for k, v in state.items() if k in reference and
                               not torch.equal(v, reference[k].to(cast) if v.is_floating_point() else reference[k]))
            results[f"{name}/{dtype}"] = {
                "world_size": distributed.world_size(), "rank_fraction": fraction,
                "dtypes": sorted({str(v.dtype) for v in state.values() if v.is_floating_point()}),
                "keys": len(state), "reference_keys": len(reference), "differing": differing,
                "partitioned": held["partitioned"],
            }
    if distributed.is_main():
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
    distributed.shutdown()
