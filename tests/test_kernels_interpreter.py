"""The 2:4 Triton kernels' arithmetic on the CPU, through Triton's interpreter.

The kernels normally need a CUDA GPU (tests/test_accelerate.py); with ``TRITON_INTERPRET=1``
Triton runs them with NumPy on CPU tensors, which checks their indexing (compressed values,
2-bit positions, group pairs, split reductions, ragged shapes) on any machine that has the
``triton`` package. Skipped where triton is not installed (CI's CPU environment). The
interpreter has no bfloat16 matrix product, so bf16 is checked on the GEMV (1-token) path
only; the tiled path is checked in fp16 and fp32.
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

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from test_accelerate import prune24, rel_err
    from dass.infer.kernels import nm24_decompress, nm24_matmul, triton_available
    from dass.infer.kernels.layout import to_kernel_layout

    assert triton_available()
    torch.manual_seed(0)
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for orientation in ("output", "input"):
            for N, K in ((64, 128), (4 * 37, 100), (256, 512)):
                W = prune24(torch.randn(N, K).to(dtype) * 0.05, orientation)
                W[:4, :4] = 0  # groups with fewer than two nonzeros
                values, meta = to_kernel_layout(W, orientation)
                exact = torch.equal(nm24_decompress(values, meta, N, K, orientation), W)
                for T in ((1,) if dtype == torch.bfloat16 else (1, 3, 17, 40)):
                    x = torch.randn(T, K, dtype=dtype)
                    ref = x.double() @ W.double().T
                    # default (output GEMV: loads one block ahead), none ahead with a split reduction,
                    # and at T == 1 several blocks per program with loads one and two blocks ahead
                    cfgs = (None, {"SPLIT_K": 2, "PREFETCH": 0}) + (({"BLOCK_K": 64, "SPLIT_K": 2, "PREFETCH": 1},
                                                      {"BLOCK_K": 32, "PREFETCH": 2}) if T == 1 else ())
                    for cfg in cfgs:
                        y = nm24_matmul(x, values, meta, N, K, orientation, config=cfg)
                        out.append({"dtype": str(dtype), "orientation": orientation, "N": N, "K": K, "T": T,
                                    "split": cfg is not None, "shape_ok": list(y.shape) == [T, N] and y.dtype == dtype,
                                    "decompress_exact": exact, "rel_err": rel_err(y, ref)})
    # act(g) * u from the stacked [g | u], against torch
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


def test_kernels_match_dense_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 * 3 * (2 * (4 + 3 * 2) + 4) + 2 * 2 * 2
    for r in rows:
        tol = {"torch.float32": 1e-5, "torch.float16": 2e-3, "torch.bfloat16": 1e-2}[r["dtype"]]
        assert r["shape_ok"] and r["decompress_exact"], r
        assert r["rel_err"] < tol, r
