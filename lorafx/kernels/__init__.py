"""The ``lorafx::`` op family for the canonical form (:mod:`lorafx.canonical` is their CPU composite).

Importing this package does not import triton. ``lorafx.kernels.ops`` registers the ``lorafx::`` op
family (and, on CUDA with triton installed, the Triton kernels of ``lorafx.kernels.triton_lora``);
``lorafx.kernels.lowering.use_kernels`` points rewritten sites at it.
"""
