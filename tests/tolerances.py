"""Every numeric tolerance of the test suite, in one table. An override sits here with its reason.

fp32: 1e-5 absolute on logits of O(1) magnitude — two orderings of the same fp32 sums (lorafx's
in-place addmm vs PEFT's separate add) differ by a few ulps (measured max 0 to 4e-7 on tiny Llama).
fp16/bf16 tolerances are a few units in the last place of a value of magnitude ~1.
"""

import torch

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

# Named overrides, each with its reason.
ONNX_FP32 = dict(atol=1e-4, rtol=1e-4)  # onnxruntime reorders fp32 reductions (issue 5 asks 1e-4)


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def assert_close(actual, expected, dtype=torch.float32, **override):
    torch.testing.assert_close(actual, expected, **{**tol(dtype), **override})
