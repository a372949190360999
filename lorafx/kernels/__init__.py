"""Kernels for the canonical form. ``reference`` is plain PyTorch (the CPU path and the test oracle).

Importing this package does not import triton; the Triton kernels live in their own modules.
"""

from lorafx.kernels.reference import lora_linear

__all__ = ["lora_linear"]
