"""Compressed checkpoints through plain ``AutoModelForCausalLM.from_pretrained``."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import dass
from dass.io.checkpoint import COMPRESSED_FILE, build_manifest, compress_checkpoint, load_pruned_model, save_pruned
from tiny import calib, tiny_model


def compressed(tmp_path, arch="llama", pattern="2:4", dtype=torch.float32, negzero=False, scope="mlp"):
    """A pruned tiny model saved dense and compressed; returns (dense dir, compressed dir)."""
    model = tiny_model(arch)
    report = dass.prune(model, "dass", pattern, scope, calibration=calib(), progress=False)
    if negzero:  # pruning by multiplication leaves -0.0; the compressed file keeps its sign
        w = model.model.layers[0].mlp.down_proj.weight
        with torch.no_grad():
            w[(w == 0)] = -0.0
        assert torch.signbit(w[w == 0]).all()
    model.to(dtype)
    dense = save_pruned(model, None, tmp_path / "dense", build_manifest(report))
    return dense, compress_checkpoint(dense, tmp_path / "comp")


def same_weights_and_logits(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        # bit for bit, signed zeros included
        assert torch.equal(sa[name].view(torch.uint8), sb[name].view(torch.uint8)) if sa[name].is_floating_point() \
            else torch.equal(sa[name], sb[name]), name
    ids = calib(n=2, length=16)
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert torch.equal(la, lb)


@pytest.mark.parametrize(
    "arch,pattern,scope,negzero",
    [("llama", "2:4", "mlp", False), ("llama", "4:8", "all", True), ("qwen3", "2:4", "mlp", False), ("phi3", "2:4", "mlp", False)],
)
def test_from_pretrained_is_bit_identical(tmp_path, arch, pattern, scope, negzero):
    dense_dir, comp_dir = compressed(tmp_path, arch, pattern, negzero=negzero, scope=scope)
    assert not (comp_dir / "model.safetensors").exists()
    assert json.loads((comp_dir / "config.json").read_text())["quantization_config"]["quant_method"] == "dass"
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    comp = AutoModelForCausalLM.from_pretrained(comp_dir)
    same_weights_and_logits(dense, comp)
    # an ordinary dense model afterwards: nothing left of the quantizer
    assert getattr(comp.config, "quantization_config", None) is None
    assert not getattr(comp, "is_quantized", False) and getattr(comp, "hf_quantizer", None) is None
    assert getattr(comp.config, "transformers_weights", None) is None
    if negzero:
        from safetensors import safe_open

        with safe_open(comp_dir / COMPRESSED_FILE, "pt") as f:
            assert any(k.endswith(".nm_negzero") for k in f.keys())


def test_dtypes_follow_from_pretrained(tmp_path):
    dense_dir, comp_dir = compressed(tmp_path, dtype=torch.bfloat16)
    same_weights_and_logits(AutoModelForCausalLM.from_pretrained(dense_dir), AutoModelForCausalLM.from_pretrained(comp_dir))
    up = AutoModelForCausalLM.from_pretrained(comp_dir, dtype=torch.float32)
    assert up.model.layers[0].mlp.gate_proj.weight.dtype == torch.float32
    same_weights_and_logits(AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32), up)


def test_loaded_model_saves_as_ordinary_checkpoint(tmp_path):
    dense_dir, comp_dir = compressed(tmp_path)
    comp = AutoModelForCausalLM.from_pretrained(comp_dir)
    comp.save_pretrained(tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "quantization_config" not in config and "transformers_weights" not in config
    same_weights_and_logits(AutoModelForCausalLM.from_pretrained(dense_dir), AutoModelForCausalLM.from_pretrained(tmp_path / "resaved"))


def test_old_compressed_checkpoint_without_config_entry_still_loads(tmp_path):
    dense_dir, comp_dir = compressed(tmp_path)
    path = comp_dir / "config.json"
    config = json.loads(path.read_text())
    del config["quantization_config"]  # as written before the quantizer existed
    path.write_text(json.dumps(config))
    same_weights_and_logits(AutoModelForCausalLM.from_pretrained(dense_dir), load_pruned_model(comp_dir))


def test_corrupted_mask_is_refused_naming_the_matrix(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, comp_dir = compressed(tmp_path)
    path = comp_dir / COMPRESSED_FILE
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(k for k in tensors if k.endswith(".nm_mask"))[0]
    tensors[key][0] ^= 0b1  # one group no longer keeps exactly N
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match=key.removesuffix(".nm_mask").replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(comp_dir)


def fresh_python(code):
    """A new interpreter (dass not imported unless ``code`` does it)."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_without_dass_the_load_fails_and_names_dass(tmp_path):
    _, comp_dir = compressed(tmp_path)
    code = (
        "import sys\nfrom transformers import AutoModelForCausalLM\n"
        f"try:\n    AutoModelForCausalLM.from_pretrained({str(comp_dir)!r})\n"
        "except OSError as e:\n    print('FAILED:', e)\n"
        "print('dass imported:', 'dass' in sys.modules)\n"
    )
    res = fresh_python(code)
    assert res.returncode == 0, res.stderr
    assert "FAILED:" in res.stdout and "dass imported: False" in res.stdout
    # transformers names the unknown quantization type before the load fails
    assert "Unknown quantization type, got dass" in res.stderr


def test_import_dass_registers_without_importing_the_registry():
    res = fresh_python(
        "import sys, dass\n"
        "print('registry imported by dass:', 'transformers.quantizers.auto' in sys.modules)\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
        "print('registered:', AUTO_QUANTIZER_MAPPING['dass'].__name__)\n"
    )
    assert res.returncode == 0, res.stderr
    assert "registry imported by dass: False" in res.stdout and "registered: DassNMQuantizer" in res.stdout
    # transformers first, dass second: registered at import
    res = fresh_python("import transformers.quantizers.auto as a, dass; print(a.AUTO_QUANTIZER_MAPPING['dass'].__name__)")
    assert res.returncode == 0 and "DassNMQuantizer" in res.stdout, res.stderr


def test_dass_loader_falls_back_when_transformers_does_not_route(tmp_path, monkeypatch):
    """A transformers that never asks the quantizer where the weights are (its hooks
    renamed) fails to find them; dass' own loader still rebuilds the model exactly."""
    from dass.io.hf_quantizer import DassNMQuantizer

    dense_dir, comp_dir = compressed(tmp_path)
    monkeypatch.setattr(DassNMQuantizer, "_point_at_file", lambda self, config: config)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(comp_dir)
    same_weights_and_logits(AutoModelForCausalLM.from_pretrained(dense_dir), load_pruned_model(comp_dir))
