"""What the adapter finds in a decoder layer: the prunable matrices, GLU blocks, linear
targets, activations to capture and refittable blocks, gathered in a :class:`LayerPlan`.

Plain data (views into the model's parameters), kept apart from the code that finds them
(:mod:`dass.arch.plan`) because every later layer of dass reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

Role = Literal["gate", "up", "down", "attn", "linear"]


@dataclass
class MatrixRef:
    """One prunable 2D weight: a parameter, optionally one expert of a 3D parameter and/or
    a block of rows of a fused weight. :meth:`get` returns a view, so in-place writes
    update the model."""

    name: str  # parameter name as in the state dict (without expert/rows)
    module: nn.Module
    role: Role
    attr: str = "weight"
    expert: int | None = None
    rows: tuple[int, int] | None = None
    transposed: bool = False  # stored [in, out] (Conv1D): get() returns the [out, in] view

    def parameter(self) -> torch.Tensor:
        """The whole parameter this matrix is (part of)."""
        return getattr(self.module, self.attr)

    def view_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of ``tensor`` (shaped like :meth:`parameter`) that is this matrix."""
        w = tensor
        if self.expert is not None:
            w = w[self.expert]
        if self.rows is not None:
            w = w[self.rows[0] : self.rows[1]]
        return w.t() if self.transposed else w

    def get(self) -> torch.Tensor:
        return self.view_of(self.parameter())

    @property
    def key(self) -> str:
        """A unique, readable identifier (``name[expert][rows]``)."""
        key = self.name
        if self.expert is not None:
            key += f"[{self.expert}]"
        if self.rows is not None:
            key += f"[{self.rows[0]}:{self.rows[1]}]"
        return key

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.get().shape)  # type: ignore[return-value]


@dataclass
class GLUBlock:
    gate: MatrixRef
    up: MatrixRef
    down: MatrixRef
    x_key: str  # statistics of the block input
    h_key: str  # statistics of the intermediate activations (down's input)
    expert: int | None = None
    act: Callable[[torch.Tensor], torch.Tensor] | None = None  # gate activation (SiLU, GELU)


@dataclass
class LinearTarget:
    ref: MatrixRef
    x_key: str


@dataclass
class InputCapture:
    """Observe input[0] of ``module`` (an nn.Linear) into statistics ``key``."""

    key: str
    module: nn.Module
    features: int


@dataclass
class ExpertsCapture:
    """Observe a fused-experts module (3D ``gate_up_proj``/``down_proj``): for each expert,
    the tokens routed to it and its intermediate activations, computed from its weights."""

    module: nn.Module
    prefix: str
    num_experts: int
    act_fn: Callable[[torch.Tensor], torch.Tensor]

    def x_key(self, e: int) -> str:
        return f"{self.prefix}[{e}].x"

    def gate_up(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e``'s gate and up weights ``[I, d]`` (views of the fused 3D tensor)."""
        gu = getattr(self.module, "gate_up_proj")[e]
        inter = gu.shape[0] // 2
        return gu[:inter], gu[inter:]

    @staticmethod
    def routed(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [tokens, d], top-k expert indices [tokens, k])`` of a fused-experts call
        ``(hidden_states, top_k_index, top_k_weights)``."""
        hs = args[0] if args else kwargs["hidden_states"]
        idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hs = hs.reshape(-1, hs.shape[-1])
        return hs, idx.reshape(hs.shape[0], -1)

    def h_key(self, e: int) -> str:
        return f"{self.prefix}[{e}].h"


@dataclass
class Block:
    """A submodule of a decoder layer whose pruned weights can be refitted as one unit:
    the MLP (GLU, plain or mixture of experts) or the attention. ``token_wise``: each
    token's output depends on that token's input alone (MLPs), so any set of calibration
    rows can be fed to it; otherwise (attention) whole sequences must be."""

    name: str  # "mlp" or "attention"
    module: nn.Module
    prefix: str
    token_wise: bool


@dataclass
class LayerPlan:
    """What to observe and prune in one decoder layer."""

    index: int
    prefix: str
    layer: nn.Module
    glu: list[GLUBlock] = field(default_factory=list)
    linears: list[LinearTarget] = field(default_factory=list)
    inputs: list[InputCapture] = field(default_factory=list)
    experts: list[ExpertsCapture] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    attention_pruned: bool = False

    def matrices(self) -> list[MatrixRef]:
        out: list[MatrixRef] = []
        for b in self.glu:
            out += [b.gate, b.up, b.down]
        out += [t.ref for t in self.linears]
        return out

    def feature_sizes(self) -> dict[str, int]:
        """Statistics key -> number of features."""
        sizes = {c.key: c.features for c in self.inputs}
        for cap in self.experts:
            gu = getattr(cap.module, "gate_up_proj")
            dn = getattr(cap.module, "down_proj")
            for e in range(cap.num_experts):
                sizes[cap.x_key(e)] = gu.shape[-1]
                sizes[cap.h_key(e)] = dn.shape[-1]
        return sizes
