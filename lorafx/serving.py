"""``lorafx.using_adapter``: serve several adapters from one eager model to several threads.

The active adapter is per-model state (:func:`lorafx.set_adapter`), so two threads that switch the
same model to different adapters would see each other's choice. ``using_adapter`` holds a per-model
re-entrant lock for the switch *and* the forward, so requests are served one at a time, each with its
own adapter, and the previously active adapter is restored afterwards. ``set_adapter``, ``set_scale``,
``delete_adapter`` and ``apply`` take the same lock, so a change from another thread waits for the
request in flight. Threads that all use the
active adapter can call the model concurrently without it. A list of names runs one batch with a
different adapter per row (:mod:`lorafx.rows`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lorafx import rows, state
from lorafx.several import names_of
from lorafx.state import set_adapter


@contextmanager
def using_adapter(model: nn.Module, name: str | None | list[str | None]) -> Iterator[nn.Module]:
    """Run the block with adapter ``name`` active, exclusively among ``using_adapter`` callers.

    Args:
        model: a model adapted by :func:`lorafx.apply`.
        name: the adapter to activate, or None for the base model; or a list, one entry per batch row
            (adapter name, or None for the base model), for ``forward`` and ``generate`` alike. A batch
            of ``k·len(name)`` rows (``num_beams``, ``num_return_sequences``) gives rows ``i·k`` to
            ``i·k+k-1`` adapter ``name[i]``; any other batch size is an error. Variants with an
            input-dependent gate (MoR) are refused; see :mod:`lorafx.rows`.

    Example:
        >>> with lorafx.using_adapter(model, "customer_17"), torch.no_grad():
        ...     logits = model(input_ids).logits
        >>> with lorafx.using_adapter(model, ["support", "legal", None]), torch.no_grad():
        ...     out = model.generate(input_ids_of_3_rows, max_new_tokens=20)
    """
    if isinstance(name, list | tuple):
        with rows.per_row(model, name):
            yield model
        return
    with state.model_lock(model):
        previous = state.get(model).active
        set_adapter(model, name)  # validates the name before changing anything
        try:
            yield model
        finally:
            # The block may have deleted the previous adapter (a held lock keeps other threads out,
            # but not this one): then the model ends with adapters off, as delete_adapter leaves it.
            kept = [n for n in names_of(previous) if n in state.get(model).specs]  # several: a tuple
            set_adapter(model, kept or None)
