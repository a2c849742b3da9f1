"""Run the ConvNN benchmark: the same as ``convnn bench`` (see ``--help``).

python benchmarks/bench.py --suite full --out benchmarks/results.json --markdown BENCHMARKS.md
"""

import sys
from pathlib import Path

try:
    from convnn.bench import main
except ImportError:  # a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from convnn.bench import main

if __name__ == "__main__":
    sys.exit(main())
