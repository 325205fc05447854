"""``python -m memlayers ...``: the same as the ``memlayers`` command (and torchrun -m)."""

import sys

from memlayers.cli import main

if __name__ == "__main__":
    sys.exit(main())
