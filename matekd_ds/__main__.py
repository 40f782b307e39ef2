import sys

from matekd_ds.cli import main

sys.exit(main())
