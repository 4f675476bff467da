"""Compressed N:M storage: bit-exact round trips, validation, safetensors helpers (CPU)."""

import json

import pytest
import torch

from dass.io.sparse_format import (
    MASK_SUFFIX,
    VALUES_SUFFIX,
    compress_nm,
    compressed_shapes,
    decompress_nm,
    detect_orientation,
    is_nm,
    load_compressed,
    nm_mask,
    pack_bits,
    save_compressed,
    unpack_bits,
)

PATTERNS = [(1, 4), (2, 4), (3, 4), (4, 8), (6, 8), (2, 8), (3, 5), (1, 2)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def random_nm(out, inp, n, m, orientation, dtype, gen, extra_zeros=0.0):
    """A random N:M matrix (kept weights nonzero unless extra_zeros zeroes some of them)."""
    W = torch.randn(out, inp, generator=gen).to(dtype)
    W = torch.where(W == 0, torch.ones((), dtype=dtype), W)
    if orientation == "input":
        r = torch.rand(out, inp // m, m, generator=gen).argsort(-1)[..., :n]
        keep = torch.zeros(out, inp // m, m, dtype=torch.bool).scatter_(2, r, True).view(out, inp)
    else:
        r = torch.rand(out // m, m, inp, generator=gen).argsort(1)[:, :n]
        keep = torch.zeros(out // m, m, inp, dtype=torch.bool).scatter_(1, r, True).view(out, inp)
    if extra_zeros:
        keep &= torch.rand(out, inp, generator=gen) >= extra_zeros
    return torch.where(keep, W, torch.zeros((), dtype=dtype)), keep


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("orientation", ["input", "output"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_bit_exact(n, m, orientation, dtype):
    gen = torch.Generator().manual_seed(n * 100 + m)
    out, inp = m * 7, m * 5
    W, _ = random_nm(out, inp, n, m, orientation, dtype, gen)
    parts = compress_nm(W, n, m, orientation)
    shapes = compressed_shapes(W.shape, n, m, orientation)
    assert tuple(parts["values"].shape) == shapes["values"]
    assert parts["values"].dtype == dtype and parts["mask"].dtype == torch.uint8
    assert parts["mask"].numel() == (out * inp + 7) // 8
    back = decompress_nm(parts, W.shape, n, m, orientation)
    assert bits_equal(back, W)


@pytest.mark.parametrize("orientation", ["input", "output"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_groups_with_fewer_nonzeros_and_signed_zeros(orientation, dtype):
    gen = torch.Generator().manual_seed(7)
    W, _ = random_nm(24, 40, 2, 4, orientation, dtype, gen, extra_zeros=0.5)
    W[0:4] = 0  # whole rows of zeros: groups with no nonzero at all
    W[0, 1] = -0.0  # a negative zero in a group with room for it survives bit-exactly
    parts = compress_nm(W, 2, 4, orientation)
    back = decompress_nm(parts, W.shape, 2, 4, orientation)
    assert torch.equal(back, W)
    # positions are deterministic: same input -> same bytes
    again = compress_nm(W.clone(), 2, 4, orientation)
    assert torch.equal(again["mask"], parts["mask"])
    assert bits_equal(again["values"], parts["values"])
    assert bits_equal(back, W)
    assert torch.signbit(back[0, 1])


def test_all_zero_and_exact_layout():
    W = torch.zeros(8, 8)
    parts = compress_nm(W, 2, 4, "input")
    # earliest positions chosen for all-zero groups: bits 0,1 of every group of 4
    keep = unpack_bits(parts["mask"], 64).view(8, 2, 4)
    assert keep[..., :2].all() and not keep[..., 2:].any()
    # output orientation: values row 2g+s holds the s-th kept row of group g per column
    W = torch.zeros(8, 3)
    W[1, 0], W[3, 0] = 1.0, 2.0  # group 0, column 0 keeps rows 1 and 3
    W[4, 2], W[6, 2] = 3.0, 4.0  # group 1, column 2 keeps rows 4 and 6
    v = compress_nm(W, 2, 4, "output")["values"]
    assert v.shape == (4, 3)
    assert v[0, 0] == 1 and v[1, 0] == 2 and v[2, 2] == 3 and v[3, 2] == 4


def test_explicit_mask_and_not_nm_refused():
    gen = torch.Generator().manual_seed(3)
    W, keep = random_nm(16, 16, 2, 4, "input", torch.float32, gen, extra_zeros=0.3)
    full_keep = nm_mask(W, 2, 4, "input")
    assert bool((full_keep | ~(W != 0)).all())
    parts = compress_nm(W, 2, 4, "input", mask=full_keep)
    assert torch.equal(decompress_nm(parts, W.shape, 2, 4, "input"), W)
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        compress_nm(torch.randn(8, 8), 2, 4, "input")
    with pytest.raises(ValueError, match="not a multiple"):
        compress_nm(torch.zeros(8, 6), 2, 4, "input")
    with pytest.raises(ValueError, match="orientation"):
        compress_nm(torch.zeros(8, 8), 2, 4, "rows")
    with pytest.raises(ValueError, match="invalid N:M"):
        compress_nm(torch.zeros(8, 8), 5, 4, "input")
    bad = full_keep.clone()
    bad[0, 0] = ~bad[0, 0]
    with pytest.raises(ValueError):
        compress_nm(W, 2, 4, "input", mask=bad)


def test_orientation_detection_honours_direction():
    gen = torch.Generator().manual_seed(11)
    W, _ = random_nm(32, 32, 2, 4, "output", torch.float32, gen)
    assert is_nm(W, 2, 4, "output")
    assert not is_nm(W, 2, 4, "input")
    assert detect_orientation(W, 2, 4) == "output"
    assert detect_orientation(torch.randn(8, 8), 2, 4) is None
    with pytest.raises(ValueError):
        compress_nm(W, 2, 4, "input")


@pytest.mark.parametrize("orientation", ["input", "output"])
def test_corrupted_parts_refused(orientation):
    gen = torch.Generator().manual_seed(5)
    W, _ = random_nm(16, 32, 2, 4, orientation, torch.bfloat16, gen)
    parts = compress_nm(W, 2, 4, orientation)
    # every single flipped mask bit is caught (the group count changes)
    for bit in (0, 13, 8 * parts["mask"].numel() - 1):
        bad = parts["mask"].clone()
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ValueError, match="corrupted mask|exactly"):
            decompress_nm({"values": parts["values"], "mask": bad}, W.shape, 2, 4, orientation)
    with pytest.raises(ValueError, match="values has shape"):
        decompress_nm({"values": parts["values"][:-1], "mask": parts["mask"]}, W.shape, 2, 4, orientation)
    with pytest.raises(ValueError, match="mask has shape|bytes"):
        decompress_nm({"values": parts["values"], "mask": parts["mask"][:-1]}, W.shape, 2, 4, orientation)
    with pytest.raises(ValueError, match="uint8"):
        decompress_nm({"values": parts["values"], "mask": parts["mask"].to(torch.int16)}, W.shape, 2, 4, orientation)
    with pytest.raises(ValueError, match="compressed parts must be"):
        decompress_nm({"values": parts["values"]}, W.shape, 2, 4, orientation)
    # wrong pattern / orientation claimed at load time
    with pytest.raises(ValueError):
        decompress_nm(parts, W.shape, 1, 4, orientation)


@pytest.mark.parametrize("orientation", ["input", "output"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pruned_negative_zeros_bit_exact(orientation, dtype):
    """Pruning by multiplication leaves -0.0 at pruned positions: still bit-exact."""
    gen = torch.Generator().manual_seed(9)
    W = torch.randn(16, 24, generator=gen).to(dtype)
    _, keep = random_nm(16, 24, 2, 4, orientation, dtype, gen)
    Wp = W * keep  # negative pruned weights become -0.0
    assert bool((torch.signbit(Wp) & (Wp == 0)).any())
    parts = compress_nm(Wp, 2, 4, orientation)
    assert "negzero" in parts and parts["negzero"].numel() == (16 * 24 // 2 + 7) // 8
    back = decompress_nm(parts, Wp.shape, 2, 4, orientation)
    assert bits_equal(back, Wp)
    # without -0.0 no extra part is stored
    assert "negzero" not in compress_nm(torch.where(keep, W, torch.zeros((), dtype=dtype)), 2, 4, orientation)
    bad = dict(parts, negzero=parts["negzero"][:-1])
    with pytest.raises(ValueError):
        decompress_nm(bad, Wp.shape, 2, 4, orientation)


def test_pack_bits_padding():
    mask = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    packed = pack_bits(mask)
    assert packed.tolist() == [0b1101]
    assert torch.equal(unpack_bits(packed, 5), mask)
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(torch.tensor([0b100000], dtype=torch.uint8), 5)


def _toy_state(gen, dtype=torch.bfloat16):
    gate, _ = random_nm(64, 32, 2, 4, "output", dtype, gen)
    up, _ = random_nm(64, 32, 2, 4, "output", dtype, gen)
    down, keep = random_nm(32, 64, 2, 4, "input", dtype, gen)
    down = torch.randn(32, 64, generator=gen).to(dtype) * keep  # -0.0 where pruned and negative
    unstr = torch.randn(32, 32, generator=gen).to(dtype)
    unstr[unstr.abs() < 0.7] = 0
    state = {
        "model.embed_tokens.weight": torch.randn(100, 32, generator=gen).to(dtype),
        "model.layers.0.mlp.gate_proj.weight": gate,
        "model.layers.0.mlp.up_proj.weight": up,
        "model.layers.0.mlp.down_proj.weight": down,
        "model.layers.0.self_attn.o_proj.weight": unstr,
        "model.norm.weight": torch.ones(32, dtype=dtype),
    }
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: shared storage

    def e(pat, o, W):
        n, m = (2, 4) if pat == "2:4" else (None, None)
        return {"pattern": pat, "n": n, "m": m, "orientation": o, "sparsity": 0.5, "shape": list(W.shape)}

    manifest = {
        "method": "dass",
        "matrices": {
            "model.layers.0.mlp.gate_proj.weight": e("2:4", "output", gate),
            "model.layers.0.mlp.up_proj.weight": e("2:4", None, up),  # orientation detected
            "model.layers.0.mlp.down_proj.weight": e("2:4", "input", down),
            "model.layers.0.self_attn.o_proj.weight": e("unstructured:0.5", None, unstr),
        },
    }
    return state, manifest


def test_save_load_compressed(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state, manifest = _toy_state(gen)
    path = tmp_path / "model.safetensors"
    rep = save_compressed(state, manifest, path)
    assert set(rep["compressed"]) == {
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    }
    assert rep["compressed"]["model.layers.0.mlp.up_proj.weight"]["orientation"] == "output"
    # values + keep-bitmask = 56.25% of 16-bit dense; down_proj also stores its -0.0 signs
    assert rep["compressed"]["model.layers.0.mlp.gate_proj.weight"]["stored_bytes"] == 64 * 32 * 9 // 8
    assert rep["compressed"]["model.layers.0.mlp.down_proj.weight"]["stored_bytes"] == 64 * 32 * 19 // 16
    assert rep["pruned_ratio"] <= 0.60
    assert rep["file_bytes"] < rep["dense_bytes"]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["nm_matrices"])
    assert "model.layers.0.mlp.gate_proj.weight" + VALUES_SUFFIX in keys
    assert "model.layers.0.mlp.gate_proj.weight" + MASK_SUFFIX in keys
    assert "model.layers.0.mlp.gate_proj.weight" not in keys
    assert meta["model.layers.0.mlp.gate_proj.weight"]["orientation"] == "output"
    assert meta["model.layers.0.mlp.down_proj.weight"]["orientation"] == "input"
    back, info = load_compressed(path, return_info=True)
    assert set(back) == set(state)
    for k, v in state.items():
        assert bits_equal(back[k], v), k
    assert info["model.layers.0.mlp.gate_proj.weight"]["n"] == 2


def test_load_refuses_corruption(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    state, manifest = _toy_state(gen)
    del state["lm_head.weight"]
    path = tmp_path / "m.safetensors"
    save_compressed(state, manifest, path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    key = "model.layers.0.mlp.down_proj.weight" + MASK_SUFFIX
    tensors[key][3] ^= 0b100
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="down_proj.*corrupted mask"):
        load_compressed(bad)
    # a manifest that claims 2:4 on a dense matrix is refused (strict) or kept dense
    manifest["matrices"]["model.embed_tokens.weight"] = {"pattern": "2:4", "n": 2, "m": 4, "orientation": "input"}
    with pytest.raises(ValueError, match="embed_tokens"):
        save_compressed(state, manifest, tmp_path / "x.safetensors")
    rep = save_compressed(state, manifest, tmp_path / "y.safetensors", strict=False)
    assert "model.embed_tokens.weight" in rep["kept_dense"]
    # not our format
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a dass-nm"):
        load_compressed(tmp_path / "plain.safetensors")


def test_partial_entries_kept_dense(tmp_path):
    gen = torch.Generator().manual_seed(2)
    W, _ = random_nm(16, 16, 2, 4, "output", torch.float16, gen)
    state = {"mlp.gate_up_proj.weight": torch.cat([W, W])}
    manifest = {"matrices": {"mlp.gate_up_proj.weight": {"pattern": "2:4", "n": 2, "m": 4, "orientation": "output", "rows": [0, 16]}}}
    rep = save_compressed(state, manifest, tmp_path / "p.safetensors")
    assert rep["compressed"] == {} and "mlp.gate_up_proj.weight" in rep["kept_dense"]
    back = load_compressed(tmp_path / "p.safetensors")
    assert torch.equal(back["mlp.gate_up_proj.weight"], state["mlp.gate_up_proj.weight"])
