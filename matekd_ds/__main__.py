import os
import sys
from pathlib import Path


def _drop_checkout_root_from_path() -> None:
    """`python -m matekd_ds` (and `deepspeed --module matekd_ds`) put the working directory first
    on sys.path. Started from this repository's root, that makes its kernels/ folder the top-level
    `kernels` and shadows Hugging Face's `kernels`, which transformers imports when it loads a model.
    The package is installed (kernels/ is matekd_ds.kernels), so that entry is never needed."""
    def is_checkout_root(entry: str) -> bool:
        root = Path(entry or os.getcwd())
        return (root / "kernels" / "__init__.py").is_file() and (root / "matekd_ds" / "__main__.py").is_file()

    sys.path[:] = [entry for entry in sys.path if not is_checkout_root(entry)]


_drop_checkout_root_from_path()

from matekd_ds.cli import main  # noqa: E402  (after the sys.path fix: the CLI imports transformers)

sys.exit(main())
