"""Typed method options and the one spec syntax, ``method:key=value,key=value``.

Every method declares its options as a frozen dataclass derived from
:class:`MethodOptions`; each field says how a value given as text is read (``parse``), what
it means (``help``) and, for options that only apply in some configurations, when they do
(``when``). The object validates itself on construction, so whoever builds it (the CLI,
``dass.prune``, a config file, a resumed run) gets the same checks and the same error
messages, and what it records in the manifest (:meth:`MethodOptions.record`) is read back
by the same code (:meth:`MethodOptions.parse`).

An option with ``when`` defaults to ``None``, which means "not given": giving it where it
does not apply is an error, and :meth:`MethodOptions.resolve` fills in the value that
applies. That keeps both "alpha_candidates only applies to alpha=auto" and "rescale
defaults to down with auto" in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping, TypeVar

from dass.errors import UserValueError


class MethodError(UserValueError):
    """Unknown method name or bad method options."""


Parser = Callable[[Any], Any]
T = TypeVar("T", bound="MethodOptions")


def option(
    default: Any,
    help: str,
    parse: Parser,
    *,
    when: Callable[[Any], bool] | None = None,
    record: Callable[[Any], bool] | None = None,
    default_text: str | None = None,
) -> Any:
    """A dataclass field of a method's options (see the module docstring). ``record``:
    when the manifest records the option (default: whenever it applies); an option whose
    value in some configuration is the one :meth:`MethodOptions.resolve` would give
    anyway may be left out there, as long as the record still reads back equal."""
    return field(
        default=default,
        metadata={"help": help, "parse": parse, "when": when, "record": record, "default_text": default_text},
    )


# ------------------------------------------------------------------------------ parsers
# Each takes a value as given in Python or as text from a spec and returns the canonical
# value, or raises ValueError with the reason (the caller adds method and option names).


def as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number, got {value!r}") from None


def as_nonneg_float(value: Any) -> float:
    v = as_float(value)
    if not v >= 0:
        raise ValueError(f"must be >= 0, got {value!r}")
    return v


def as_positive_float(value: Any) -> float:
    v = as_float(value)
    if not v > 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return v


def as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"must be an integer, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be an integer, got {value!r}") from None
    if f != int(f):
        raise ValueError(f"must be an integer, got {value!r}")
    return int(f)


def as_positive_int(value: Any) -> int:
    v = as_int(value)
    if v < 1:
        raise ValueError(f"must be >= 1, got {value!r}")
    return v


def as_nonneg_int(value: Any) -> int:
    v = as_int(value)
    if v < 0:
        raise ValueError(f"must be >= 0, got {value!r}")
    return v


def as_bool(value: Any) -> bool:
    """A bool, or text: true/1/yes/on, false/0/no/off."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def one_of(*choices: str) -> Parser:
    def parse(value: Any) -> str:
        text = str(value).strip().lower() if isinstance(value, str) else value
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return text

    parse.choices = choices  # type: ignore[attr-defined]
    return parse


def as_float_list(value: Any) -> tuple[float, ...]:
    """Numbers as a list/tuple, or text separated by '/', ',' or spaces (``0/0.5/1``)."""
    if isinstance(value, str):
        items = [v for v in value.replace("/", " ").replace(",", " ").split() if v]
    else:
        try:
            items = list(value)
        except TypeError:
            items = [value]
    if not items:
        raise ValueError("must list at least one number")
    return tuple(as_nonneg_float(v) for v in items)


# ------------------------------------------------------------------------------ the base


@dataclass(frozen=True)
class MethodOptions:
    """Options of one method; subclasses add fields made with :func:`option`."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        given = []
        for f in fields(self):  # read every value first: ``when`` may look at any of them
            value = getattr(self, f.name)
            if value is None:
                continue
            given.append(f)
            parse = f.metadata.get("parse")
            if parse is not None:
                try:
                    value = parse(value)
                except ValueError as exc:
                    raise MethodError(f"{self.method}: {f.name} {exc}") from None
                object.__setattr__(self, f.name, value)
        for f in given:
            when = f.metadata.get("when")
            if when is not None and not when(self):
                raise MethodError(f"{self.method}: option {f.name} does not apply here ({f.metadata['help']})")
        self.resolve()

    def resolve(self) -> None:
        """Fill in options left at ``None`` that apply, and check combinations; override.
        Use :meth:`_set` to store a value (the dataclass is frozen)."""

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def applies(self, name: str) -> bool:
        """Whether option ``name`` means anything in this configuration."""
        f = next(f for f in fields(self) if f.name == name)
        when = f.metadata.get("when")
        return when is None or bool(when(self))

    def record(self) -> dict[str, Any]:
        """The options that apply, as plain JSON values: what the manifest records and
        what :meth:`parse` (or the spec) reads back into an equal object."""
        out: dict[str, Any] = {}
        for f in self._ordered_fields():
            keep = f.metadata.get("record") or f.metadata.get("when")
            if keep is not None and not keep(self):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def _ordered_fields(cls) -> list:
        """The method's own options first, then those it shares (e.g. the rescale's)."""
        own = [f for f in fields(cls) if f.name in cls.__dict__.get("__annotations__", {})]
        return own + [f for f in fields(cls) if f not in own]

    @classmethod
    def parse(cls: type[T], values: Mapping[str, Any]) -> T:
        """Options from a mapping of names to values (text or Python values)."""
        names = {f.name for f in fields(cls)}
        unknown = [k for k in values if k not in names]
        if unknown:
            known = ", ".join(sorted(names)) or "none"
            raise MethodError(f"{cls.method}: unknown option {unknown[0]!r} (its options: {known})")
        return cls(**dict(values))

    def to_spec(self) -> str:
        """``method:key=value,...`` of the options that apply (lists joined with '/')."""
        parts = []
        for k, v in self.record().items():
            if isinstance(v, list):
                text = "/".join(f"{x:g}" for x in v)
            elif isinstance(v, bool):
                text = str(v).lower()
            else:
                text = f"{v:g}" if isinstance(v, float) else str(v)
            parts.append(f"{k}={text}")
        return self.method + (":" + ",".join(parts) if parts else "")

    #: Defaults that depend on other options, described for ``--help`` (by option name).
    default_texts: ClassVar[dict[str, str]] = {}

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """``(name, default, help)`` of every option, for ``dass prune --help``."""
        out = []
        for f in cls._ordered_fields():
            if f.name in cls.default_texts:
                default = cls.default_texts[f.name]
            elif f.metadata.get("default_text"):
                default = f.metadata["default_text"]
            elif isinstance(f.default, tuple):
                default = "/".join(f"{x:g}" for x in f.default)
            else:
                default = str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
            out.append((f.name, default, f.metadata.get("help", "")))
        return out


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"dass:alpha=auto,rescale=down"`` -> ``("dass", {"alpha": "auto", "rescale": "down"})``.

    Values may not contain ',' (lists use '/': ``alpha_candidates=0/0.5/1``)."""
    name, _, rest = spec.strip().partition(":")
    values: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise MethodError(f"{name}: option {item!r} is not key=value (e.g. {name}:alpha=0.5)")
        if key.strip() in values:
            raise MethodError(f"{name}: option {key.strip()!r} given twice")
        values[key.strip()] = value.strip()
    return name.strip().lower(), values
