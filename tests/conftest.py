import os
import sys
from pathlib import Path

# Triton kernels run on CPU tensors only under the interpreter, which must be switched on
# before any kernel is decorated (i.e. before matekd_ds.kernels is imported).
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
# `python -m pytest` from the repository root puts the root on sys.path (`pytest` adds none).
from matekd_ds.checkout_path import drop_checkout_root_from_path

drop_checkout_root_from_path()
