"""dass.infer.accelerate and the 2:4 kernels.

The layout tests and the refusal test run on CPU; the rest need a CUDA GPU (skipped
otherwise) and compare every accelerated path with the dense-with-zeros computation.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dass.infer.accelerate import AccelerateConfig, AccelerationError, NM24Linear, accelerate, check_device
from dass.infer.kernels.layout import from_kernel_layout, to_kernel_layout

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def prune24(W: torch.Tensor, orientation: str) -> torch.Tensor:
    """Magnitude 2:4 along the given orientation (keeps the 2 largest of each group)."""
    N, K = W.shape
    if orientation == "input":
        g = W.reshape(N, K // 4, 4)
        idx = g.abs().topk(2, dim=2).indices
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True)
    else:
        g = W.reshape(N // 4, 4, K)
        idx = g.abs().topk(2, dim=1).indices
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, idx, True)
    return torch.where(keep.view(N, K), W, torch.zeros((), dtype=W.dtype, device=W.device))


def rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("orientation", ["input", "output"])
@pytest.mark.parametrize("shape", [(64, 128), (4 * 37, 100), (12, 8), (8, 4 * 9)])
def test_kernel_layout_round_trip(orientation, shape):
    torch.manual_seed(0)
    W = prune24(torch.randn(*shape).to(torch.bfloat16), orientation)
    W[:4, :4] = 0  # groups with fewer than 2 nonzeros
    values, meta = to_kernel_layout(W, orientation)
    N, K = shape
    if orientation == "output":
        assert values.shape == (N // 2, K) and meta.shape == ((N // 4 + 1) // 2, K)
    else:
        assert values.shape == (N, K // 2) and meta.shape == (N, (K // 4 + 1) // 2)
    assert meta.dtype == torch.uint8
    assert torch.equal(from_kernel_layout(values, meta, shape, orientation), W)



def test_nibble_encoding_by_hand():
    """The six ways to keep 2 of 4, in both orientations, against the written-out flags
    (bit 0: i0 == 0, bit 1: i0 == 1, bit 2: i1 == 1, bit 3: i1 == 3), two groups per byte."""
    from dass.infer.kernels.layout import decode_positions, encode_positions

    kept = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    expected = [0b0101, 0b0001, 0b1001, 0b0010, 0b1010, 0b1000]
    row = torch.zeros(4 * len(kept), dtype=torch.bfloat16)
    for g, (a, b) in enumerate(kept):
        row[4 * g + a], row[4 * g + b] = 1.0 + g, -2.0 - g
    _, meta_in = to_kernel_layout(row.view(1, -1), "input")
    lo, hi = (meta_in[0] & 15).tolist(), (meta_in[0] >> 4).tolist()
    assert [v for pair in zip(lo, hi) for v in pair] == expected
    _, meta_out = to_kernel_layout(row.view(-1, 1), "output")  # the same groups down one column
    lo, hi = (meta_out[:, 0] & 15).tolist(), (meta_out[:, 0] >> 4).tolist()
    assert [v for pair in zip(lo, hi) for v in pair] == expected
    i0, i1 = decode_positions(torch.tensor(expected))
    assert list(zip(i0.tolist(), i1.tolist())) == kept
    assert encode_positions(i0, i1).tolist() == expected

@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without a GPU")
def test_refuses_without_gpu():
    model = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.copy_(prune24(model[0].weight, "input"))
    with pytest.raises(AccelerationError, match="CUDA GPU"):
        accelerate(model)
    with pytest.raises(AccelerationError):
        check_device()


# ----------------------------------------------------------------------------- GPU


@gpu
def test_refuses_cpu_model_on_gpu_machine():
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(AccelerationError, match="move it to the GPU"):
        accelerate(model)


@gpu
@pytest.mark.parametrize("orientation", ["input", "output"])
@pytest.mark.parametrize("dtype,shape", [
    (torch.bfloat16, (256, 512)), (torch.bfloat16, (4 * 37, 100)), (torch.bfloat16, (1000, 1992)),
    (torch.bfloat16, (11008 // 4, 4096 // 4)), (torch.float16, (4 * 37, 100)),
])
def test_kernels_match_dense(orientation, dtype, shape):
    from dass.infer.kernels import nm24_decompress, nm24_matmul

    torch.manual_seed(1)
    N, K = shape
    W = prune24(torch.randn(N, K, device="cuda", dtype=dtype), orientation)
    values, meta = to_kernel_layout(W, orientation)
    assert torch.equal(nm24_decompress(values, meta, N, K, orientation), W)
    for T in (1, 3, 16, 33, 300):
        x = torch.randn(T, K, device="cuda", dtype=dtype)
        ref = x.double() @ W.double().T
        for cfg in (None, {"SPLIT_K": 2}):
            y = nm24_matmul(x, values, meta, N, K, orientation, config=cfg)
            assert y.shape == (T, N) and y.dtype == dtype
            assert torch.isfinite(y).all()
            assert rel_err(y, ref) < 1e-2, (T, cfg)


@gpu
@pytest.mark.parametrize("orientation", ["input", "output"])
@pytest.mark.parametrize("shape", [(512, 256), (1024, 704), (4 * 37, 100)])
def test_module_paths_match_dense(orientation, shape):
    torch.manual_seed(2)
    N, K = shape
    W = prune24(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.05, orientation)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    paths = ["triton", "decompress", "dense"] + (["cslt"] if orientation == "input" and N % 64 == 0 and K % 64 == 0 else [])
    for path in paths:
        cfg = AccelerateConfig(autotune=False, keep_dense=path == "dense")
        if path == "triton":
            cfg.triton_max_tokens = {"input": 10**9, "output": 10**9}
        else:
            cfg.triton_max_tokens = {"input": 0, "output": 0}
            if path in ("decompress", "dense"):
                cfg.dense_band = (0, 10**9)
        mod = NM24Linear(W, bias, orientation, cfg)
        assert torch.equal(mod.dense_weight(), W)
        for T in (1, 5, 64, 200, 1024, 1024):  # repeated: second call replays a graph
            x = torch.randn(2, T, K, device="cuda", dtype=torch.bfloat16)
            if T > 1:
                assert mod.path_for(2 * T) == path
            ref = F.linear(x.double(), W.double(), bias.double())
            y = mod(x)
            assert y.shape == (2, T, N)
            assert rel_err(y, ref) < 1e-2, (path, T)


class _MLP(nn.Module):
    def __init__(self, d, D):
        super().__init__()
        self.gate_proj = nn.Linear(d, D, bias=False)
        self.up_proj = nn.Linear(d, D, bias=False)
        self.down_proj = nn.Linear(D, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Toy(nn.Module):
    def __init__(self, d=256, D=704, odd=100):
        super().__init__()
        self.mlp = _MLP(d, D)
        self.odd = nn.Linear(d, odd * 4, bias=True)  # 400 rows: not a multiple of 64
        self.dense = nn.Linear(d, d)

    def forward(self, x):
        return self.mlp(x) + self.odd(x)[..., : x.shape[-1]] + self.dense(x)


def _prune_toy(model, gate_orientation):
    with torch.no_grad():
        m = model.mlp
        m.gate_proj.weight.copy_(prune24(m.gate_proj.weight, gate_orientation))
        m.up_proj.weight.copy_(prune24(m.up_proj.weight, gate_orientation))
        m.down_proj.weight.copy_(prune24(m.down_proj.weight, "input"))
        model.odd.weight.copy_(prune24(model.odd.weight, "input"))


class _ActMLP(_MLP):
    """transformers' LlamaMLP / GemmaMLP shape: an ``act_fn`` child, so gate and up get stacked."""

    def __init__(self, d, D, act):
        super().__init__(d, D)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@gpu
@pytest.mark.parametrize("gate_orientation", ["input", "output"])
@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(approximate="tanh"), nn.Tanh()])
def test_gate_up_stacked_matches_dense(gate_orientation, act):
    torch.manual_seed(6)
    mlp = _ActMLP(256, 704, act).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for lin, o in ((mlp.gate_proj, gate_orientation), (mlp.up_proj, gate_orientation), (mlp.down_proj, "input")):
            lin.weight.normal_(0, 0.05)
            lin.weight.copy_(prune24(lin.weight, o))
    ref = _ActMLP(256, 704, act).cuda().to(torch.bfloat16)
    ref.load_state_dict(mlp.state_dict())
    report = accelerate(mlp, config=AccelerateConfig(tune_kernels=False, tuning_cache=False))
    assert report["fused_gate_up"] == [""] and report["graphed_mlps"] == [""]
    assert not hasattr(mlp, "gate_proj") and not hasattr(mlp, "up_proj")
    fused = mlp.dass_gate_up
    assert isinstance(fused, NM24Linear) and (fused.out_features, fused.in_features) == (2 * 704, 256)
    # the activation runs in the Triton kernel for SiLU and tanh-GELU, in torch otherwise
    assert mlp._dass_fused_act == {"SiLU": "silu", "GELU": "gelu_tanh"}.get(type(act).__name__)
    with torch.inference_mode():
        for T in (1, 3, 64, 700, 2048):
            x = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
            assert rel_err(mlp(x), ref(x)) < 2e-2, T


@gpu
@pytest.mark.parametrize("gate_orientation", ["input", "output"])
def test_accelerate_model_matches_dense(gate_orientation):
    torch.manual_seed(3)
    model = _Toy().cuda().to(torch.bfloat16)
    _prune_toy(model, gate_orientation)
    ref_model = _Toy().cuda().to(torch.bfloat16)
    ref_model.load_state_dict(model.state_dict())
    report = accelerate(model, config=AccelerateConfig(tune_kernels=False, tuning_cache=False))
    assert report["replaced"] == {
        "mlp.gate_proj": gate_orientation,
        "mlp.up_proj": gate_orientation,
        "mlp.down_proj": "input",
    }
    assert "odd" in report["skipped"] and "multiple of 64" in report["skipped"]["odd"]
    assert report["graphed_mlps"] == ["mlp"]
    assert isinstance(model.mlp.gate_proj, NM24Linear) and isinstance(model.odd, nn.Linear)
    with torch.inference_mode():
        for T in (1, 7, 16, 100, 333, 2048, 7, 2048):
            x = torch.randn(3, T, 256, device="cuda", dtype=torch.bfloat16)
            assert rel_err(model(x), ref_model(x)) < 2e-2, T
    # capturing the accelerated model in a CUDA graph of one's own works too
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            model(x)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = model(x)
        x.copy_(torch.randn_like(x))
        g.replay()
        assert rel_err(y, ref_model(x)) < 2e-2


@gpu
@pytest.mark.parametrize("orientation", ["input", "output"])
def test_autotuned_module(orientation):
    from dass.infer.accelerate import tuning_log

    torch.manual_seed(5)
    W = prune24(torch.randn(768, 512, device="cuda", dtype=torch.float16), orientation)
    mod = NM24Linear(W, None, orientation, AccelerateConfig(tuning_cache=False))
    for T in (1, 48, 640, 3000):
        x = torch.randn(T, 512, device="cuda", dtype=torch.float16)
        y = mod(x)
        assert mod.path_for(T) in mod.candidates(T)
        assert rel_err(y, x.double() @ W.double().T) < 1e-2
    assert any(k.startswith(f"{orientation} 768x512") for k in tuning_log())


@gpu
def test_manifest_orientation_honoured_and_checked():
    torch.manual_seed(4)
    model = _Toy().cuda().to(torch.bfloat16)
    _prune_toy(model, "output")
    manifest = {"matrices": {
        "mlp.gate_proj.weight": {"pattern": "2:4", "n": 2, "m": 4, "orientation": "output"},
        "mlp.up_proj.weight": {"pattern": "2:4", "n": 2, "m": 4, "orientation": None},
        "mlp.down_proj.weight": {"pattern": "2:4", "n": 2, "m": 4, "orientation": "input"},
        "dense.weight": {"pattern": "unstructured:0.5", "orientation": None},
    }}
    rep = accelerate(model, manifest)
    assert rep["replaced"] == {"mlp.gate_proj": "output", "mlp.up_proj": "output", "mlp.down_proj": "input"}
    assert model.mlp.gate_proj.orientation == "output"
    assert "dense" in rep["skipped"]
    bad = _Toy().cuda().to(torch.bfloat16)
    _prune_toy(bad, "output")
    wrong = {"matrices": {"mlp.gate_proj.weight": {"pattern": "2:4", "n": 2, "m": 4, "orientation": "input"}}}
    with pytest.raises(AccelerationError, match="not 2:4"):
        accelerate(bad, wrong)


@gpu
def test_accelerate_fp32_kept_dense():
    model = _Toy().cuda()
    _prune_toy(model, "input")
    rep = accelerate(model)
    assert rep["replaced"] == {}
    assert "float32" in rep["skipped"]["mlp.gate_proj"]
