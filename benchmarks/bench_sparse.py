"""Thin wrapper: ``python benchmarks/bench_sparse.py [options]`` == ``dass bench [options]``.

Example (the command behind docs/speed.md):
    PYTHONPATH=src python3 benchmarks/bench_sparse.py --what ceilings,matrix,mlp,e2e --out bench.json
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from dass.infer.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
