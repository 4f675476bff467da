"""The sequential pipeline on tiny random models of every supported architecture."""

import copy

import pytest
import torch

import dass
from dass.arch import ArchitectureError, plan_model
from dass.methods import get_method
from dass.core.patterns import PatternError, nm_violations, parse_pattern
from dass.run.layer import prune_layer
from dass.run.report import PruneReport
from dass.core.stats import FeatureStats
from tiny import ARCHS, calib, tiny_model


def masks(model):
    return {n: (p == 0).clone() for n, p in model.named_parameters() if p.dim() >= 2}


def reference_prune(model, ids, method, pattern, batch_size):
    """Prune one layer at a time, gathering statistics through *full-model* forwards.

    Slow but obviously right: every layer sees exactly what the model feeds it, with the
    model's own masks and positions, after the earlier layers were pruned."""
    meth, pat = get_method(method), parse_pattern(pattern)
    report = PruneReport(method, {}, pattern, "mlp", 0, 0)
    for plan in plan_model(model, "mlp", require_glu=meth.requires_glu):
        stats = {k: FeatureStats(n, with_hessian=meth.needs_hessian) for k, n in plan.feature_sizes().items()}
        hooks = [c.module.register_forward_hook(lambda m, i, o, k=c.key: stats[k].add(i[0])) for c in plan.inputs]
        with torch.no_grad():
            for b in ids.split(batch_size):
                model(input_ids=b, use_cache=False)
        for h in hooks:
            h.remove()
        prune_layer(plan, stats, meth, pat, report)
    return report


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("method", ["dass", "wanda", "sparsegpt"])
def test_sequential_matches_full_forward_reference(arch, method):
    extra = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]} if arch == "gemma3" else {}
    model = tiny_model(arch, num_hidden_layers=3, **extra)
    if arch == "gemma3":
        assert model.config.sliding_window < 24  # shorter than the calibration sequences
    ref = copy.deepcopy(model)
    ids = calib(6, 24)
    dass.prune(model, method, "2:4", calibration=ids, batch_size=3, progress=False)
    reference_prune(ref, ids, method, "2:4", batch_size=3)
    got, want = masks(model), masks(ref)
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name


def test_gemma3_reusing_layer0_arguments_is_caught(monkeypatch):
    """Reusing layer 0's arguments for every layer must change the masks, or the test
    above could not catch that bug."""
    import dass.run.prune as pl

    real = pl.capture_inputs

    def layer0_args_everywhere(*a, **k):
        inp = real(*a, **k)
        inp.args = [inp.args[0]] * len(inp.args)
        return inp

    extra = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    model = tiny_model("gemma3", num_hidden_layers=3, **extra)
    ref = copy.deepcopy(model)
    ids = calib(6, 24)
    monkeypatch.setattr(pl, "capture_inputs", layer0_args_everywhere)
    dass.prune(model, "wanda", "2:4", calibration=ids, batch_size=3, progress=False)
    reference_prune(ref, ids, "wanda", "2:4", batch_size=3)
    got, want = masks(model), masks(ref)
    assert any(not torch.equal(got[n], want[n]) for n in got)


ALL_ARCHS = list(ARCHS)


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("method", ["dass", "wanda", "sparsegpt", "magnitude"])
def test_end_to_end_every_architecture(arch, method):
    ids = calib(4, 16)
    for pattern in ("2:4", "0.5"):
        for scope in ("mlp", "all"):
            model = tiny_model(arch)
            before = {n: p.clone() for n, p in model.named_parameters()}
            rep = dass.prune(model, method, pattern, scope, calibration=ids, batch_size=2, progress=False)
            pat = parse_pattern(pattern)
            assert rep.matrices, "nothing pruned"
            for m in rep.matrices:
                assert m.sparsity >= pat.sparsity - 1e-6
                if pat.is_nm:
                    assert m.orientation == ("output" if method == "dass" and m.role in ("gate", "up") else "input")
            names = {m.name for m in rep.matrices}
            for n, p in model.named_parameters():
                attn = any(a in n for a in ("self_attn", "attention"))
                if scope == "mlp" and attn:
                    assert torch.equal(p, before[n]), f"{n} changed under scope mlp"
                if n in names:
                    continue
                if "router" in n or n.endswith("mlp.gate.weight") or "norm" in n or "embed" in n:
                    assert torch.equal(p, before[n]), f"{n} should stay dense"
            if scope == "all":
                assert any(m.role == "attn" for m in rep.matrices)
            with torch.no_grad():
                out = model(ids[:1]).logits
            assert torch.isfinite(out).all()


def test_nm_groups_valid_in_model_and_matrix_sparsity_exact():
    model = tiny_model("llama")
    rep = dass.prune(model, "dass", "2:4", calibration=calib(), progress=False)
    sd = dict(model.named_parameters())
    for m in rep.matrices:
        w = sd[m.name]
        assert nm_violations(w, 2, 4, m.orientation) == 0
        kept = (w != 0)
        kept = kept if m.orientation == "input" else kept.t()
        assert torch.all(kept.reshape(kept.shape[0], -1, 4).sum(-1) == 2)
        assert m.sparsity == pytest.approx(0.5)
    assert rep.sparsity == pytest.approx(0.5)


def test_phi3_fused_gate_up_scored_as_halves():
    model = tiny_model("phi3")
    rep = dass.prune(model, "dass", "2:4", calibration=calib(), progress=False)
    fused = [m for m in rep.matrices if m.name.endswith("gate_up_proj.weight")]
    assert {m.role for m in fused} == {"gate", "up"}
    assert {m.rows for m in fused} == {(0, 64), (64, 128)}
    w = dict(model.named_parameters())[fused[0].name]
    assert w.shape == (128, 32)  # still fused
    assert nm_violations(w, 2, 4, "output") == 0


def test_mixtral_expert_without_tokens_falls_back_to_magnitude():
    model = tiny_model("mixtral", num_experts_per_tok=1)
    def starve_expert_3(mod, args, out):
        logits, scores, idx = out
        return logits, scores, torch.where(idx == 3, torch.zeros_like(idx), idx)
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(starve_expert_3)
    rep = dass.prune(model, "dass", "2:4", calibration=calib(), progress=False)
    assert len(rep.fallbacks) == 2 and all("[3]" in f for f in rep.fallbacks)
    by_expert = {(m.name, m.expert): m.method for m in rep.matrices if m.expert is not None}
    assert all(meth == ("magnitude" if e == 3 else "dass") for (_, e), meth in by_expert.items())
    # the fallback is exactly magnitude's 2:4 mask
    w = model.model.layers[0].mlp.experts.down_proj[3]
    assert nm_violations(w, 2, 4, "input") == 0


def test_dtype_is_kept():
    model = tiny_model("llama").to(torch.bfloat16)
    dass.prune(model, "sparsegpt", "2:4", calibration=calib(), progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_non_glu_model_rejected_by_dass_but_pruned_by_baselines():
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    model = PhiForCausalLM(cfg).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ArchitectureError, match="gate_proj/up_proj/down_proj"):
        dass.prune(model, "dass", "2:4", calibration=calib(), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    rep = dass.prune(model, "wanda", "2:4", calibration=calib(), progress=False)
    assert {m.name.split(".")[-2] for m in rep.matrices} == {"fc1", "fc2"}


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"pattern": "5:4"}, PatternError),
        ({"pattern": "1.2"}, PatternError),
        ({"pattern": "2:3"}, PatternError),  # 32/64 not divisible by 3
        ({"method": "nope"}, ValueError),
        ({"scope": "attn"}, ValueError),
        ({"calibration": None}, ValueError),
        ({"calibration": 3}, ValueError),
    ],
)
def test_bad_input_raises_before_modifying(kwargs, error):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    args = {"method": "dass", "pattern": "2:4", "calibration": calib(), "progress": False, **kwargs}
    with pytest.raises(error):
        dass.prune(model, **args)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_magnitude_needs_no_calibration():
    model = tiny_model("llama")
    rep = dass.prune(model, "magnitude", "0.5", calibration=None, progress=False)
    assert rep.nsamples == 0 and rep.sparsity == pytest.approx(0.5)


def test_report_contents():
    model = tiny_model("llama")
    rep = dass.prune(model, "dass", "4:8", calibration=calib(), progress=False, alpha=1.0)
    d = rep.to_dict()
    assert d["method"] == "dass" and d["options"] == {"alpha": 1.0} and d["pattern"] == "4:8"
    assert len(d["layer_seconds"]) == 2 and d["total_seconds"] > 0
    assert {m["orientation"] for m in d["matrices"]} == {"input", "output"}


@pytest.mark.parametrize("arch", ["llama", "gemma", "phi3", "mixtral"])
def test_glu_blocks_carry_their_activation(arch):
    model = tiny_model(arch)
    x = torch.randn(5, 32)
    for plan in plan_model(model):
        for block in plan.glu:
            assert block.act is not None
            gate = x @ block.gate.get().t()
            up = x @ block.up.get().t()
            h = block.act(gate) * up
            assert h.shape == (5, 64)
