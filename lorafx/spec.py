"""``Spec``: which linear call sites get which adapter config.

Targets follow PEFT's semantics so that PEFT users' habits carry over: a list matches a site whose
FQN equals an entry or ends with ``"." + entry``; a string is a regex that must match the whole FQN;
``"all-linear"`` matches every linear site except the model's output head. ``exclude`` takes the same
forms. ``overrides`` maps a pattern (same rules as one list entry, or a full-match regex) to either a
dict of config fields (e.g. ``{"r": 4}``) or a whole config (another variant at those sites); the
first matching pattern wins.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorafx.config import AdapterConfig
from lorafx.errors import SpecError

ALL_LINEAR = "all-linear"
TASKS = (None, "seq_cls")  # seq_cls: the classification head is trained and saved (lorafx.saved_modules)
SPEC_FORMAT_VERSION = 1


def _matches_entry(fqn: str, entry: str) -> bool:
    """PEFT list semantics: equal, or a dotted suffix."""
    return fqn == entry or fqn.endswith("." + entry)


def _matches_pattern(fqn: str, pattern: str) -> bool:
    """One override/list pattern: a suffix entry, or a regex matching the whole FQN."""
    if _matches_entry(fqn, pattern):
        return True
    try:
        return re.fullmatch(pattern, fqn) is not None
    except re.error:
        return False


@dataclass(frozen=True)
class Spec:
    """Where adapters go and what they are.

    Args:
        config: the adapter config used at every matched site (e.g. ``lorafx.LoRA(r=8)``).
        targets: list of FQN suffixes, a regex string (full match), or ``"all-linear"``.
        exclude: sites never adapted, in the same forms as ``targets`` (no ``"all-linear"``).
        overrides: ``{pattern: {field: value}}`` or ``{pattern: AdapterConfig}``; first match wins.
        modules_to_save: modules (FQN or dotted suffix) trained whole, one copy per adapter, saved with
            it (PEFT's ``modules_to_save``; :mod:`lorafx.saved_modules`).
        task: ``"seq_cls"`` saves the classification head (``classifier``/``score``), as PEFT's SEQ_CLS.

    Example:
        >>> spec = Spec(LoRA(r=16), targets="all-linear", overrides={"down_proj": {"r": 8}})
    """

    config: AdapterConfig
    targets: str | tuple[str, ...] = ALL_LINEAR
    exclude: str | tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    task: str | None = None

    def __post_init__(self):
        if not isinstance(self.config, AdapterConfig):
            raise SpecError(f"Spec.config must be an adapter config such as lorafx.LoRA(...), got {self.config!r}")
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            value = getattr(self, name)
            if not isinstance(value, (str, tuple)) or (
                isinstance(value, tuple) and not all(isinstance(v, str) for v in value)
            ):
                raise SpecError(f"Spec.{name} must be a list of names, a regex string or 'all-linear', got {value!r}")
            if isinstance(value, str) and value != ALL_LINEAR:
                try:
                    re.compile(value)
                except re.error as e:
                    raise SpecError(f"Spec.{name} regex {value!r} does not compile: {e}") from None
        saved = self.modules_to_save
        saved = tuple(saved) if isinstance(saved, list) else saved
        if not isinstance(saved, tuple) or not all(isinstance(v, str) and v for v in saved):
            raise SpecError(f"Spec.modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        object.__setattr__(self, "modules_to_save", saved)
        if self.task not in TASKS:
            raise SpecError(f"Spec.task must be one of {list(TASKS)}, got {self.task!r}")
        if self.targets == () or self.targets == "":
            raise SpecError("Spec.targets is empty: name the sites to adapt, a regex, or 'all-linear'")
        if self.exclude == ALL_LINEAR:
            raise SpecError("Spec.exclude cannot be 'all-linear'")
        if not isinstance(self.overrides, Mapping):
            raise SpecError(f"Spec.overrides must map patterns to field dicts or configs, got {self.overrides!r}")
        resolved = {}
        for pattern, value in dict(self.overrides).items():
            if isinstance(value, AdapterConfig):
                resolved[pattern] = value
            elif isinstance(value, Mapping):
                try:
                    resolved[pattern] = dataclasses.replace(self.config, **value)
                except TypeError as e:
                    raise SpecError(f"Spec.overrides[{pattern!r}]: {e}") from None
                except ValueError as e:
                    raise SpecError(f"Spec.overrides[{pattern!r}]: {e}") from None
            else:
                raise SpecError(
                    f"Spec.overrides[{pattern!r}] must be a dict of fields or an adapter config, got {value!r}"
                )
        object.__setattr__(self, "_resolved", resolved)

    # -- matching ---------------------------------------------------------------------------------

    def match(self, fqn: str, is_output_head: bool = False) -> str | None:
        """The rule that selects ``fqn`` (e.g. ``"target 'q_proj'"``), or None if it is not selected."""
        if self._excluded(fqn):
            return None
        t = self.targets
        if t == ALL_LINEAR:
            return None if is_output_head else "all-linear"
        if isinstance(t, str):
            return f"regex {t!r}" if re.fullmatch(t, fqn) else None
        for entry in t:
            if _matches_entry(fqn, entry):
                return f"target {entry!r}"
        return None

    def _excluded(self, fqn: str) -> bool:
        e = self.exclude
        if isinstance(e, str):
            return bool(e) and re.fullmatch(e, fqn) is not None
        return any(_matches_entry(fqn, entry) for entry in e)

    def config_for(self, fqn: str) -> tuple[AdapterConfig, str | None]:
        """The config at ``fqn`` and the override pattern that chose it (None = the base config)."""
        for pattern, cfg in self._resolved.items():
            if _matches_pattern(fqn, pattern):
                return cfg, pattern
        return self.config, None

    def unused_patterns(self, fqns: Sequence[str]) -> list[str]:
        """Target entries and override patterns that select none of ``fqns`` (to explain mistakes)."""
        unused = []
        if isinstance(self.targets, tuple):
            unused += [t for t in self.targets if not any(_matches_entry(f, t) for f in fqns)]
        unused += [p for p in self._resolved if not any(_matches_pattern(f, p) for f in fqns)]
        return unused

    def dead_entries(self, all_fqns: Sequence[str], chosen: Mapping[str, str | None]) -> list[str]:
        """Entries that cannot change anything, described: ``exclude`` entries that match no linear
        site of the model (a misspelt exclude would leave the site it meant adapted), and overrides
        that match selected sites but are shadowed there by an earlier pattern (first match wins).
        ``chosen`` maps each selected site to the override that chose its config."""
        dead = []
        if isinstance(self.exclude, tuple):
            dead += [
                f"exclude {e!r} matches no linear site"
                for e in self.exclude
                if not any(_matches_entry(f, e) for f in all_fqns)
            ]
        elif self.exclude and not any(re.fullmatch(self.exclude, f) for f in all_fqns):
            dead.append(f"exclude regex {self.exclude!r} matches no linear site")
        won = set(chosen.values())
        for p in self._resolved:
            if p not in won and any(_matches_pattern(f, p) for f in chosen):
                shadow = next(chosen[f] for f in chosen if _matches_pattern(f, p))
                dead.append(f"override {p!r} never applies: {shadow!r} comes first and wins at every site it matches")
        return dead

    # -- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; round-trips through :meth:`from_dict`."""
        return {
            "format": "lorafx.spec",
            "format_version": SPEC_FORMAT_VERSION,
            "config": self.config.to_dict(),
            "targets": self.targets if isinstance(self.targets, str) else list(self.targets),
            "exclude": self.exclude if isinstance(self.exclude, str) else list(self.exclude),
            "overrides": {p: _override_to_dict(self.config, v) for p, v in self._resolved.items()},
            **({"modules_to_save": list(self.modules_to_save)} if self.modules_to_save else {}),
            **({"task": self.task} if self.task else {}),
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Spec:
        """Build a spec from :meth:`to_dict` output; unknown versions, variants or keys are a :class:`SpecError`."""
        if not isinstance(data, Mapping):
            raise SpecError(f"a spec must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version", SPEC_FORMAT_VERSION)
        if version != SPEC_FORMAT_VERSION:
            raise SpecError(
                f"spec format_version {version!r} is not supported (this lorafx reads {SPEC_FORMAT_VERSION})"
            )
        known = {"format", "format_version", "config", "targets", "exclude", "overrides", "modules_to_save", "task"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"spec has unknown key(s) {unknown}")
        if "config" not in data:
            raise SpecError('spec has no \'config\' key (e.g. {"config": {"variant": "lora", "r": 8}})')
        for key, kind in (("config", Mapping), ("overrides", Mapping)):
            if key in data and not isinstance(data[key], kind):
                raise SpecError(f"spec {key!r} must be a JSON object, got {data[key]!r}")
        overrides = {}
        for pattern, value in dict(data.get("overrides", {})).items():
            overrides[pattern] = (
                AdapterConfig.from_dict(value) if isinstance(value, Mapping) and "variant" in value else value
            )
        return Spec(
            config=AdapterConfig.from_dict(data["config"]),
            targets=data.get("targets", ALL_LINEAR),
            exclude=data.get("exclude", ()),
            overrides=overrides,
            modules_to_save=data.get("modules_to_save", ()),
            task=data.get("task"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Spec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"spec is not valid JSON: {e}") from None
        return Spec.from_dict(data)


def _override_to_dict(base: AdapterConfig, cfg: AdapterConfig) -> dict[str, Any]:
    """A field-dict override when the variant is the same (readable), else the full config."""
    if type(cfg) is type(base):
        return {k: v for k, v in cfg.to_dict().items() if k not in ("variant", "version") and v != base.to_dict()[k]}
    return cfg.to_dict()
