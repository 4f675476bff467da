"""dass.infer on a CUDA GPU (skipped without one): the tile kernels and every tuning
candidate against dense products at every token bucket, both orientations, fp16 and bf16;
the direct launcher; the dispatcher's log and on-disk cache; keep_dense; and generate()
giving the dense model's greedy tokens, with and without decode-step graphs."""

import pytest
import torch
from test_accelerate import prune24, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BUCKETS = (1, 2, 3, 4, 8, 16, 17, 32, 64, 100, 128)


@pytest.mark.parametrize("orientation", ["input", "output"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_every_bucket(orientation, dtype):
    from dass.infer.kernels import nm24_decompress, nm24_matmul, to_kernel_layout

    torch.manual_seed(0)
    for N, K in ((2048, 1024), (4 * 37, 104)):
        W = prune24(torch.randn(N, K, device="cuda", dtype=dtype) * 0.05, orientation)
        values, meta = to_kernel_layout(W, orientation)
        assert torch.equal(nm24_decompress(values, meta, N, K, orientation), W)
        for T in BUCKETS:
            x = torch.randn(T, K, device="cuda", dtype=dtype)
            ref = x.double() @ W.double().T
            for cfg in (None, {"SPLIT_K": 2}):
                y = nm24_matmul(x, values, meta, N, K, orientation, config=cfg)
                assert y.shape == (T, N) and y.dtype == dtype
                assert rel_err(y, ref) < 1e-2, (N, K, T, cfg)


def test_dispatcher_log_and_disk_cache(tmp_path):
    from dass.infer.accelerate import AccelerateConfig, NM24Linear
    from dass.infer.dispatch import clear_decisions, tuning_log

    torch.manual_seed(2)
    W = prune24(torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16) * 0.05, "input")
    path = tmp_path / "tuning.json"
    cfg = AccelerateConfig(tuning_cache=str(path))
    mod = NM24Linear(W, None, "input", cfg)
    for T in (1, 8, 64, 2048):
        d = mod.decision(T)
        assert d.source == "measured" and d.path in mod.candidates(T) and d.dense_ms and d.reason
        assert d.times_ms[d.path] == min(d.times_ms.values())
        x = torch.randn(T, 1024, device="cuda", dtype=torch.bfloat16)
        assert rel_err(mod(x), x.double() @ W.double().T) < 1e-2
    assert path.is_file() and len(tuning_log()) >= 4
    clear_decisions()
    again = NM24Linear(W, None, "input", cfg)
    for T in (1, 8, 64, 2048):
        d = again.decision(T)
        assert d.source == "cache" and d.path == mod.decision(T).path


@pytest.mark.parametrize("orientation", ["input", "output"])
def test_keep_dense_is_never_slower_than_dense_in_its_log(orientation):
    from dass.infer.accelerate import AccelerateConfig, NM24Linear

    torch.manual_seed(3)
    W = prune24(torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16) * 0.05, orientation)
    mod = NM24Linear(W, None, orientation, AccelerateConfig(keep_dense=True, tuning_cache=False))
    for T in (1, 4, 16, 64, 256, 4096):
        d = mod.decision(T)
        assert "dense" in d.times_ms and d.dense_ms == d.times_ms["dense"]
        assert d.times_ms[d.path] <= d.dense_ms, d
        x = torch.randn(T, 2048, device="cuda", dtype=torch.bfloat16)
        assert rel_err(mod(x), x.double() @ W.double().T) < 1e-2


def _tiny_llama(layers=2):
    from dass.infer.generate import prune_24, synthetic_model

    model = synthetic_model("tiny", layers, torch.bfloat16, "cuda", seed=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    prune_24(model, "mlp", "dass")
    return model


def _agree(dense_tokens, other, margins, eps):
    """Tokens equal up to the first step where the dense model's top-2 margin is a near-tie."""
    for i, (a, b) in enumerate(zip(dense_tokens, other)):
        if a != b:
            return margins[i] < eps
    return True


def test_generate_gives_the_dense_tokens():
    """Greedy 32 tokens: accelerated (decode graphs and eager) == dense with the same 2:4
    weights, except after a near-tie of the dense logits (bf16 rounding may flip those)."""
    from dass.infer.accelerate import AccelerateConfig
    from dass.infer.generate import compare

    model = _tiny_llama()
    ids = torch.randint(1, model.config.vocab_size, (1, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(ids), output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores).float()  # [steps, 1, vocab]; -inf where a processor masked a token
    top2 = scores.topk(2, dim=-1).values[:, 0]
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    eps = 0.05 * scores[torch.isfinite(scores)].std().item()
    res = compare(model, lambda B: ids.expand(B, -1).contiguous(), [1], 32, ["graphs", "eager"], reps=1,
                  accelerate_kw={"config": AccelerateConfig(tuning_cache=False)}, log=lambda s: None)
    assert res["skipped"] == [] and len(res["table"]) == 2, res["skipped"]
    dense_tokens = out.sequences[0, 12:].tolist()
    for r in res["dense"] + res["sparse"]:
        assert len(r["tokens"][0]) == 32
        assert _agree(dense_tokens, r["tokens"][0], margins, eps), (r["mode"], dense_tokens, r["tokens"][0])
    assert "graph_log" in res and any("captured" in line for v in res["graph_log"].values() for line in v), res.get("graph_log")


@pytest.mark.parametrize("orientation", ["input", "output"])
def test_every_tuning_candidate(orientation):
    """What the tuner may pick computes the right product, and a launcher reused across token
    counts of a bucket (its direct launch path) gives the same bits as a fresh one."""
    from dass.infer.kernels import Launcher, to_kernel_layout
    from dass.infer.kernels.tune import candidates

    torch.manual_seed(1)
    N, K = 1024, 2048
    W = prune24(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.05, orientation)
    values, meta = to_kernel_layout(W, orientation)
    for T in (1, 2, 4, 8, 16, 32, 64, 128):
        for cfg in candidates(orientation, T, N, K):
            ln = Launcher(N, K, orientation, cfg, T)
            for t in sorted({T, max(1, T - 1), max(1, T // 2 + 1)}):
                x = torch.randn(t, K, device="cuda", dtype=torch.bfloat16)
                y1, y2 = ln(x, values, meta), ln(x, values, meta)
                fresh = Launcher(N, K, orientation, cfg, T)(x, values, meta)
                assert torch.equal(y1, y2) and torch.equal(y1, fresh), (T, t, cfg)
                assert rel_err(y1, x.double() @ W.double().T) < 1e-2, (T, t, cfg)
