"""The method interface and the registry."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import torch

from dass.core.patterns import Orientation, Pattern
from dass.core.stats import FeatureStats
from dass.methods.options import MethodError, MethodOptions, split_spec


@dataclass
class MatrixResult:
    """What a method decided for one matrix."""

    mask: torch.Tensor  # bool, True = kept
    orientation: Orientation | None  # N:M group direction; None for unstructured
    weight: torch.Tensor | None = None  # updated weight (reconstructing methods), else None
    info: dict[str, Any] = field(default_factory=dict)


class PruningMethod:
    """Base class: scores each matrix independently; GLU-aware methods override
    :meth:`prune_glu`.

    A method is built from its options object (``DaSS(DaSSOptions(alpha="auto"))``) or
    from option values (``DaSS(alpha="auto")``, also given as text); :attr:`opts` holds
    the validated object. What the pipeline must provide (the Hessian, kept input rows,
    a GLU block) is declared by the properties below, derived from the options.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for ``dass prune --help``
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_calibration: ClassVar[bool] = True

    def __init__(self, options: MethodOptions | None = None, /, **values: Any) -> None:
        if options is None:
            options = self.Options.parse(values)
        elif values:
            raise MethodError(f"{self.name}: pass an options object or option values, not both")
        elif not isinstance(options, self.Options):
            raise MethodError(f"{self.name} takes {self.Options.__name__}, got {type(options).__name__}")
        self.opts = options

    @property
    def needs_hessian(self) -> bool:
        return False

    @property
    def requires_glu(self) -> bool:
        return False

    @property
    def sample_tokens(self) -> int:
        """Rows of each block input to keep for the method (0: none)."""
        return 0

    def options(self) -> dict[str, Any]:
        """The method's settings, for the report and the manifest."""
        return self.opts.record()

    def spec(self) -> str:
        """The method and its options in the spec syntax (``dass:alpha=auto,...``)."""
        return self.opts.to_spec()

    def orientation(self, role: str) -> Orientation:
        """Direction of N:M groups for a matrix of ``role`` (gate, up, down, attn, linear)."""
        return "input"

    def prune_linear(self, weight: torch.Tensor, stats: FeatureStats | None, pattern: Pattern) -> MatrixResult:
        raise NotImplementedError

    def prune_glu(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        x_stats: FeatureStats | None,
        h_stats: FeatureStats | None,
        pattern: Pattern,
        act: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[MatrixResult, MatrixResult, MatrixResult]:
        """Masks for one GLU block. ``x_stats`` describe the block's input (gate/up inputs),
        ``h_stats`` the intermediate activations (down's input); ``act`` is the block's
        activation (SiLU, GELU-tanh), for methods that evaluate the block's output."""
        return (
            self.prune_linear(gate, x_stats, pattern),
            self.prune_linear(up, x_stats, pattern),
            self.prune_linear(down, h_stats, pattern),
        )


_REGISTRY: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available under ``cls.name`` (its options class
    must name the same method, so that its errors do)."""
    if not cls.name:
        raise MethodError(f"{cls.__name__} has no name")
    if cls.Options.method != cls.name:
        raise MethodError(f"{cls.__name__}.Options is for {cls.Options.method!r}, not {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[PruningMethod]:
    """The class registered as ``name``."""
    try:
        return _REGISTRY[name.strip().lower()]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(available_methods())}") from None


def get_method(spec: "str | PruningMethod", **options: Any) -> PruningMethod:
    """A method from a name or spec (``"dass"``, ``"dass:alpha=auto,rescale=down"``) plus
    option values (which must not repeat the spec's), or a method object as it is."""
    if isinstance(spec, PruningMethod):
        if options:
            raise MethodError(f"{spec.name}: options given beside a method object")
        return spec
    if not isinstance(spec, str):
        raise MethodError(f"a method is a name such as 'dass' or a method object, got {spec!r}")
    name, values = split_spec(spec)
    cls = method_class(name)
    both = sorted(set(values) & set(options))
    if both:
        raise MethodError(f"{name}: option {both[0]!r} given both in the spec and separately")
    return cls(**{**values, **options})


def option_names(cls: type[PruningMethod]) -> list[str]:
    return [f.name for f in fields(cls.Options)]


def methods_with_option(option: str) -> list[str]:
    """The registered methods that take ``option``."""
    return [n for n in available_methods() if option in option_names(_REGISTRY[n])]


def get_method_with(
    spec: str, extra: dict[str, Any], *, strict: bool = True, label: Callable[[str], str] = str
) -> PruningMethod:
    """The method of ``spec`` with more option values given separately (the CLI's
    ``--alpha``/``--rescale`` shortcuts; None = not given). ``strict``: a value for an option
    the method does not have is an error (naming the option as ``label(option)``);
    otherwise it is left out for this method (``dass compare`` over several methods)."""
    name, values = split_spec(spec)
    cls = method_class(name)
    known = option_names(cls)
    for key, value in extra.items():
        if value is None:
            continue
        if key not in known:
            if strict:
                takers = " and ".join(methods_with_option(key)) or "no method"
                raise MethodError(f"{label(key)} applies to {takers} only, not to {name}")
            continue
        if key in values:
            raise MethodError(f"{name}: {label(key)} given both in the method spec and separately")
        values[key] = value
    return cls(**values)

