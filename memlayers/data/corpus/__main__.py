"""``python -m memlayers.data.corpus fetch|build|list``, the same as ``memlayers data``."""

import sys

from memlayers.data.corpus.command import main

sys.exit(main())
