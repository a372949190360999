"""Triton kernels and launchers for the ``lorafx::`` ops; the only importer of triton in lorafx.

* :mod:`~lorafx.kernels._triton.kernels`: the two ``@triton.jit`` kernels (shrink; fused GEMM +
  expand) and the jit helpers they share;
* :mod:`~lorafx.kernels._triton.configs`: the autotune configs and the pruning rule that keeps only
  those that compile without spills (verified by ``python -m benchmarks.kernels --static``);
* :mod:`~lorafx.kernels._triton.launchers`: grids, segments, the op-level entry points with the same
  contracts as the composites, and the ``triton_op`` twin ``lorafx::lora_linear_triton``.

Never imported by ``import lorafx``; each op file (``lorafx.kernels.<op>``) imports the launchers when
CUDA and triton are available and registers them itself. On CPU the kernels run under the Triton
interpreter (``TRITON_INTERPRET=1`` before ``import triton``), which is how the tests check them.
"""
