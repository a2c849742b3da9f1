"""``python -m convnn.cli``: the ``convnn`` command (also under ``torchrun -m convnn.cli``)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
