"""Which path runs a 2:4 product, per (shape, token bucket): measured, logged, remembered.

Paths of an :class:`~dass.infer.nm24_linear.NM24Linear`:

- ``"triton"``: the Triton kernels (GEMV at one token, tiles above), launch configuration
  searched by :func:`dass.infer.kernels.tune.tune_kernel`;
- ``"cslt"``: cuSPARSELt sparse tensor cores (input orientation only);
- ``"decompress"``: decompress in one Triton pass, then cuBLAS;
- ``"dense"``: cuBLAS on a kept dense copy (only with ``AccelerateConfig.keep_dense``).

On first use of a bucket every candidate is timed (CUDA-graph replays cycling over copies of
the matrix so it cannot sit in L2) together with plain cuBLAS on the dense matrix, the
fastest candidate is kept, and the decision (path, kernel configuration, all times, and why)
goes to the tuning log (:func:`tuning_log`) and to the on-disk cache
(:mod:`dass.infer.tuning_cache`), so the next process replays it without timing anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dass.infer.kernels.tune import bucket, copies_for, gpu_time, tune_kernel

__all__ = ["Decision", "decide", "tuning_log", "clear_decisions", "bucket"]


@dataclass
class Decision:
    """The path of one (shape, token bucket), with the times (ms) it was chosen from."""

    path: str
    config: dict[str, Any] | None = None
    times_ms: dict[str, float] = field(default_factory=dict)
    dense_ms: float | None = None
    reason: str = ""
    source: str = "measured"  # "measured", "cache" or "static"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_DECISIONS: dict[tuple, Decision] = {}


def clear_decisions() -> None:
    """Forget the in-memory decisions (the on-disk cache is kept)."""
    _DECISIONS.clear()


def _key_str(key: tuple) -> str:
    o, N, K, dtype, _dev, b, cands, glu = key
    tail = f" glu={glu}" if glu else ""
    return f"{o} {N}x{K} {str(dtype).replace('torch.', '')} T={b} [{','.join(cands)}]{tail}"


def tuning_log() -> dict[str, dict[str, Any]]:
    """Every decision of this process: '{orientation} {N}x{K} {dtype} T={bucket} [candidates]'
    -> {path, config, times_ms, dense_ms, reason, source}."""
    return {_key_str(k): d.as_dict() for k, d in _DECISIONS.items()}


def _reason(path: str, times: dict[str, float], dense_ms: float | None, keep_dense: bool, dense_mb: float) -> str:
    t = times[path]
    if dense_ms is None:
        return f"{path} fastest ({t * 1e3:.1f} us); dense cuBLAS not measured"
    ratio = dense_ms / t if t > 0 else float("inf")
    if path == "dense":
        sparse = {p: v for p, v in times.items() if p != "dense"}
        best = min(sparse, key=sparse.get) if sparse else None
        what = f"best sparse path {best} {sparse[best] * 1e3:.1f} us ({dense_ms / sparse[best]:.2f}x)" if best else "no sparse path ran"
        return f"dense copy fastest ({t * 1e3:.1f} us); {what}"
    msg = f"{path} {t * 1e3:.1f} us vs dense cuBLAS {dense_ms * 1e3:.1f} us: {ratio:.2f}x"
    if ratio < 1.0 and not keep_dense:
        msg += f"; slower than dense: AccelerateConfig(keep_dense=True) would run cuBLAS here (+{dense_mb:.0f} MB)"
    return msg


def decide(mod, T: int) -> Decision:
    """The decision for ``mod`` (an NM24Linear) at T tokens: from memory, from the disk cache,
    measured (CUDA, not while capturing), or the static rule."""
    b = bucket(T)
    cands = tuple(mod.candidates(b))
    # a stacked [gate; up] matrix (glu_act set) also times the GLU epilogue: its own entry
    key = (mod.orientation, mod.out_features, mod.in_features, mod.weight_dtype, mod.weight_device.index, b, cands,
           getattr(mod, "glu_act", None))
    d = _DECISIONS.get(key)
    if d is not None:
        return d
    cfg = mod.config
    if not cfg.autotune or mod.weight_device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return Decision(mod.static_path(T), None, source="static", reason="autotune off or capturing")
    cache = None
    if cfg.tuning_cache:
        from dass.infer.tuning_cache import cache_at, default_cache

        cache = default_cache() if cfg.tuning_cache is True else cache_at(cfg.tuning_cache)
        hit = cache.get(_key_str(key))
        if isinstance(hit, dict) and hit.get("path") in cands:
            d = _DECISIONS[key] = Decision(**{**hit, "source": "cache"})
            return d
    d = _DECISIONS[key] = _measure(mod, b, cands)
    if cache is not None:
        cache.put(_key_str(key), {k: v for k, v in d.as_dict().items() if k != "source"})
    return d


def _measure(mod, b: int, cands: tuple[str, ...]) -> Decision:
    """Time each candidate path (and dense cuBLAS) at ``b`` tokens on this module's matrix."""
    dev, dtype = mod.weight_device, mod.weight_dtype
    N, K = mod.out_features, mod.in_features
    x = torch.randn(b, K, device=dev, dtype=dtype)
    times: dict[str, float] = {}
    config = config_cu = None
    notes = []
    with torch.inference_mode(False), torch.no_grad():
        if "triton" in cands:
            try:
                if mod.config.tune_kernels:
                    res = tune_kernel(mod.values, mod.meta, N, K, mod.orientation, b)
                    config = res["best"]
                    if config is not None:
                        times["triton"] = res["best_ms"]
                else:
                    times["triton"] = _time_path(mod, x, "triton")
            except Exception as e:  # noqa: BLE001
                notes.append(f"triton failed: {type(e).__name__}: {str(e)[:120]}")
        if "cuda" in cands:
            try:
                config_cu, t_cu, cu_notes = _tune_cuda(mod, x)
                notes += cu_notes
                if config_cu is not None:
                    times["cuda"] = t_cu
            except Exception as e:  # noqa: BLE001
                notes.append(f"cuda failed: {type(e).__name__}: {str(e)[:120]}")
                config_cu = None
        for p in cands:
            if p in ("triton", "cuda"):
                continue
            try:
                times[p] = _time_path(mod, x, p)
            except Exception as e:  # noqa: BLE001 -- a path that cannot run here is not chosen
                notes.append(f"{p} failed: {type(e).__name__}: {str(e)[:120]}")
        dense_ms = times.get("dense")
        if dense_ms is None:
            try:
                w = mod.dense_weight()
                nc = copies_for(w.numel() * w.element_size())
                ws = [w] + [w.clone() for _ in range(nc - 1)]
                dense_ms = gpu_time(lambda i: torch.nn.functional.linear(x, ws[i]), nc)
                del ws, w
            except Exception as e:  # noqa: BLE001
                notes.append(f"dense reference failed: {type(e).__name__}")
    if not times:
        return Decision(mod.static_path(b), None, {}, dense_ms, "no path could be timed: " + "; ".join(notes), "static")
    path = min(times, key=times.get)
    dense_mb = N * K * 2 / 2**20
    reason = _reason(path, times, dense_ms, mod.config.keep_dense, dense_mb)
    if notes:
        reason += " (" + "; ".join(notes) + ")"
    chosen = config if path == "triton" else (config_cu if path == "cuda" else None)
    return Decision(path, chosen, times, dense_ms, reason)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref||: the check every CUDA configuration passes (< 2e-2) before it is timed."""
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def _tune_cuda(mod, x: torch.Tensor) -> tuple[dict | None, float, list[str]]:
    """The fastest CUDA-kernel configuration at ``x``'s token count (dass.infer.cuda.candidates),
    its time, and notes. Every configuration is first checked against cuBLAS on the dense
    matrix (relative error < 2e-2): a configuration that computes something else is never
    chosen, whatever its speed."""
    from dass.infer import cuda as cu

    N, K, T = mod.out_features, mod.in_features, x.shape[0]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    cands = cu.candidates(mod.orientation, T, N, K, sms)
    ref = torch.nn.functional.linear(x, mod.dense_weight(), mod.bias).float()
    nbytes = mod.cu_values.numel() * 4 + mod.cu_meta.numel() * 4
    nc = copies_for(nbytes)
    ops = [(mod.cu_values, mod.cu_meta)] + [(mod.cu_values.clone(), mod.cu_meta.clone()) for _ in range(nc - 1)]
    best, best_t, notes = None, float("inf"), []
    for c in cands:
        y = cu.mm(x, mod.cu_values, mod.cu_meta, mod.bias, N, mod.orientation, c).float()
        err = _rel_err(y, ref)
        if not err < 2e-2:
            notes.append(f"cuda {c} wrong (rel. error {err:.2e}): not used")
            continue
        t = gpu_time(lambda i, c=c: cu.mm(x, ops[i][0], ops[i][1], mod.bias, N, mod.orientation, c), nc)
        if t < best_t:
            best, best_t = c, t
    act = getattr(mod, "glu_act", None)
    if best is not None and act is not None:
        g = _tune_glu(mod, x, ref, ops, nc, act, best_t, notes)
        if g is not None:
            best = {**best, "glu": g}
    del ops
    return best, best_t, notes


def _tune_glu(mod, x: torch.Tensor, ref: torch.Tensor, ops: list, nc: int, act: str, best_t: float,
              notes: list[str]) -> dict | None:
    """For a stacked [gate; up] matrix: the fastest register configuration with the GLU
    epilogue (act(g) * u in the product's own launch), kept only if it beats the best plain
    product plus the separate activation kernel it replaces (checked against cuBLAS first)."""
    from dass.infer import cuda as cu
    from dass.infer.kernels import glu_act_mul

    N, K, T = mod.out_features, mod.in_features, x.shape[0]
    D = N // 2
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    cands = cu.glu_candidates(mod.orientation, T, N, K, sms)
    if not cands:
        return None
    gu = ref.to(x.dtype)
    h_ref = glu_act_mul(gu, D, act).float()
    t_act = gpu_time(lambda i: glu_act_mul(gu, D, act), 1)
    best, best_g = None, best_t + t_act
    for c in cands:
        h = cu.glu_runner(mod.cu_values, mod.cu_meta, mod.bias, N, mod.orientation, c, act)(x).float()
        err = _rel_err(h, h_ref)
        if not err < 2e-2:
            notes.append(f"cuda GLU {c} wrong (rel. error {err:.2e}): not used")
            continue
        runs = [cu.glu_runner(ops[i][0], ops[i][1], mod.bias, N, mod.orientation, c, act) for i in range(nc)]
        t = gpu_time(lambda i: runs[i](x), nc)
        if t < best_g:
            best, best_g = {**c, "us": round(t * 1e3, 2)}, t
    notes.append(f"GLU epilogue: {'%.2f us' % (best_g * 1e3) if best else 'not faster'} vs "
                 f"{best_t * 1e3:.2f} + {t_act * 1e3:.2f} us (product + activation kernel)")
    return best


def _time_path(mod, x: torch.Tensor, path: str) -> float:
    """GPU ms per call of one path, cycling over copies of the module's operands."""
    nbytes = mod.out_features * mod.in_features * 9 // 16  # the compressed bytes
    nc = copies_for(nbytes if path != "dense" else 2 * nbytes)
    ops = [mod.operands()] + [mod.operand_copy(path) for _ in range(nc - 1)]
    mod.run_path(x, path)  # compile, search cuSPARSELt's algorithm
    return gpu_time(lambda i: mod.run_path(x, path, ops=ops[i]), nc)
