"""Pass: lower the sites of a region to a kernel choice (``"ops"``: the ``lorafx::`` op family).

Kernel choices are site implementations (:data:`lorafx.canonical.SITE_IMPLEMENTATIONS`) named by
what they do:

* ``"composite"``: :func:`lorafx.canonical.lora_linear`, plain PyTorch (inductor fuses it);
* ``"ops"``: :func:`lorafx.kernels.site.op_lora_linear`, each site one ``torch.ops.lorafx`` op node
  (Triton on CUDA, the composite on CPU).

``"reference"`` and ``"triton"``, the names of earlier releases, are aliases of the two. The pass is
pure: it returns a copy made by :func:`~lorafx.passes.retarget_sites.retarget_sites`; swapping it into
a model (and undoing that) is :func:`lorafx.compiler.use_kernels`'s job.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from lorafx.errors import SpecError
from lorafx.passes.retarget_sites import retarget_sites

KERNELS = ("composite", "ops")
ALIASES = {"reference": "composite", "triton": "ops"}


def kernel_name(kernels: str) -> str:
    """``kernels`` with aliases resolved; a :class:`~lorafx.SpecError` for an unknown name."""
    name = ALIASES.get(kernels, kernels)
    if name not in KERNELS:
        known = ["auto", *KERNELS, *ALIASES]
        raise SpecError(f"kernels must be one of {known}, got {kernels!r}")
    return name


def lower_to_ops(gm: fx.GraphModule, kernels: str = "ops") -> PassResult:
    """A copy of region ``gm`` whose sites call the ``kernels`` implementation; ``gm`` is untouched.

    The copy shares ``gm``'s submodules and weights. ``modified`` is False when every site already
    called it (the copy is then equal to ``gm`` and need not be used).
    """
    import lorafx.kernels  # noqa: F401  (registers the "ops" site implementation and the lorafx:: ops)

    return retarget_sites(gm, kernel_name(kernels))
