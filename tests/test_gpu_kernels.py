"""CUDA-only: the Triton kernels as registered for ``torch.ops.lorafx`` on real GPU tensors.

Skipped without CUDA (tests/conftest.py). Reference: the composite run in float64 on the same data.
"""

import pytest
import torch
from tolerances import assert_close

import lorafx

pytestmark = pytest.mark.gpu

# fp32 runs the base GEMM with ieee dots (no tf32); half types round inputs and the output once.
GPU_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


def _data(M, K, N, r, dtype, gate):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype).requires_grad_()
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, device="cuda", generator=g).to(dtype)
    A = (torch.randn(r, K, device="cuda", generator=g) / K**0.5).requires_grad_()
    B = (torch.randn(N, r, device="cuda", generator=g) / r**0.5).requires_grad_()
    s = torch.tensor(0.5, device="cuda")
    gt = torch.rand(M, r, device="cuda", generator=g) if gate else None
    return x, W, b, A, B, s, gt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4096, 4096), (333, 1000, 1531), (2048, 4096, 4096)])
@pytest.mark.parametrize("gate", [False, True])
def test_op_forward_backward_on_cuda(dtype, shape, gate):
    from lorafx import canonical

    args = _data(*shape, 16, dtype, gate)
    y = torch.ops.lorafx.lora_linear(*args)
    ref_args = [a.double().detach().requires_grad_(a.requires_grad) if a is not None else None for a in args]
    x, W, b, A, B, s, gt = ref_args  # the canonical evaluator in float64, differentiable plain PyTorch
    want = canonical.expand(torch.nn.functional.linear(x, W, b), canonical.shrink(x, A, gt), B, s)
    assert_close(y.double(), want, **GPU_TOL[dtype])
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (args[0], args[3], args[4]), dy)
    exp = torch.autograd.grad(want, (ref_args[0], ref_args[3], ref_args[4]), dy.double())
    for a, w in zip(got, exp, strict=True):
        assert_close(a.double(), w, **GPU_TOL[dtype])


def test_compiled_adapted_llama_on_cuda_uses_the_op():
    from lorafx.cli.models import tiny_llama

    model = tiny_llama(seed=0).cuda()
    model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=8, init="random"), targets="all-linear"))
    ids = torch.randint(0, 256, (2, 16), device="cuda")
    with torch.no_grad():
        want = model(ids).logits
        assert lorafx.compile_check(model, (ids,), kernels="auto", fuse_shrinks=True) < 1e-3
        assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gate", [False, True])
def test_opcheck_triton_op_on_cuda(gate):
    """``lorafx::lora_linear_triton`` traces into its kernels (fake tensors cannot run the interpreter,
    so this check needs a GPU)."""
    from lorafx.kernels import lora_linear

    assert lora_linear.cuda_op() is not lora_linear.lora_linear, "lorafx.kernels did not register Triton on CUDA"
    args = _data(37, 96, 80, 8, torch.float32, gate)
    torch.library.opcheck(torch.ops.lorafx.lora_linear_triton.default, args)
    torch.library.opcheck(torch.ops.lorafx.lora_linear.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_celora_input_grad_kernel_on_cuda(dtype):
    """The gathered-K GEMM + shrink kernel pair vs the paper's formula in fp64, a Llama-7B v_proj shape."""
    g = torch.Generator(device="cuda").manual_seed(0)
    T, d_out, d_in, r0 = 512, 4096, 4096, 14
    G = torch.randn(T, d_out, device="cuda", generator=g).to(dtype)
    W = (torch.randn(d_out, d_in, device="cuda", generator=g) / d_in**0.5).to(dtype)
    B0 = (torch.randn(d_out, r0, device="cuda", generator=g) / r0**0.5).to(dtype)
    A0 = (torch.randn(r0, d_in, device="cuda", generator=g) / d_in**0.5).to(dtype)
    index = torch.randperm(d_out, device="cuda", generator=g)[: int(0.55 * d_out)].sort().values
    got = torch.ops.lorafx.celora_input_grad(G, W, B0, A0, index)
    G64, W64, B64, A64 = (t.double() for t in (G, W, B0, A0))
    want = (G64 @ B64) @ A64 + G64[:, index] @ (W64 - B64 @ A64)[index]  # the paper's form
    assert got.dtype == dtype
    assert_close(got.double(), want, **GPU_TOL[dtype])
