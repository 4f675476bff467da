"""Reconstruction: the kept weights of each pruned block refitted to the dense block."""

import copy
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dass
from dass.core.patterns import nm_violations, parse_pattern
from dass.core.reconstruct import MaskedParams, fit, lr_factor, sample_rows
from dass.run.distributed import Dist, set_current
from dass.run.reconstruct import ReconstructOptions, reconstruct_options
from tiny import calib, tiny_model

FEW = "steps=40,lr=0.01,batch_tokens=64,eval_tokens=96"


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _masks(model):
    return {n: p != 0 for n, p in model.named_parameters() if p.dim() == 2}


@pytest.mark.parametrize("arch,method,pattern,scope,target", [
    ("llama", "wanda", "2:4", "mlp", "block"),
    ("llama", "dass", "4:8", "all", "block"),
    ("mixtral", "dass", "2:4", "mlp", "block"),
    ("phi3", "sparsegpt", "2:4", "mlp", "block"),
    ("gemma3", "wanda", "0.5", "all", "block"),
    ("gemma3", "wanda", "2:4", "all", "model"),
    ("mixtral", "wanda", "2:4", "mlp", "model"),
])
def test_masks_unchanged_and_block_error_drops(arch, method, pattern, scope, target):
    torch.manual_seed(0)
    ids = calib(6, 24)
    plain = tiny_model(arch)
    dass.prune(plain, method, pattern, scope, calibration=ids, batch_size=3, progress=False)
    model = tiny_model(arch)
    rep = dass.prune(model, method, pattern, scope, calibration=ids, batch_size=3, progress=False,
                     reconstruct=f"{FEW},target={target}")
    p = parse_pattern(pattern)
    pruned = {m.name for m in rep.matrices}
    # the first layer sees the same inputs with and without reconstruction: same masks there
    first = {m.key: m for m in rep.matrices if ".layers.0." in m.key}
    want, got = _params(plain), _params(model)
    for key, m in first.items():
        w, ref = got[m.name], want[m.name]
        if m.expert is not None:
            w, ref = w[m.expert], ref[m.expert]
        if m.rows is not None:
            w, ref = w[m.rows[0]:m.rows[1]], ref[m.rows[0]:m.rows[1]]
        assert torch.equal(w == 0, ref == 0), key
    # every pruned matrix is exactly N:M (or as sparse as asked) after the refit
    for m in rep.matrices:
        w = got[m.name]
        if m.expert is not None:
            w = w[m.expert]
        if m.rows is not None:
            w = w[m.rows[0]:m.rows[1]]
        if p.is_nm:
            assert nm_violations(w, p.n, p.m, m.orientation) == 0, m.key
        assert float((w == 0).float().mean()) >= p.sparsity - 1e-9, m.key
    # weights outside the pruned matrices are untouched by the refit
    for name in want:
        if name not in pruned and ".layers.0." in name:
            assert torch.equal(got[name], want[name]), name
    blocks = rep.blocks
    assert blocks and all(b["loss_after"] <= b["loss_before"] for b in blocks)
    assert sum(b["loss_after"] for b in blocks) < 0.8 * sum(b["loss_before"] for b in blocks)
    names = {b["block"].rsplit(".", 1)[-1] for b in blocks}
    assert names == ({"mlp", "self_attn"} if scope == "all" else {"mlp"})
    assert "blocks refitted" in rep.summary()


def test_zero_steps_is_bit_identical_to_no_reconstruction():
    ids = calib(6, 24)
    a, b = tiny_model("llama"), tiny_model("llama")
    dass.prune(a, "sparsegpt", "2:4", calibration=ids, batch_size=4, progress=False)
    rep = dass.prune(b, "sparsegpt", "2:4", calibration=ids, batch_size=4, progress=False, reconstruct="steps=0")
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), n
    assert all(blk["loss_after"] == blk["loss_before"] for blk in rep.blocks)


def test_reconstruction_is_reproducible_and_the_seed_matters():
    ids = calib(6, 24)
    runs = []
    for seed in (0, 0, 1):
        m = tiny_model("qwen2")
        dass.prune(m, "wanda", "2:4", calibration=ids, batch_size=3, progress=False, reconstruct=f"{FEW},seed={seed}")
        runs.append(_params(m))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_options_round_trip_and_bad_values():
    opts = reconstruct_options("steps=200,lr=0.002,schedule=constant")
    assert reconstruct_options(opts.to_spec().split(":", 1)[1]) == opts
    assert ReconstructOptions.parse(opts.record()) == opts
    assert reconstruct_options(True) == ReconstructOptions() == reconstruct_options("")
    assert reconstruct_options(None) is None and reconstruct_options(False) is None
    for bad, needle in (("steps=-1", "steps"), ("lr=0", "lr"), ("schedule=step", "schedule"), ("lrr=1", "unknown")):
        with pytest.raises(dass.MethodError, match=needle):
            reconstruct_options(bad)


def test_manifest_records_the_reconstruction(tmp_path):
    from dass.io.checkpoint import build_manifest

    m = tiny_model("llama")
    rep = dass.prune(m, "wanda", "2:4", calibration=calib(4, 16), progress=False, reconstruct=FEW)
    manifest = json.loads(json.dumps(build_manifest(rep), default=str))
    assert manifest["reconstruct"] == reconstruct_options(FEW).record()
    assert len(manifest["blocks"]) == 2 and {"loss_before", "loss_after"} <= set(manifest["blocks"][0])


def test_streaming_equals_in_memory(tmp_path):
    from transformers import AutoModelForCausalLM

    from dass.run.streaming import prune_checkpoint

    src = tmp_path / "src"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(src, max_shard_size="40KB")
    ids = calib(6, 24)
    rep = prune_checkpoint(src, tmp_path / "out", "dass", "2:4", "mlp", ids, batch_size=4, progress=False,
                           reconstruct=FEW)
    ref = AutoModelForCausalLM.from_pretrained(src)
    rep_ref = dass.prune(ref, "dass", "2:4", calibration=ids, batch_size=4, progress=False, reconstruct=FEW)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k
    assert rep.blocks == rep_ref.blocks


def _final_state_error(model, dense, ids):
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[-1]
        ref = dense(ids, output_hidden_states=True).hidden_states[-1]
    return float((h - ref).pow(2).mean() / ref.pow(2).mean())


def test_model_target_fits_the_dense_model():
    """target=model fits each block to the dense model's own block output: the first layer
    sees the same inputs and targets as target=block (identical weights there); later layers
    differ, stay exactly N:M, and the pruned model's last hidden state on the calibration
    tokens ends closer to the dense model's."""
    ids = calib(6, 24)
    layers = dict(num_hidden_layers=3)
    block, model = tiny_model("llama", **layers), tiny_model("llama", **layers)
    dass.prune(block, "wanda", "2:4", calibration=ids, batch_size=3, progress=False, reconstruct=FEW)
    rep = dass.prune(model, "wanda", "2:4", calibration=ids, batch_size=3, progress=False,
                     reconstruct=FEW + ",target=model")
    a, b = _params(block), _params(model)
    assert all(torch.equal(a[k], b[k]) for k in a if ".layers.0." in k)
    assert any(not torch.equal(a[k], b[k]) for k in a if ".layers.2.mlp." in k)
    for m in rep.matrices:
        assert nm_violations(b[m.name], 2, 4, m.orientation) == 0, m.key
    assert all(blk["loss_after"] <= blk["loss_before"] for blk in rep.blocks)
    assert rep.reconstruct["target"] == "model"
    dense = tiny_model("llama", **layers)
    assert _final_state_error(model, dense, ids) < 0.95 * _final_state_error(block, dense, ids)


def test_model_target_streams_and_resumes(tmp_path):
    """Under --stream the dense model's activations travel with the run's saved state: a run
    stopped after a layer and resumed gives the in-memory result."""
    from transformers import AutoModelForCausalLM

    from dass.run.streaming import prune_checkpoint

    src = tmp_path / "src"
    tiny_model("llama", num_hidden_layers=4).save_pretrained(src, max_shard_size="40KB")
    ids, spec = calib(6, 24), FEW + ",target=model"

    class Stop(Exception):
        pass

    def crash(layer):
        if layer == 2:
            raise Stop

    kw = dict(batch_size=4, progress=False, reconstruct=spec, checkpoint_seconds=0)
    with pytest.raises(Stop):
        prune_checkpoint(src, tmp_path / "out", "wanda", "2:4", "mlp", ids, after_layer=crash, **kw)
    rep = prune_checkpoint(src, tmp_path / "out", "wanda", "2:4", "mlp", ids, **kw)
    assert any("resumed at layer 2" in n for n in rep.notes)
    ref = AutoModelForCausalLM.from_pretrained(src)
    dass.prune(ref, "wanda", "2:4", calibration=ids, batch_size=4, progress=False, reconstruct=spec)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k


# ------------------------------------------------------------------------ the maths


def test_masked_fit_keeps_pruned_positions_zero_and_fits_a_linear_map():
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(8, 16, generator=g)
    mask = torch.rand(8, 16, generator=g) > 0.5
    x = torch.randn(512, 16, generator=g)
    y = x @ w_true.t()
    params = MaskedParams.from_weights({"w": (w_true * mask) * 0.5}, {"w": mask})
    norm = float(y.pow(2).sum(1).mean())

    def loss(weights, rows):
        out = x[rows] @ weights["w"].t()
        return (out - y[rows]).pow(2).sum(), int(rows.numel())

    res = fit(params, loss, 512, norm, steps=300, lr=0.05, batch_rows=128, generator=torch.Generator().manual_seed(1),
              eval_rows=torch.arange(512), lr_scale="absolute")
    w = params.result()["w"]
    assert torch.equal(w == 0, ~mask | (w == 0)) and bool((w[~mask] == 0).all())
    # the best the mask allows: least squares per row on the kept inputs
    best = torch.zeros_like(w_true)
    for i in range(8):
        keep = mask[i]
        best[i, keep] = torch.linalg.lstsq(x[:, keep], y[:, i:i + 1]).solution.squeeze(1)
    best_err = float((x @ best.t() - y).pow(2).sum(1).mean()) / norm
    assert res.loss_after < res.loss_before and res.loss_after < best_err + 0.02


def test_rows_and_schedule():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = sample_rows(g1, 1000, 100), sample_rows(g2, 1000, 100)
    assert torch.equal(a, b) and a.unique().numel() == 100 and int(a.max()) < 1000
    assert torch.equal(sample_rows(g1, 10, 50), torch.arange(10))
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(99, 100, 0, "cosine") < 0.01
    assert lr_factor(50, 100, 0, "constant") == 1.0


# ------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        set_current(Dist(rank, world))
        model = tiny_model("llama")
        rep = dass.prune(model, "wanda", "2:4", calibration=calib(8, 24), batch_size=2, device="cpu", progress=False,
                         reconstruct=FEW)
        if rank == 0:
            torch.save({"state": model.state_dict(), "blocks": rep.blocks}, out)
    finally:
        set_current(Dist())
        dist.destroy_process_group()


def test_two_ranks_fit_what_one_process_fits(tmp_path):
    """Same rows, gradients summed over ranks: the same masks, and weights equal to one
    process's up to the order of floating-point sums (the tolerance the README states)."""
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    got = torch.load(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model("llama")
        rep = dass.prune(model, "wanda", "2:4", calibration=calib(8, 24), batch_size=2, device="cpu", progress=False,
                         reconstruct=FEW)
    finally:
        torch.set_num_threads(threads)
    for k, v in model.state_dict().items():
        assert torch.equal(got["state"][k] == 0, v == 0), f"mask of {k} differs"
        torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for a, b in zip(got["blocks"], rep.blocks):
        assert a["loss_after"] == pytest.approx(b["loss_after"], rel=1e-3)
