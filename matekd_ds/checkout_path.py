"""Keep a source checkout's root off sys.path.

`python -m matekd_ds`, `deepspeed --module matekd_ds` and `python -m pytest`, started from this
repository's root, put the working directory first on sys.path. That makes its kernels/ folder the
top-level `kernels` and shadows Hugging Face's `kernels`, which transformers imports when it loads a
model. The package is installed (kernels/ is matekd_ds.kernels), so that entry is never needed.
Imports nothing heavy: it runs before transformers is imported.
"""

import os
import sys
from pathlib import Path


def is_checkout_root(entry: str) -> bool:
    root = Path(entry or os.getcwd())
    return (root / "kernels" / "__init__.py").is_file() and (root / "matekd_ds" / "__main__.py").is_file()


def drop_checkout_root_from_path() -> None:
    sys.path[:] = [entry for entry in sys.path if not is_checkout_root(entry)]
