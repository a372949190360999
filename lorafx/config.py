"""Adapter configs: one frozen dataclass per variant, registered by name.

A variant registers its config class with :func:`register_variant`; the registry maps the JSON name
(``{"variant": "lora", ...}``) to the class. Specs serialize as registry key + version + fields, never
as an import path, so a saved spec stays loadable when code moves.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from lorafx.errors import SpecError

_VARIANTS: dict[str, type[AdapterConfig]] = {}


def register_variant(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: register an :class:`AdapterConfig` subclass under ``cls.name``.

    The class's ``__post_init__`` is extended with :func:`check_field_types`, after the variant's own
    checks (whose messages are more specific), so every field of every variant is type-checked."""
    name = cls.name
    if name in _VARIANTS and _VARIANTS[name] is not cls:
        raise ValueError(f"variant {name!r} is registered twice ({_VARIANTS[name].__qualname__}, {cls.__qualname__})")
    own = getattr(cls, "__post_init__", None)

    def __post_init__(self):
        try:
            if own is not None:
                own(self)
        except TypeError:  # a range check met a value of the wrong type ("0.1" < 1): name the field
            check_field_types(self)
            raise
        check_field_types(self)

    cls.__post_init__ = __post_init__
    _VARIANTS[name] = cls
    return cls


def check_field_types(cfg: AdapterConfig) -> None:
    """Every field of ``cfg`` has its annotated type, strictly: a bool field takes only ``True`` or
    ``False`` (JSON ``"false"`` would be truthy), an int field no bool (``True`` would be 1), a float
    field a finite number (NaN or Inf alpha would make every output NaN), a Literal one of its values.
    ``ValueError`` naming the variant and field."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        problem = _type_problem(getattr(cfg, f.name), hints[f.name])
        if problem:
            raise ValueError(f"{cfg.name}: {f.name} must be {problem}, got {getattr(cfg, f.name)!r}")


def _type_problem(value: Any, hint: Any) -> str | None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        problems = [_type_problem(value, a) for a in options]
        return None if any(p is None for p in problems) else " or ".join(problems)
    if origin is typing.Literal:
        return None if value in args and type(value) is type(args[0]) else f"one of {list(args)}"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an int"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is tuple:
        return None if isinstance(value, tuple) else "a list"
    return None


def variant_names() -> list[str]:
    """Names of every registered variant, sorted (``import lorafx`` has registered the built-in ones)."""
    return sorted(_VARIANTS)


def variant_class(name: str) -> type[AdapterConfig]:
    """The config class registered as ``name``; a clear error lists the valid names otherwise."""
    if name not in _VARIANTS:
        raise SpecError(f"unknown variant {name!r}; known variants: {', '.join(sorted(_VARIANTS))}")
    return _VARIANTS[name]


@dataclass(frozen=True)
class AdapterConfig:
    """Base of every variant's config. Subclasses are frozen dataclasses with a ``name`` ClassVar."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1  # raise it when the fields change, and teach :meth:`migrate` the old form
    # Site kinds (lorafx.site_kinds) whose math this variant's lowering fits; the site rule refuses the others.
    site_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    def make_adapter(self, in_features: int, out_features: int, site: str):
        """Build the adapter module for one site of shape ``[out_features, in_features]``."""
        raise NotImplementedError

    @classmethod
    def finalize(cls, adapters: dict, adapter_name: str):
        """Model-level post-pass over every site of this variant in one ``apply`` (site FQN -> adapter).

        Returns an optional ``nn.Module`` of shared state that ``apply`` registers on the model root
        (``model.lorafx_shared``), e.g. Uni-LoRA's one vector. Default: nothing shared.
        """
        return None

    def mergeable(self) -> bool:
        """True when ΔW is a constant matrix at inference (no input-dependent gate)."""
        return True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"variant": name, "version": v, **fields}``."""
        fields = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"variant": self.name, "version": self.version, **fields}

    @classmethod
    def migrate(cls, version: int, data: dict[str, Any]) -> dict[str, Any]:
        """The fields of a config saved at ``version`` (1 <= version < ``cls.version``), in today's form.

        :meth:`from_dict` calls it for older files only. A variant that raises its ``version`` overrides
        it to rename, drop or add fields; the default is for a version that changed no field.
        """
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AdapterConfig:
        """Inverse of :meth:`to_dict`; unknown variants, versions or fields are a :class:`SpecError`.

        Configs saved by an older lorafx (any version from 1 up to the class's ``version``) go through
        :meth:`migrate`; a newer version than this lorafx knows is refused.
        """
        data = dict(data)
        if "variant" not in data:
            raise SpecError(f"adapter config {data!r} has no 'variant' key")
        cls = variant_class(data.pop("variant"))
        version = data.pop("version", cls.version)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= cls.version:
            raise SpecError(
                f"variant {cls.name!r}: config version {version!r} is not supported (this lorafx reads {cls.version})"
            )
        if version < cls.version:
            data = dict(cls.migrate(version, data))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"variant {cls.name!r}: unknown config field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
