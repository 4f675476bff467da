"""The CUDA 2:4 kernels' CPU side: the packed fragment layouts (bit for bit, through an
independent reference decoder), the configuration lists against the compiled ones, the
no-toolchain fallback, and NM24Linear's CUDA branch (with the kernel stood in by a torch
product, since CI has no GPU). The kernels themselves are checked on the GPU by
tests/test_infer_gpu.py and benchmarks/gpu_kernels.py."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dass.infer import cuda as cu
from dass.infer.cuda import layout as L

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "src" / "dass" / "infer" / "cuda"


def random_24(N, K, orientation, dtype, seed=0, zeros=False):
    """A random 2:4 matrix and its keep-mask; ``zeros``: some kept weights are exactly 0."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g).to(dtype)
    if orientation == "input":
        s = torch.rand(N, K // 4, 4, generator=g).argsort(-1)[..., :2]
        m = torch.zeros(N, K // 4, 4, dtype=torch.bool).scatter_(-1, s, True).reshape(N, K)
    else:
        s = torch.rand(N // 4, K, 4, generator=g).argsort(-1)[..., :2]
        m = torch.zeros(N // 4, K, 4, dtype=torch.bool).scatter_(-1, s, True).permute(0, 2, 1).reshape(N, K)
    W = W.masked_fill(~m, 0)
    if zeros:
        W = W.masked_fill(torch.rand(N, K, generator=g) < 0.1, 0)  # kept places holding 0
    return W, m


SHAPES = {"input": [(16, 64), (48, 128), (256, 192)], "output": [(32, 32), (96, 64), (64, 160)]}


@pytest.mark.parametrize("orientation", ["input", "output"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pack_unpack_bit_exact(orientation, dtype):
    """unpack(pack(W)) is W bit for bit (signs, -0.0 and subnormals included), for every
    shape class, and the packed tensors are 56.25% of the dense bytes."""
    for i, (N, K) in enumerate(SHAPES[orientation]):
        W, m = random_24(N, K, orientation, dtype, seed=i, zeros=i == 1)
        if i == 2:  # extreme bit patterns: negative zero, a subnormal, the largest finite value
            idx = m.nonzero()[:3]
            W[idx[0, 0], idx[0, 1]] = -0.0
            W[idx[1, 0], idx[1, 1]] = torch.finfo(dtype).tiny / 4
            W[idx[2, 0], idx[2, 1]] = torch.finfo(dtype).max
        v, me = L.pack(W, orientation, m)
        assert v.dtype == me.dtype == torch.int32
        assert v.numel() * 4 + me.numel() * 4 == L.packed_bytes(N, K) == N * K * 2 * 9 // 16
        back = L.unpack(v, me, (N, K), orientation, dtype)
        assert back.dtype == dtype
        assert torch.equal(back.view(torch.int16), W.view(torch.int16))
        # without a mask the kept places come from the nonzeros (all 2-of-4 when none is 0)
        if i != 1:
            v2, me2 = L.pack(W, orientation)
            assert torch.equal(L.unpack(v2, me2, (N, K), orientation, dtype).view(torch.int16),
                               W.view(torch.int16))


def test_input_fragment_positions_by_hand():
    """Values and codes land where the layout's docstring says: for lane 4g+t of tile 0,
    K-step 0, register 0 holds row g's group t (v0 | v1 << 16), register 3 row g+8's group
    4+t; the metadata word of lane 4g (t=0: step 0, q=0) holds row g's groups 0-3 in bits
    0-15, 4 bits a group, and the word of lane 4g+2 (t=2) the same for step 1."""
    N, K = 16, 64
    m = torch.zeros(N, K, dtype=torch.bool)
    m.view(N, K // 4, 4)[:, :, 1] = True
    m.view(N, K // 4, 4)[:, :, 3] = True  # code 1 | 3 << 2 = 0xd everywhere ...
    g, t = 2, 1
    m[g, 4:8] = torch.tensor([True, True, False, False])  # ... but row g, group 1: code 0 | 1 << 2 = 4
    m[g, 32 + 8:32 + 12] = torch.tensor([False, False, True, True])  # step 1, group 2: 2 | 3 << 2 = 0xe
    W = torch.zeros(N, K, dtype=torch.bfloat16)
    W[m] = 1.0
    W[g, 4 * t + 1] = 5.0            # row g, group t = 1, second kept place (v1)
    W[g + 8, 4 * (4 + t) + 1] = 7.0  # row g+8, group 4+t, first kept place (v0)
    v, me = L.pack(W, "input", m)
    bits = lambda x: int(torch.tensor(x, dtype=torch.bfloat16).view(torch.int16)) & 0xFFFF  # noqa: E731
    lane = 4 * g + t
    assert int(v[0, 0, lane, 0]) & 0xFFFFFFFF == bits(1.0) | bits(5.0) << 16
    assert int(v[0, 0, lane, 3]) & 0xFFFFFFFF == bits(7.0) | bits(1.0) << 16
    assert int(me[0, 0, 4 * g]) & 0xFFFF == 0xDD4D       # groups 0..3 of row g: d, 4, d, d
    assert (int(me[0, 0, 4 * g]) >> 16) & 0xFFFF == 0xDDDD  # row g+8
    assert int(me[0, 0, 4 * g + 2]) & 0xFFFF == 0xDEDD   # step 1: group 2 of row g is 0xe


def test_output_fragment_positions_by_hand():
    """Output orientation: lane (g, t) of tile 0, K-step 0, half 0 holds group g's kept
    values at columns 2t, 2t+1 (register 0: v0, register 1: v1) and their codes in bits 0-7."""
    N, K = 32, 32
    W = torch.zeros(N, K, dtype=torch.float16)
    m = torch.zeros(N, K, dtype=torch.bool)
    m.view(N // 4, 4, K)[:, 0] = True
    m.view(N // 4, 4, K)[:, 2] = True  # rows 4g and 4g+2 kept: code 0 | 2 << 2 = 8
    g, t = 3, 2
    W[4 * g, 2 * t] = 2.0
    W[4 * g + 2, 2 * t] = 3.0
    W[4 * g + 2, 2 * t + 1] = -4.0
    v, me = L.pack(W, "output", m)
    bits = lambda x: int(torch.tensor(x, dtype=torch.float16).view(torch.int16)) & 0xFFFF  # noqa: E731
    lane = 4 * g + t
    assert int(v[0, 0, 0, lane, 0]) & 0xFFFFFFFF == bits(2.0)
    assert int(v[0, 0, 0, lane, 1]) & 0xFFFFFFFF == bits(3.0) | bits(-4.0) << 16
    assert int(me[0, 0, lane]) & 0xFF == 0x88


@pytest.mark.parametrize("orientation,shape", [("input", (8, 64)), ("input", (16, 96)), ("output", (16, 32)),
                                               ("output", (32, 48)), ("sideways", (32, 64))])
def test_shapes_refused_with_a_reason(orientation, shape):
    why = L.check_shape(*shape, orientation)
    assert why and (orientation in why or "orientation" in why)
    with pytest.raises(ValueError):
        L.pack(torch.zeros(shape, dtype=torch.bfloat16), orientation)


def test_pack_refuses_a_mask_that_is_not_2_of_4():
    W, m = random_24(16, 64, "input", torch.bfloat16)
    m[0, :4] = True
    with pytest.raises(ValueError, match="2 of every 4"):
        L.pack(W, "input", m)
    W, m = random_24(16, 64, "input", torch.bfloat16)
    with pytest.raises(ValueError, match="16-bit"):
        L.pack(W.float(), "input", m)


def _cases(text: str, macro: str) -> list[tuple[int, ...]]:
    """The argument tuples of every use of ``macro(...)`` in a source (not its #define)."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#define"))
    return [tuple(int(a) for a in m.split(",")) for m in re.findall(rf"\b{macro}\(([0-9, ]+)\)", body)]


def _split_by_orientation(text: str, macro: str) -> dict[str, list[tuple[int, ...]]]:
    a, b = text.split("#else")
    return {"input": _cases(a, macro), "output": _cases(b.split("#endif")[0], macro)}


def _marked(text: str, marker: str, macro: str) -> list[tuple[int, ...]]:
    """The ``macro(...)`` uses from the comment line ``// {marker}`` to the next preprocessor line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"// {marker}")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("#"))
    return _cases("\n".join(lines[start:end]), macro)


def test_python_configs_equal_the_compiled_ones():
    """cu.CONFIGS / cu.SMEM_CONFIGS list exactly what the .cuh dispatch switches compile: a
    configuration offered but not compiled would fail at launch; one compiled but not offered
    is dead code."""
    text = (CUDA_DIR / "nm24_dispatch.cuh").read_text()
    reg = {o: _marked(text, f"CONFIGS {o}", "DASS24_CASE") for o in ("input", "output")}
    glu = {o: _marked(text, f"GLU_CONFIGS {o}", "DASS24_GLU_CASE") for o in ("input", "output")}
    assert len(_cases(text, "DASS24_CASE")) == sum(map(len, reg.values()))  # every use under a marker
    assert len(_cases(text, "DASS24_GLU_CASE")) == sum(map(len, glu.values()))
    deep = {o: _marked(text, f"DEEP_CONFIGS {o}", "DASS24_DEEP_CASE") for o in ("input", "output")}
    assert len(_cases(text, "DASS24_DEEP_CASE")) == sum(map(len, deep.values()))
    smem = _split_by_orientation((CUDA_DIR / "nm24_dispatch_smem.cuh").read_text(), "DASS24_SMEM_CASE")
    for ori in ("input", "output"):
        assert sorted(reg[ori]) == sorted(cu.CONFIGS[ori]) and len(set(reg[ori])) == len(reg[ori])
        assert sorted(glu[ori]) == sorted(cu.GLU_CONFIGS[ori]) and len(set(glu[ori])) == len(glu[ori])
        assert glu[ori] and all(c in cu.CONFIGS[ori] and c[0] % 2 == 0 for c in glu[ori])  # GLU: even mt
        # the deep variant: a 57-128-token twin of compiled configurations (5 stages of 16 KB at most)
        assert sorted(deep[ori]) == sorted(cu.DEEP_CONFIGS[ori]) and len(set(deep[ori])) == len(deep[ori])
        assert deep[ori] and all(c in cu.CONFIGS[ori] and c[1] >= 8 and c[1] * 8 * c[2] * 64 <= 16384
                                 for c in deep[ori])
        assert sorted(smem[ori]) == sorted(cu.SMEM_CONFIGS[ori]) and len(set(smem[ori])) == len(smem[ori])
        assert all(nt % wn == 0 for _, wn, nt, _ in cu.SMEM_CONFIGS[ori])
    wg = _cases((CUDA_DIR / "nm24_dispatch_wg.cuh").read_text(), "DASS24_WG_CASE")
    assert sorted(wg) == sorted(cu.WG_CONFIGS) and len(set(wg)) == len(wg)
    wgs = _cases((CUDA_DIR / "nm24_dispatch_wgs.cuh").read_text(), "DASS24_WGS_CASE")
    assert sorted(wgs) == sorted(cu.WGS_CONFIGS) and len(set(wgs)) == len(wgs)
    assert all(nt >= 2 for _, _, nt, _, _ in cu.WGS_CONFIGS)  # wgmma's N is 16 at least
    assert all(cu.wgs_stages(*c) >= 3 for c in cu.WGS_CONFIGS)  # the kernel's static_assert


def test_wgmma_wrappers_are_generated_for_every_width():
    """nm24_wgmma_ops.cuh is scripts/gen_wgmma.py's output (edited by hand it would drift)
    and has a wrapper for every token width WG_CONFIGS compiles, in both dtypes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_wgmma", ROOT / "scripts" / "gen_wgmma.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = (CUDA_DIR / "nm24_wgmma_ops.cuh").read_text()
    for n in {nt * 8 // ts for _, _, ts, nt, _ in cu.WG_CONFIGS}:
        assert n in gen.WIDTHS
        for dt in ("bf16", "f16"):
            assert f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{dt}.{dt} " in text
            assert text.count(f"m64n{n}k16.f32.{dt}") == 1
    body = "".join(gen.wrapper(n, "bf16", "__nv_bfloat16") for n in gen.WIDTHS)
    assert body.split("template <>")[1] in text
    for n in {nt * 8 for _, _, nt, _, _ in cu.WGS_CONFIGS}:  # the sparse ones, both selectors
        assert n in gen.WIDTHS
        for dt in ("bf16", "f16"):
            assert text.count(f"wgmma.mma_async.sp.sync.aligned.m64n{n}k32.f32.{dt}.{dt} ") == 2
    sparse = gen.sparse_wrapper(16, "f16", "__half")
    assert sparse in text and ", 0, p, 1, 1, 0;" in sparse and ", 1, p, 1, 1, 0;" in sparse


def test_every_source_and_header_is_listed():
    on_disk = {p.name for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cpp", ".cuh", ".h")}
    assert on_disk == set(cu.SOURCES) | set(cu.HEADERS)


@pytest.mark.parametrize("orientation", ["input", "output"])
@pytest.mark.parametrize("NK", [(22016, 4096), (4096, 11008), (8192, 28672), (256, 1024)])
def test_candidates_fit_the_bucket(orientation, NK):
    """Every candidate is compiled for the call's token tiles and its K-slices hold whole
    pipeline stages; both kernels are offered from 16 tokens on, the register one below."""
    N, K = NK
    for T in (1, 2, 3, 8, 9, 16, 33, 64, 100, 128):
        nt = cu.nt_for(T)
        assert nt * 8 >= T and (nt == 1 or (nt // 2) * 8 < T)
        cands = cu.candidates(orientation, T, N, K)
        assert cands, (orientation, T, N, K)
        kinds = {c["kind"] for c in cands}
        assert "reg" in kinds and (("smem" in kinds) == (nt >= 2 and any(
            c[2] == nt for c in cu.SMEM_CONFIGS[orientation])))
        for c in cands:
            if c["kind"] == "reg":
                assert (c["mt"], nt, c["ks"], c.get("wr", cu.WARPS), c.get("wt", 1)) in cu.CONFIGS[orientation]
            else:
                assert (c["mt"], c["wn"], nt, c["ks"]) in cu.SMEM_CONFIGS[orientation]
            ksteps = K // 32
            assert ksteps % c["ks"] == 0 and ksteps // c["splits"] >= c["ks"]
        d = cu.default_config(orientation, T, N, K)
        assert d in cands and d["kind"] == "reg"
        with_wg = cu.candidates(orientation, T, N, K, wg=True)
        wgs = [c for c in with_wg if c["kind"] == "wg"]
        sps = [c for c in with_wg if c["kind"] == "wgs"]
        assert with_wg[:len(cands)] == cands
        if orientation == "input" or nt == 1:
            assert not wgs
        else:
            assert wgs and all((c["mt"], c["wg"], c["ts"], nt, c["ks"]) in cu.WG_CONFIGS for c in wgs)
            assert all((K // 32) // c["splits"] >= 2 * c["ks"] for c in wgs)
        if orientation == "output" or nt == 1:
            assert not sps
        else:  # the sparse-wgmma kernel: input orientation from 9 tokens on
            assert sps and all((c["mt"], c["wg"], nt, c["ks"], c["ws"]) in cu.WGS_CONFIGS for c in sps)
            assert all((K // 32) // c["splits"] >= 2 * c["ks"] for c in sps) and any(c["splits"] == 1 for c in sps)
    assert cu.candidates(orientation, 8, N, 32 * 3) == []  # K/32 = 3: no ks divides it


def test_register_kernel_offers_wave_balanced_slices_from_33_tokens():
    """With split-K finished inside the kernel a slice is cheap, so at 33-128 tokens the
    register kernel is also timed with slice counts that fill one or two blocks an SM evenly
    (7B gate+up, mt2: 172 row blocks on 132 SMs -> 2 and 3 slices); below, only powers of two."""
    sms = 132
    for T, want in ((128, {2, 3}), (64, {2, 3})):
        got = {c["splits"] for c in cu.candidates("input", T, 22016, 4096, sms, wg=False)
               if c["kind"] == "reg" and c["mt"] == 2 and "wr" not in c}
        assert want <= got, (T, got)
    small = {c["splits"] for c in cu.candidates("input", 16, 22016, 4096, sms, wg=False) if c["kind"] == "reg"}
    assert all(s & (s - 1) == 0 for s in small), small


def test_smem_occupancy_rule_matches_the_kernel():
    """The Python mirror of SmemShape::MINB: two blocks an SM only with few accumulators."""
    assert cu.smem_blocks_per_sm("input", 4, 4, 16, 4) == 1   # 64 accumulators a thread
    assert cu.smem_blocks_per_sm("input", 2, 1, 2, 2) == 2    # small tiles, small stage
    assert cu.smem_blocks_per_sm("output", 2, 1, 8, 4) == 1   # 64 accumulators a thread
    assert cu.smem_blocks("input", 22016, 4, 4) == 22016 // 16 // 8
    assert cu.smem_blocks("output", 4096, 2, 1) == 4096 // 32 // 16


def test_no_toolchain_is_a_reason_not_an_error(monkeypatch):
    cu.load.cache_clear()
    try:
        monkeypatch.setenv("DASS_CUDA_KERNELS", "0")
        assert cu.load() is None and cu.unavailable_reason() == "DASS_CUDA_KERNELS=0"
        cu.load.cache_clear()
        monkeypatch.delenv("DASS_CUDA_KERNELS")
        if not torch.cuda.is_available():
            assert cu.load() is None and cu.unavailable_reason() == "no CUDA GPU"
            assert not cu.available()
            assert not cu.wg_supported()
            with pytest.raises(RuntimeError, match="unavailable: no CUDA GPU"):
                cu.runner(torch.zeros(1), torch.zeros(1), None, 16, "input", {"mt": 1, "ks": 2, "splits": 1})
    finally:
        cu.load.cache_clear()


def test_import_dass_needs_no_compiler():
    """Importing dass (and dass.infer.cuda) must not import torch's C++ extension builder."""
    code = ("import sys, dass, dass.infer, dass.infer.cuda; "
            "print('torch.utils.cpp_extension' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_gpu_kernels_script_dry_run(tmp_path):
    import json

    out = tmp_path / "k.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), "--dry-run", "--out", str(out),
                        "--tokens", "1,8,128"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["T"] for row in rows] == [1, 8, 128]
    assert "| 7b | down | input |" in r.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), "--dry-run", "--out",
                          str(out), "--shapes", "9b"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert bad.returncode != 0 and "unknown shape" in bad.stderr


def test_gpu_kernels_config_names():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_kernels import config_name
    finally:
        sys.path.pop(0)
    assert config_name({"kind": "smem", "mt": 2, "wn": 4, "ks": 2, "splits": 3}) == "smem-mt2-wn4-ks2-s3"
    assert config_name({"mt": 1, "ks": 4, "splits": 1}) == "reg-mt1-ks4-s1"
    assert config_name({"kind": "wgs", "mt": 2, "wg": 1, "ks": 4, "ws": 0, "splits": 8}) == "wgs-mt2-wg1-ks4-s8"
    assert config_name({"kind": "wgs", "mt": 1, "wg": 2, "ks": 2, "ws": 1, "splits": 1}) == "wgs-mt1-wg2-ks2-ws-s1"


@pytest.fixture
def cpu_modules(monkeypatch):
    """Let NM24Linear accept CPU tensors (its reference path)."""
    import dass.infer.device as device
    import dass.infer.nm24_linear as nl

    monkeypatch.setattr(device, "interpreting", lambda: True)
    monkeypatch.setattr(nl, "interpreting", lambda: True)


@pytest.mark.parametrize("kind", ["reg", "smem"])
def test_nm24linear_cuda_branch_runs_the_bound_runner(cpu_modules, monkeypatch, kind):
    """NM24Linear's runner for the 'cuda' path calls the kernel bound by cu.runner with this
    module's packed weights and bias, once per call (a torch product stands in for the kernel:
    it decodes the packed layout, so wrong operands would give a wrong result)."""
    from dass.infer import dispatch
    from dass.infer.config import AccelerateConfig
    from dass.infer.nm24_linear import NM24Linear

    W, m = random_24(64, 128, "input", torch.bfloat16, seed=3)
    bias = torch.randn(64).to(torch.bfloat16)
    mod = NM24Linear(W, bias, "input", AccelerateConfig(graphs=False, tuning_cache=False))
    mod.cu_values, mod.cu_meta = L.pack(W, "input", m)
    cfg = {"kind": kind, "mt": 1, "ks": 2, "splits": 1, **({"wn": 1} if kind == "smem" else {})}
    calls = []

    def fake_runner(values, meta, b, N, orientation, config):
        assert config == cfg and orientation == "input" and N == 64 and b is mod.bias
        Wd = L.unpack(values, meta, (N, values.numel() * 4 // N), orientation, torch.bfloat16)

        def run(x):
            calls.append(x.shape[0])
            return torch.nn.functional.linear(x.float(), Wd.float(), b.float()).to(x.dtype)
        return run

    monkeypatch.setattr(cu, "runner", fake_runner)
    import dass.infer.nm24_linear as nl

    monkeypatch.setattr(nl, "decide", lambda mod_, T: dispatch.Decision("cuda", cfg, source="measured"))
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    y = mod(x)
    ref = torch.nn.functional.linear(x.float(), W.float(), bias.float()).to(torch.bfloat16)
    assert y.shape == (2, 3, 64) and torch.equal(y, ref)
    assert mod(x).shape == (2, 3, 64) and calls == [6, 6]


@pytest.mark.parametrize("one_copy", [True, False])
def test_one_copy_keeps_only_the_cuda_layout(cpu_modules, monkeypatch, one_copy):
    """With the CUDA layout built and AccelerateConfig.one_copy, a module stores that layout
    alone (56.25% of the dense bytes plus nothing else), its decompress path and dense_weight
    rebuild W from it (cu.unpack, stood in by the reference decoder), and the memory
    accounting counts it; one_copy=False also keeps the Triton layout."""
    import dass.infer.nm24_linear as nl
    from dass.infer import dispatch
    from dass.infer.config import AccelerateConfig
    from dass.infer.roofline import weight_bytes

    def fake_pack(self, w, keep):
        self.cu_values, self.cu_meta = L.pack(w, self.orientation, keep)
        return None

    monkeypatch.setattr(nl.NM24Linear, "_pack_cuda", fake_pack)
    monkeypatch.setattr(cu, "unpack", lambda v, m, N, K, o, dt: L.unpack(v, m, (N, K), o, dt))
    for orientation in ("input", "output"):
        W, m = random_24(64, 128, orientation, torch.bfloat16, seed=5)
        mod = nl.NM24Linear(W, None, orientation, AccelerateConfig(graphs=False, tuning_cache=False, one_copy=one_copy))
        stored = sum(t.numel() * t.element_size() for t in mod.stored_tensors())
        assert (mod.values is None) == one_copy and mod.cslt is None
        assert stored == (1 if one_copy else 2) * 64 * 128 * 2 * 9 // 16
        assert weight_bytes(torch.nn.Sequential(mod))["stored"] == stored
        assert mod.weight_dtype == torch.bfloat16 and mod.weight_device.type == "cpu"
        assert torch.equal(mod.dense_weight().view(torch.int16), W.view(torch.int16))
        monkeypatch.setattr(nl, "decide", lambda mod_, T: dispatch.Decision("decompress", None, source="measured"))
        x = torch.randn(5, 128).to(torch.bfloat16)
        assert torch.equal(mod(x), torch.nn.functional.linear(x, W))
        if one_copy:
            assert "triton" not in mod.candidates(8) and "cslt" not in mod.candidates(512)


def test_calls_past_128_tokens_run_in_equal_slices_of_the_128_bucket():
    """Past MAX_TOKENS a call runs as equal slices that all land in the 65-128 token bucket, so
    the configuration tuned for that bucket fits every slice; past CHUNKED_MAX_TOKENS the CUDA
    path is no candidate (decompress + cuBLAS is)."""
    for T in range(1, cu.CHUNKED_MAX_TOKENS + 1):
        n, step = cu.slices(T)
        assert n * step >= T and (n - 1) * step < T and step <= cu.MAX_TOKENS
        assert n == -(-T // cu.MAX_TOKENS)
        if T > cu.MAX_TOKENS:  # the shorter last slice runs the first one's configuration (nt_min)
            assert cu.nt_for(step) == cu.nt_for(cu.MAX_TOKENS) and T - (n - 1) * step >= 1
    N, K = 22016, 4096
    for orientation in ("input", "output"):
        long = cu.candidates(orientation, 300, N, K, wg=True)
        assert long and long == [c for c in cu.candidates(orientation, 100, N, K, wg=True) if c["kind"] == "reg"]
        assert cu.candidates(orientation, cu.CHUNKED_MAX_TOKENS + 1, N, K) == []
        assert cu.default_config(orientation, 256, N, K) in cu.candidates(orientation, 256, N, K)


def test_smem_kernel_can_be_turned_off_alone(monkeypatch):
    """DASS_CUDA_SMEM=0 drops only the shared-memory kernel's candidates (how a suspected
    kernel is ruled out on a GPU without rebuilding): the register and wgmma ones stay."""
    N, K, T = 4096, 4096, 16
    full = cu.candidates("output", T, N, K, wg=True)
    assert {c["kind"] for c in full} == {"reg", "smem", "wg"}
    monkeypatch.setenv("DASS_CUDA_SMEM", "0")
    off = cu.candidates("output", T, N, K, wg=True)
    assert off == [c for c in full if c["kind"] != "smem"]


def test_sparse_wgmma_kernel_can_be_turned_off_alone(monkeypatch):
    """DASS_CUDA_WGS=0 drops only the sparse-wgmma kernel's candidates (input orientation):
    the register and shared-memory ones stay, and the output orientation is untouched."""
    monkeypatch.setattr(cu, "wg_supported", lambda: True)  # as on an H100 / H200
    N, K, T = 4096, 4096, 64
    full = cu.candidates("input", T, N, K)
    assert {c["kind"] for c in full} == {"reg", "smem", "wgs"}
    out_full = cu.candidates("output", T, N, K)
    monkeypatch.setenv("DASS_CUDA_WGS", "0")
    assert cu.candidates("input", T, N, K) == [c for c in full if c["kind"] != "wgs"]
    assert cu.candidates("output", T, N, K) == out_full


def test_sparse_wgmma_runner_binds_its_arguments(monkeypatch):
    """cu.runner for a "wgs" configuration calls the extension's mm_wgs with the module's
    operands and the configuration's (mt, wg, ks, splits), and refuses the output orientation."""
    calls = []

    class Ext:
        def mm_wgs(self, *args):
            calls.append(args)
            return "y"

    monkeypatch.setattr(cu, "load", lambda: Ext())
    cfg = {"kind": "wgs", "mt": 2, "wg": 1, "ks": 4, "ws": 1, "splits": 3}
    run = cu.runner("V", "M", None, 4096, "input", cfg)
    assert run("x") == "y"
    assert calls == [("x", "V", "M", None, 4096, 2, 1, 4, 1, 3, cu.WG_SWAP)]
    with pytest.raises(ValueError, match="input orientation only"):
        cu.runner("V", "M", None, 4096, "output", cfg)


def test_deep_variant_is_offered_only_when_asked(monkeypatch):
    """DASS_CUDA_DEEP=1 adds the deep twin of each DEEP_CONFIGS configuration at 57-128 tokens
    (same splits), and nothing below 57 tokens; without it, none."""
    monkeypatch.delenv("DASS_CUDA_DEEP", raising=False)
    assert not any(c.get("deep") for c in cu.candidates("input", 128, 22016, 4096, wg=False))
    monkeypatch.setenv("DASS_CUDA_DEEP", "1")
    for ori, N, K in (("input", 22016, 4096), ("output", 22016, 4096), ("input", 4096, 11008)):
        for T in (64, 128):
            cands = cu.candidates(ori, T, N, K, wg=False)
            deep = [c for c in cands if c.get("deep")]
            assert deep, (ori, T)
            plain = {tuple(sorted(c.items())) for c in cands if not c.get("deep")}
            assert all(tuple(sorted({k: v for k, v in c.items() if k != "deep"}.items())) in plain for c in deep)
        assert not any(c.get("deep") for c in cu.candidates(ori, 16, N, K, wg=False))
    # the deep variant has no GLU epilogue: never a GLU candidate (gate+up input at 64 tokens has
    # both a GLU configuration and its deep twin)
    glu = cu.glu_candidates("input", 64, 22016, 4096)
    assert glu and not any(c.get("deep") for c in glu)
