"""What a run did: per-matrix results, per-layer times, fallbacks and notes.

Plain data (no model, no tensors): the manifest is built from :meth:`PruneReport.to_dict`
and a resumed streaming run restores its matrices with :meth:`MatrixReport.from_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dass.core.alpha_report import alpha_summary


def versions() -> dict[str, str]:
    """The versions a result was made with (a resumed run must match them)."""
    import torch
    import transformers

    from dass import __version__

    return {"dass": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def cpu_name() -> str:
    """The CPU's model name: float results differ in their last bits between CPUs (and
    thread counts), which can move a near-tie mask choice, so results record it."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class MatrixReport:
    key: str
    name: str
    role: str
    shape: tuple[int, int]
    pattern: str
    orientation: str | None
    sparsity: float
    method: str
    expert: int | None = None
    rows: tuple[int, int] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MatrixReport":
        """Inverse of ``__dict__`` (after a JSON round trip: tuples come back as lists)."""
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        d["rows"] = tuple(d["rows"]) if d.get("rows") is not None else None
        return cls(**d)


@dataclass
class PruneReport:
    """What :func:`prune` did: per-matrix sparsity and orientation, fallbacks, timings."""

    method: str
    options: dict[str, Any]
    pattern: str
    scope: str
    nsamples: int
    seqlen: int
    matrices: list[MatrixReport] = field(default_factory=list)
    layer_seconds: list[float] = field(default_factory=list)
    capture_seconds: float = 0.0
    total_seconds: float = 0.0
    fallbacks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reconstruct: dict[str, Any] | None = None  # the reconstruction options, when blocks were refitted
    blocks: list[dict[str, Any]] = field(default_factory=list)  # per refitted block: loss before/after

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned matrices."""
        total = sum(m.shape[0] * m.shape[1] for m in self.matrices)
        zeros = sum(m.sparsity * m.shape[0] * m.shape[1] for m in self.matrices)
        return zeros / max(total, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "options": self.options,
            "pattern": self.pattern,
            "scope": self.scope,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "sparsity": self.sparsity,
            "capture_seconds": self.capture_seconds,
            "total_seconds": self.total_seconds,
            "layer_seconds": self.layer_seconds,
            "fallbacks": self.fallbacks,
            "notes": self.notes,
            **({"reconstruct": self.reconstruct, "blocks": self.blocks} if self.reconstruct is not None else {}),
            "matrices": [m.__dict__ for m in self.matrices],
        }

    def summary(self) -> str:
        line = (
            f"{self.method} {self.pattern} ({self.scope}): {len(self.matrices)} matrices, "
            f"sparsity {self.sparsity:.4f}, {self.total_seconds:.1f} s"
            + (f", {len(self.fallbacks)} fallback(s)" if self.fallbacks else "")
        )
        if self.blocks:
            before = sum(b["loss_before"] for b in self.blocks) / len(self.blocks)
            after = sum(b["loss_after"] for b in self.blocks) / len(self.blocks)
            line += f"; {len(self.blocks)} blocks refitted, mean block error {before:.4f} -> {after:.4f}"
        # what --alpha auto chose per block, and its warnings
        extra = alpha_summary([m.info for m in self.matrices if m.role == "gate"])
        return "\n".join([line, *extra])
