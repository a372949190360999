"""The module class of a rewritten region: a GraphModule that runs its eager-inference twin when exact.

``lorafx.apply`` replaces each region of a model by an :class:`AdaptedRegion` (made by
:func:`lorafx.passes.insert_adapters.insert_adapters`). It is an ``fx.GraphModule`` in every way that
passes, torch.compile, export, pickling and ``state_dict`` see, with one addition: every (re)compile
also builds the graph's eager twin (:mod:`lorafx.passes.eager_sites`) and makes it ``forward``; the
twin's first statement hands every call to the canonical graph's code unless the call is

* eager (not torch.compile/export, not ``torch.jit.trace``, not fx tracing: the first argument is a
  plain ``torch.Tensor``, so fake, functorch and subclass tensors go the canonical way),
* without autograd (``torch.no_grad``/``inference_mode``), and
* not observed by global module hooks (``register_module_forward_hook``: the twin does not call the
  site containers as modules, so such hooks would miss them).

Each site of the twin still chooses per call between three ops and the canonical pair
(:func:`lorafx.canonical.eager_lora_linear`), so the result is the canonical one in every case.
Measured on the benchmark Llama (hidden 1024, 4 layers, LoRA r = 16 on all seven projections, batch 1,
2 threads, medians of 150–200 interleaved decode steps in one process): 1.11–1.13× the base model's
step through the canonical graph; through the twin 1.09–1.10× when it was a wrapper around the twin
function, 1.078× with the guard as the twin's first statement and the containers read from
``lorafx._modules``, 1.064–1.077× (six processes; 1.074–1.087× for the code before, side by side)
called as a plain module without fx's call wrapper and with a frameless ``torch.distributed`` check
(``benchmarks/overhead.py --decode`` has the whole-``generate`` and single-step rows).

A deep copy keeps the class (GraphModule's ``__deepcopy__`` re-runs ``__init__``); an unpickled
region comes back as a plain GraphModule (torch.fx rebuilds it from its code) and is as exact, only
without the twin.
"""

from __future__ import annotations

import itertools
import linecache

import torch
from torch import fx
from torch.nn.modules import module as _module

from lorafx.passes.eager_sites import eager_sites_graph

# The attribute of a rewritten region that holds its sites' containers (a ModuleDict of SiteAdapters);
# the graph calls ``self.lorafx.<key>`` (lorafx.passes.insert_adapters).
CONTAINER = "lorafx"


_twins = itertools.count()  # names the twins' generated files
_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling  # the function torch.compile and export answer True for
_jit_tracing = torch._C._is_tracing


def _not_eager(first) -> bool:
    """True when a call must take the canonical graph: autograd on, a first argument that is not a plain
    ``torch.Tensor`` (fx proxies, fake, functorch and subclass tensors), torch.compile/export,
    ``torch.jit.trace``, or global module hooks (the twin does not call the site containers as modules).
    The cheapest test that decides most calls comes first (training steps: grad mode)."""
    return (
        _grad_enabled()
        or type(first) is not torch.Tensor
        or _is_compiling()
        or _jit_tracing()
        or bool(
            _module._global_forward_pre_hooks
            or _module._global_forward_hooks
            or _module._global_forward_hooks_always_called
        )
    )


class _GuardedTwin(fx.graph.CodeGen):
    """Code of the eager twin whose first statement hands every call :func:`_not_eager` refuses to the
    canonical ``forward``: one Python frame per region call instead of a wrapper around the twin (the
    wrapper cost ~2% of a decode step on the benchmark Llama, ~17 µs per region call with cold caches)."""

    def __init__(self, canonical, params: list[str]):
        super().__init__()
        self._canonical = canonical
        self._params = params  # the forward's parameters as the canonical forward takes them

    def gen_fn_def(self, free_vars, maybe_return_annotation, **kwargs):
        head = super().gen_fn_def(free_vars, maybe_return_annotation, **kwargs)
        first = self._params[0]
        call = ", ".join(["self", *self._params])
        return f"{head}\n    if _lorafx_not_eager({first}):\n        return _lorafx_canonical({call})"

    def additional_globals(self):
        return [("_lorafx_not_eager", _not_eager), ("_lorafx_canonical", self._canonical)]


class AdaptedRegion(fx.GraphModule):
    """A rewritten region (see the module docstring)."""

    def recompile(self):
        code = super().recompile()
        cls = type(self)  # GraphModule makes one class per instance: forward is set per region
        # GraphModule.recompile sets cls.__call__ to a wrapper (two Python frames and a super() per call)
        # whose only job is to print the generated code around an exception's line to stderr. A region
        # is called once per site or block per token: the wrapper cost ~1% of a decode step on the
        # benchmark Llama (five processes, 0.5-2.4%). Without it a call is nn.Module.__call__, found
        # through the MRO at each call (so fx's tracer still sees the patched one), and an exception
        # keeps its full traceback through the generated code.
        if "__call__" in cls.__dict__:
            del cls.__call__
        twin = eager_sites_graph(self.graph, CONTAINER)
        params = [n.target for n in self.graph.nodes if n.op == "placeholder"]  # "*args" for varargs
        if twin is None or not params or params[0].startswith("*") or type(twin._codegen) is not fx.graph.CodeGen:
            # no plain site, a first parameter that is not one value (regions are traced from named
            # parameters), or a codegen (pytree) whose signature this one cannot mirror: canonical only
            return code
        twin.set_codegen(_GuardedTwin(cls.forward, params))
        src = twin.python_code(root_module="self")
        namespace = dict(src.globals)
        name = f"<lorafx eager twin {next(_twins)}>"  # in linecache: tracebacks show the twin's lines
        linecache.cache[name] = (len(src.src), None, src.src.splitlines(keepends=True), name)
        exec(compile(src.src, name, "exec"), namespace)  # noqa: S102
        cls.forward = namespace["forward"]
        return code
