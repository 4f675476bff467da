"""Options of :func:`dass.infer.accelerate.accelerate` (one dataclass, defaults measured on an
H200: docs/speed.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AccelerateConfig"]


@dataclass
class AccelerateConfig:
    """How accelerated 2:4 modules choose and run their paths.

    ``keep_dense`` is the memory-for-speed option: every accelerated matrix also keeps its
    dense weight, so the dispatcher can run plain cuBLAS in the token buckets where no
    sparse path beats it ("never slower than dense" then holds everywhere). Cost: the dense
    bytes on top of the compressed ones: 156% of the dense size for those matrices instead
    of 56% (docs/speed.md gives the sizes of a 7B model). Off by default.
    ``accelerate(..., tune_tokens=...)`` with ``keep_dense`` drops the copies of the matrices
    whose tuned buckets never chose them.
    """

    # static choice (autotune=False): Triton up to this many tokens, then cuSPARSELt (input
    # orientation) or decompress + cuBLAS
    triton_max_tokens: dict[str, int] = field(default_factory=lambda: {"input": 128, "output": 128})
    # input orientation: token counts [lo, hi] where decompress + cuBLAS beats cuSPARSELt
    dense_band: tuple[int, int] | None = None
    # time the candidate paths on first use of each (shape, token bucket) and keep the
    # fastest (recorded on disk, see dass.infer.tuning_cache); when False the static
    # thresholds above decide
    autotune: bool = True
    # search the Triton kernels' launch configurations too (else their defaults are timed)
    tune_kernels: bool = True
    # read and write the on-disk tuning cache (True: the default file, see
    # dass.infer.tuning_cache; a path: that file; False: none)
    tuning_cache: bool | str = True
    autotune_max_triton_tokens: int = 1024
    keep_dense: bool = False
    graphs: bool = True
    graph_mlp: bool = True
    graph_max_tokens: int = 16384
    max_graphs_per_module: int = 16
    # ask cuSPARSELt for its fastest algorithm per (shape, token bucket) on first use; its
    # default (alg_id 0) lost to dense cuBLAS at 1024-16384 tokens on an H200 (docs/speed.md)
    cslt_alg_search: bool = True
    # ... from this many tokens on, bf16 only: with torch 2.11's cuSPARSELt on an H200 the
    # fp16 search fails and leaves the CUDA context broken (docs/speed.md)
    cslt_search_min_tokens: int = 256
    # which paths replay per-module graphs when called outside a graphed MLP
    graph_paths: tuple[str, ...] = ("cslt",)
    # stack a GLU's 2:4 gate and up into one product (dass.infer.mlp_fusion)
    fuse_gate_up: bool = True
    # stack attention's 2:4 q, k and v into one product (dass.infer.attn_fusion); off until
    # measured on a GPU
    fuse_qkv: bool = False
    # the CUDA C++ kernels for 1-128 tokens (dass.infer.cuda; built on first use, skipped with
    # the reason in NM24Linear.cuda_reason where they cannot be built); their packed copy of
    # the weight (56% of its dense bytes) is stored beside the Triton layout
    cuda_kernels: bool = True
    # with the CUDA kernels built, keep only their packed copy (56% of the dense bytes): no
    # Triton layout and no cuSPARSELt copy; past 128 tokens the decompress path unpacks it on
    # the GPU for cuBLAS. False keeps those copies too (+56% each; cuSPARSELt runs the input
    # orientation faster than decompress at a few hundred to a few thousand tokens)
    one_copy: bool = True
