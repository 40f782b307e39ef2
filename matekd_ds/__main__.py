import sys

from matekd_ds.checkout_path import drop_checkout_root_from_path

drop_checkout_root_from_path()

from matekd_ds.cli import main  # noqa: E402  (after the sys.path fix: the CLI imports transformers)

sys.exit(main())
