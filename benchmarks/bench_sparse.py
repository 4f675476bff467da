"""Thin wrapper: ``python benchmarks/bench_sparse.py [options]`` == ``dass bench [options]``.

Examples (docs/speed.md):
    PYTHONPATH=src python3 benchmarks/bench_sparse.py --what ceilings,matrix,mlp,e2e --out bench.json
    PYTHONPATH=src python3 benchmarks/bench_sparse.py --what dispatch --shapes 7b --out dispatch.json
    PYTHONPATH=src python3 benchmarks/bench_sparse.py --dry-run     # tiny shapes on CPU, seconds

The whole GPU session (tests, dispatcher sweep, generate): benchmarks/gpu_infer.sh.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from dass.infer.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
