"""benchmarks/gpu_step_profile.py: its kernel categories, and --dry-run end to end on the CPU
(tiny model, CPU operator times), so the GPU call that runs it spends no time on plumbing."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_step_profile import category  # noqa: E402


def test_kernel_names_fall_in_their_category():
    assert category("void dass24::nm24_kernel<__nv_bfloat16, 0, 1, 2, 4, 4, 1, 3>(dass24::Params)") == "2:4 products"
    assert category("void dass24::finish_kernel<__nv_bfloat16>(float const*, void const*, void*, int, long)") \
        == "split-K finish"
    assert category("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "Inductor / Triton"
    assert category("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") \
        == "zero-fill / memset"
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "dense GEMM"
    assert category("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert category("Memcpy DtoD (Device -> Device)") == "copies"
    assert category("void dass24::unpack_in_kernel(uint4 const*, unsigned int const*, unsigned short*)") == "2:4 unpack"
    assert category("something_else") == "other"


def test_dry_run_profiles_each_phase(tmp_path):
    out = tmp_path / "sp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step_profile.py"), "--dry-run",
                          "--scopes", "dense,all", "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ph = json.loads(out.read_text())["phases"]
    assert list(ph) == ["dense", "all"]
    # calls per step (counts, not times, which depend on the machine): one 2:4 operator a step
    # for each accelerated module once the model is accelerated, none before
    assert ph["dense"]["accelerated_modules"] == 0
    assert ph["dense"]["per_step_calls"].get("2:4 products", 0) == 0
    n = ph["all"]["accelerated_modules"]
    assert n > 0 and ph["all"]["per_step_calls"]["2:4 products"] == n
    assert "| step wall |" in res.stdout


def test_scopes_must_start_dense():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step_profile.py"), "--dry-run",
                          "--scopes", "all"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 2 and "must start with dense" in res.stderr
