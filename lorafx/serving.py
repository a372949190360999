"""``lorafx.using_adapter``: serve several adapters from one eager model to several threads.

The active adapter is per-model state (:func:`lorafx.set_adapter`), so two threads that switch the
same model to different adapters would see each other's choice. ``using_adapter`` holds a per-model
re-entrant lock for the switch *and* the forward, so requests are served one at a time, each with its
own adapter, and the previously active adapter is restored afterwards. Threads that all use the
active adapter can call the model concurrently without it. (One batch with a different adapter per
row needs the multi-adapter path: the ONNX multi-adapter graph.)
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lorafx import state
from lorafx.state import set_adapter

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock(model: nn.Module) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def using_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Run the block with adapter ``name`` active, exclusively among ``using_adapter`` callers.

    Args:
        model: a model adapted by :func:`lorafx.apply`.
        name: the adapter to activate, or None for the base model.

    Example:
        >>> with lorafx.using_adapter(model, "customer_17"), torch.no_grad():
        ...     logits = model(input_ids).logits
    """
    with _lock(model):
        previous = state.get(model).active
        set_adapter(model, name)  # validates the name before changing anything
        try:
            yield model
        finally:
            set_adapter(model, previous)
