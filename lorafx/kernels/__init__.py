"""Kernels for the canonical form. ``reference`` is plain PyTorch (the CPU path and the test oracle).

Importing this package does not import triton. ``lorafx.kernels.ops`` registers the ``lorafx::`` op
family (and, on CUDA with triton installed, the Triton kernels of ``lorafx.kernels.triton_lora``);
``lorafx.kernels.lowering.use_kernels`` points rewritten sites at it.
"""

from lorafx.kernels.reference import lora_linear

__all__ = ["lora_linear"]
