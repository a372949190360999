"""``Spec.modules_to_save`` (PEFT's name and semantics): whole modules trained and saved per adapter.

Each named module (a classification head, an embedding) is replaced by a :class:`SavedModule` that
keeps the frozen original and one trainable copy per adapter; the active adapter's copy runs
(``set_adapter`` switches it; an adapter without a copy runs the original). Adapter files hold the
copy under the module's FQN (``classifier.weight``), as PEFT's checkpoints do
(``base_model.model.classifier.weight``). ``merge_and_unload`` puts the active copy in the module's
place (the trained head stays in the merged model, as PEFT); ``unload`` puts the original back.

``Spec(task="seq_cls")`` adds PEFT's SEQ_CLS heads (``classifier``, ``score``). Names match as
``targets`` do (the FQN, or a dotted suffix); PEFT matches any string suffix (``key.endswith``).
"""

from __future__ import annotations

import copy

from torch import nn

from lorafx.errors import SpecError

TASK_HEADS = {"seq_cls": ("classifier", "score")}  # PEFT 0.21's SEQ_CLS classifier_module_names


class SavedModule(nn.Module):
    """A module of ``modules_to_save``: ``original`` (frozen) and ``copies[adapter]`` (trainable).

    Attributes the wrapper does not have (``weight``, ``out_features``) read through to the original.
    """

    def __init__(self, original: nn.Module, fqn: str):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.fqn = fqn
        self.__dict__["_slot"] = None  # the running copy (see SiteAdapters.active: Dynamo guards its type only)
        self.__dict__["_active"] = None

    @property
    def active(self) -> str | None:
        """Name of the adapter whose copy runs (None: the original)."""
        return self.__dict__["_active"]

    @active.setter
    def active(self, name: str | None) -> None:
        self.__dict__["_active"] = name
        self.__dict__["_slot"] = self.copies[name] if name in self.copies else None

    def add(self, name: str) -> nn.Module:
        """A trainable copy of the original for adapter ``name`` (not yet registered)."""
        twin = copy.deepcopy(self.original)
        twin.requires_grad_(True)
        return twin

    def forward(self, *args, **kwargs):
        module = self.__dict__["_slot"]
        return (module if module is not None else self.original)(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original"], name)

    def extra_repr(self) -> str:
        return f"fqn={self.fqn!r}, active={self.active!r}"


def saved_names(spec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(entries that must each match a module, task heads of which at least one must match)."""
    return tuple(spec.modules_to_save), TASK_HEADS.get(spec.task, ())


def _matches(fqn: str, entry: str) -> bool:
    return fqn == entry or fqn.endswith("." + entry)


def plan_saved(model: nn.Module, spec) -> dict[str, nn.Module]:
    """FQN -> module for every module ``spec`` saves (outermost match wins); a :class:`SpecError`
    names entries that match nothing, or a ``task`` whose heads the model does not have."""
    entries, heads = saved_names(spec)
    if not entries and not heads:
        return {}
    found: dict[str, nn.Module] = {}
    hit: set[str] = set()
    for fqn, m in model.named_modules():
        if not fqn or any(fqn.startswith(f + ".") for f in found):
            continue
        names = [e for e in (*entries, *heads) if _matches(fqn, e)]
        if names:
            found[fqn] = m.original if isinstance(m, SavedModule) else m
            hit.update(names)
    missing = [e for e in entries if e not in hit]
    if missing:
        raise SpecError(f"modules_to_save entries {missing} match no module of {type(model).__name__}")
    if heads and not hit & set(heads):
        raise SpecError(f"task {spec.task!r}: {type(model).__name__} has none of the heads {list(heads)}")
    return found


def covered(fqn: str, saved: dict[str, nn.Module]) -> str | None:
    """The saved module that holds site ``fqn`` (adapters never go inside one, as in PEFT), or None."""
    return next((s for s in saved if fqn == s or fqn.startswith(s + ".")), None)


def iter_saved(model: nn.Module) -> dict[str, SavedModule]:
    """FQN -> :class:`SavedModule` for every saved module of ``model``."""
    return {m.fqn: m for m in model.modules() if isinstance(m, SavedModule)}


def frozen_head(model: nn.Module, saved: dict[str, nn.Module], selected) -> str | None:
    """The classification head of a ``*ForSequenceClassification`` model that neither an adapter nor
    ``modules_to_save`` trains (it is freshly initialised: left frozen it never learns), or None."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return None
    for head in TASK_HEADS["seq_cls"]:
        if isinstance(getattr(model, head, None), nn.Module) and not covered(head, saved):
            if not any(f == head or f.startswith(head + ".") for f in selected):
                return head
    return None
