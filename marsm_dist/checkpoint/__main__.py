"""``python -m marsm_dist.checkpoint``: see :mod:`marsm_dist.checkpoint.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
