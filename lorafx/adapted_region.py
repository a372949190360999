"""The module class of a rewritten region: a GraphModule that runs its eager-inference twin when exact.

``lorafx.apply`` replaces each region of a model by an :class:`AdaptedRegion` (made by
:func:`lorafx.passes.insert_adapters.insert_adapters`). It is an ``fx.GraphModule`` in every way that
passes, torch.compile, export, pickling and ``state_dict`` see, with one addition: every (re)compile
also builds the graph's eager twin (:mod:`lorafx.passes.eager_sites`), and ``forward`` runs the twin
for a call that is

* eager (not torch.compile/export, not ``torch.jit.trace``, not fx tracing: the first argument is a
  plain ``torch.Tensor``, so fake, functorch and subclass tensors go the canonical way),
* without autograd (``torch.no_grad``/``inference_mode``), and
* not observed by global module hooks (``register_module_forward_hook``: the twin does not call the
  site containers as modules, so such hooks would miss them).

Each site of the twin still chooses per call between three ops and the canonical pair
(:func:`lorafx.canonical.eager_lora_linear`), so the result is the canonical one in every case.
Measured on the benchmark Llama (hidden 1024, 4 layers, LoRA r = 16 on all seven projections, batch 1,
2 threads, medians of 200 interleaved decode steps in one process): 1.11–1.13× the base model's step
through the canonical graph, 1.075–1.09× through the twin (``benchmarks/overhead.py --decode`` has
the whole-``generate`` rows).

A deep copy keeps the class (GraphModule's ``__deepcopy__`` re-runs ``__init__``); an unpickled
region comes back as a plain GraphModule (torch.fx rebuilds it from its code) and is as exact, only
without the twin.
"""

from __future__ import annotations

import functools

import torch
from torch import fx
from torch.nn.modules import module as _module

from lorafx.passes.eager_sites import eager_sites_graph

# The attribute of a rewritten region that holds its sites' containers (a ModuleDict of SiteAdapters);
# the graph calls ``self.lorafx.<key>`` (lorafx.passes.insert_adapters).
CONTAINER = "lorafx"


def _no_global_hooks() -> bool:
    return not (
        _module._global_forward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_hooks_always_called
    )


class AdaptedRegion(fx.GraphModule):
    """A rewritten region (see the module docstring)."""

    def recompile(self):
        code = super().recompile()
        cls = type(self)  # GraphModule makes one class per instance: forward is set per region
        canonical = cls.forward
        twin = eager_sites_graph(self.graph, CONTAINER)
        if twin is None:
            return code
        src = twin.python_code(root_module="self")
        namespace = dict(src.globals)
        exec(compile(src.src, f"<lorafx eager twin of {cls.__name__}>", "exec"), namespace)  # noqa: S102
        eager = namespace["forward"]

        @functools.wraps(canonical)
        def forward(self, *args, **kwargs):
            if torch.compiler.is_compiling() or torch.is_grad_enabled() or torch.jit.is_tracing():
                return canonical(self, *args, **kwargs)
            first = args[0] if args else next(iter(kwargs.values()), None)
            if type(first) is torch.Tensor and _no_global_hooks():
                return eager(self, *args, **kwargs)
            return canonical(self, *args, **kwargs)

        cls.forward = forward
        return code
