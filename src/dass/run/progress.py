"""One progress line for a whole run, moving from its first second.

A run's work is counted in units that each take a similar time: one calibration batch
through a layer (the statistics pass, then the propagation) and one reconstruction step.
The bar's total is known before the first layer, so tqdm shows the elapsed time and an ETA
as soon as the first units are done, not only after the first layer (which on a CPU at the
paper's calibration size takes minutes); the description says which layer and phase.
"""

from __future__ import annotations

from typing import Any

try:  # progress bars are a nicety, never a requirement
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


class Progress:
    """``layers`` layers of ``units_per_layer`` units each; disabled when not ``enabled``."""

    def __init__(self, label: str, layers: int, units_per_layer: int, enabled: bool = True, start_layer: int = 0) -> None:
        self.label = label
        self.layers = layers
        self.layer = start_layer
        self.bar: Any = None
        if enabled and tqdm is not None:
            remaining = max(layers - start_layer, 0) * max(units_per_layer, 1)
            self.bar = tqdm(total=remaining, desc=self._desc("start"), unit="step", dynamic_ncols=True,
                            smoothing=0.05, mininterval=0.5)

    def _desc(self, phase: str) -> str:
        return f"{self.label} layer {min(self.layer + 1, self.layers)}/{self.layers} {phase}"

    def phase(self, layer: int, phase: str) -> None:
        self.layer = layer
        if self.bar is not None:
            self.bar.set_description_str(self._desc(phase), refresh=False)

    def advance(self, units: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(units)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
