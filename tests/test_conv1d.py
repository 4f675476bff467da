"""GPT-2's Conv1D projections (weights stored ``[in, out]``) are pruned like ``nn.Linear``
by wanda, sparsegpt and magnitude; the advice dass gives for non-GLU models is true."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import dass
from dass.core.patterns import nm_violations
from dass.io.checkpoint import load_pruned_model
from tiny import calib
from tiny_ckpt import cli, gpt2_model, one_line_error, save_model, save_text


def _as_linears(model: nn.Module) -> nn.Module:
    """The same network with every Conv1D replaced by the equivalent nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, Conv1D):
            lin = nn.Linear(mod.weight.shape[0], mod.weight.shape[1], dtype=mod.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.t())
                lin.bias.copy_(mod.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(parent), leaf, lin)
    return twin


@pytest.mark.parametrize("method,pattern,scope", [("wanda", "2:4", "mlp"), ("sparsegpt", "4:8", "all"),
                                                  ("magnitude", "0.5", "all"), ("wanda", "0.5", "all")])
def test_conv1d_pruned_like_the_equivalent_linear(method, pattern, scope):
    """In float64 (no rounding ties), pruning GPT-2 gives the transposed weights of pruning
    the same network built from nn.Linear."""
    model = gpt2_model().double()
    twin = _as_linears(model)
    ids = calib(8, 24)
    rep = dass.prune(model, method, pattern, scope, calibration=ids, batch_size=4, progress=False)
    rep_twin = dass.prune(twin, method, pattern, scope, calibration=ids, batch_size=4, progress=False)
    assert len(rep.matrices) == len(rep_twin.matrices) == (4 if scope == "mlp" else 8)
    assert [(m.key, m.shape, m.orientation) for m in rep.matrices] == [(m.key, m.shape, m.orientation) for m in rep_twin.matrices]
    got, want = model.state_dict(), twin.state_dict()
    for m in rep.matrices:
        w, ref = got[m.name].t(), want[m.name]
        assert torch.equal(w == 0, ref == 0), m.key
        torch.testing.assert_close(w, ref, rtol=1e-9, atol=1e-12)
        if ":" in pattern:
            n, mm = map(int, pattern.split(":"))
            assert nm_violations(w, n, mm, m.orientation) == 0


def test_gpt2_from_the_command_line(tmp_path):
    ws = tmp_path
    save_model(ws / "gpt2", "gpt2")
    save_text(ws / "text.txt")
    common = ["--calibration", ws / "text.txt", "--nsamples", 4, "--seqlen", 32, "--quiet"]
    line = one_line_error(cli("prune", ws / "gpt2", "-o", ws / "d", *common))
    assert "DaSS needs a gated (GLU) MLP" in line and "Use --method wanda, sparsegpt or magnitude" in line
    assert cli("prune", ws / "gpt2", "-o", ws / "w", "--method", "wanda", "--pattern", "2:4", *common).returncode == 0
    manifest = json.loads((ws / "w" / "dass.json").read_text())
    entry = manifest["matrices"]["transformer.h.0.mlp.c_fc.weight"]
    assert entry["transposed"] is True and entry["shape"] == [128, 32]  # [out, in], stored [in, out]
    assert cli("verify", ws / "w").returncode == 0
    assert cli("compress", ws / "w", "-o", ws / "c").returncode == 0
    assert cli("verify", ws / "c").returncode == 0
    dense = load_pruned_model(ws / "w").state_dict()
    for k, v in load_pruned_model(ws / "c").state_dict().items():
        assert torch.equal(v, dense[k]), k
    assert cli("prune", ws / "gpt2", "-o", ws / "s", "--method", "sparsegpt", "--stream", *common).returncode == 0
    assert cli("verify", ws / "s").returncode == 0
