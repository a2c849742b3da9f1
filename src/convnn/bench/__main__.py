"""``python -m convnn.bench``: the benchmark (the worker process of an isolated case, too)."""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
