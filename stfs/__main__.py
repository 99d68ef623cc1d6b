"""``python -m stfs``: the same entry point as the ``stfs`` console script."""

import sys

from stfs.cli import main

sys.exit(main())
