"""The 2:4 Triton kernels' arithmetic on the CPU, through Triton's interpreter.

The kernels normally need a CUDA GPU (tests/test_accelerate.py, tests/test_infer_gpu.py);
with ``TRITON_INTERPRET=1`` Triton runs them with NumPy on CPU tensors, which checks their
indexing (compressed values, one-hot nibbles, group pairs, tile expansion, split
reductions, ragged shapes, token blocks) on any machine that has the ``triton`` package.
Skipped where triton is not installed (CI's CPU environment). bf16 ``tl.dot`` runs through
:mod:`dass.infer.kernels.interpret`'s widening to fp32.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

HEADER = """
import json, sys, torch
from test_accelerate import prune24, rel_err
from dass.infer.kernels import nm24_decompress, nm24_matmul, triton_available
from dass.infer.kernels.layout import to_kernel_layout

assert triton_available()
torch.manual_seed(0)
out = []
"""

# every token bucket (and ragged counts inside buckets), both orientations, fp16 and bf16,
# the default configuration and the variants a tuner may pick
BUCKETS = textwrap.dedent(
    """
    for dtype in (torch.float16, torch.bfloat16):
        for orientation in ("output", "input"):
            for N, K in ((128, 256), (4 * 37, 104)):
                W = prune24(torch.randn(N, K).to(dtype) * 0.05, orientation)
                W[:4, :4] = 0  # groups with fewer than two nonzeros
                values, meta = to_kernel_layout(W, orientation)
                exact = torch.equal(nm24_decompress(values, meta, N, K, orientation), W)
                for T in (1, 2, 3, 4, 8, 16, 17, 32, 64, 100, 128):
                    x = torch.randn(T, K, dtype=dtype)
                    ref = x.double() @ W.double().T
                    cfgs = [None, {"SPLIT_K": 2}]
                    if T == 1:
                        cfgs += [{"BLOCK_K": 32, "SPLIT_K": 2} if orientation == "input" else {"BLOCK_K": 32, "PREFETCH": 0}]
                    elif T <= 8:
                        cfgs += [{"KIND": "gemv", "BLOCK": 2 if orientation == "output" else 8, "BLOCK_K": 64, "T_FAST": 1},
                                 {"KIND": "tile", "BLOCK": 32, "BLOCK_K": 64, "BLOCK_T": 16, "USE_DOT": 1, "PREFETCH": 0}]
                    else:
                        cfgs += [{"KIND": "tile", "BLOCK": 16, "BLOCK_K": 32, "BLOCK_T": 16, "USE_DOT": 1, "PREFETCH": 0},
                                 {"KIND": "tile", "BLOCK": 64, "BLOCK_K": 64, "BLOCK_T": 16, "USE_DOT": 0, "PREFETCH": 1}]
                    for cfg in cfgs:
                        y = nm24_matmul(x, values, meta, N, K, orientation, config=cfg)
                        out.append({"dtype": str(dtype), "orientation": orientation, "N": N, "K": K, "T": T,
                                    "cfg": cfg, "shape_ok": list(y.shape) == [T, N] and y.dtype == dtype,
                                    "decompress_exact": exact, "rel_err": rel_err(y, ref)})
    from dass.infer.kernels import glu_act_mul

    for dtype in (torch.float32, torch.float16):
        for act, fn in (("silu", torch.nn.SiLU()), ("gelu_tanh", torch.nn.GELU(approximate="tanh"))):
            for T, D in ((1, 8), (5, 1500)):
                gu = (torch.randn(T, 2 * D) * 3).to(dtype)
                ref = fn(gu[:, :D].double()) * gu[:, D:].double()
                got = glu_act_mul(gu, D, act)
                out.append({"dtype": str(dtype), "glu": act, "T": T, "D": D,
                            "shape_ok": list(got.shape) == [T, D] and got.dtype == dtype,
                            "decompress_exact": True, "rel_err": rel_err(got, ref)})
    print(json.dumps(out))
    """
)

# every configuration the tuner may time (kernels.tune.candidates), on one shape, fp16
CANDIDATES = textwrap.dedent(
    """
    from dass.infer.kernels.tune import candidates
    for orientation in ("output", "input"):
        N, K = 128, 512
        W = prune24(torch.randn(N, K).to(torch.float16) * 0.05, orientation)
        values, meta = to_kernel_layout(W, orientation)
        for T in (1, 2, 4, 8, 16, 32, 64, 128):
            x = torch.randn(T, K, dtype=torch.float16)
            ref = x.double() @ W.double().T
            for cfg in candidates(orientation, T, N, K):
                y = nm24_matmul(x, values, meta, N, K, orientation, config=cfg)
                out.append({"dtype": "torch.float16", "orientation": orientation, "T": T, "cfg": cfg,
                            "shape_ok": list(y.shape) == [T, N], "decompress_exact": True, "rel_err": rel_err(y, ref)})
    print(json.dumps(out))
    """
)


def _run(script: str) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", HEADER + script], env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _check(rows: list[dict]) -> None:
    for r in rows:
        tol = {"torch.float32": 1e-5, "torch.float16": 2e-3, "torch.bfloat16": 1e-2}[r["dtype"]]
        assert r["shape_ok"] and r["decompress_exact"], r
        assert r["rel_err"] < tol, r


@pytest.mark.slow
def test_kernels_match_dense_in_the_interpreter():
    rows = _run(BUCKETS)
    per_t = {1: 3, 2: 4, 3: 4, 4: 4, 8: 4}
    expected = 2 * 2 * 2 * sum(per_t.get(T, 4) for T in (1, 2, 3, 4, 8, 16, 17, 32, 64, 100, 128)) + 2 * 2 * 2
    assert len(rows) == expected
    _check(rows)
    # both orientations at every bucket, in both half-precision types
    seen = {(r["dtype"], r.get("orientation"), r["T"]) for r in rows if "orientation" in r}
    assert len(seen) == 2 * 2 * 11


@pytest.mark.slow
def test_every_tuning_candidate_is_correct_in_the_interpreter():
    rows = _run(CANDIDATES)
    assert {r["T"] for r in rows} == {1, 2, 4, 8, 16, 32, 64, 128}
    _check(rows)
