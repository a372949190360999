"""The fused 4-bit dequant + GEMM + adapter-expand kernel (``lorafx::lora_linear_4bit``), run by the
Triton interpreter on CPU, against ``dequant(Wq)`` + matmul in float64.

Reference: bitsandbytes' own table-based ``dequantize_4bit`` (its default backend: ``code[q] ·
absmax[i // blocksize]`` over the flat weight, the decoding its CUDA kernel does), equal to
:func:`lorafx.quantized.dequantized_weight` whenever ``K % blocksize == 0``. Not that function for
other K: bitsandbytes 0.50's CPU C kernel then indexes the scales per row and decodes other values
(K = 96, blocksize 64: max |W - dequant(quant(W))| 0.13 with it, 0.043 with the table, NF4).
``TRITON_INTERPRET=1`` must be set before ``import triton``, so a normal run executes
this file again in a subprocess with the variable set (as tests/test_triton_kernels.py does).
"""

import os

import pytest
import torch
from helpers import run_under_triton_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(INTERPRETED, reason="this is the launcher; the kernel tests run in its subprocess")
def test_4bit_kernel_under_the_triton_interpreter():
    pytest.importorskip("triton")
    pytest.importorskip("bitsandbytes")
    run_under_triton_interpreter(__file__, "not under_the and not opcheck")


@pytest.mark.skipif(INTERPRETED, reason="runs once, in the launching process")
def test_4bit_op_opcheck_and_gradients_against_fp64():
    """``lorafx::lora_linear_4bit`` and its backward op on CPU (their composites): ``torch.library.opcheck``
    (schema, fake, autograd registration), and output plus x/A/B/gate gradients equal to dequant-then-``lora_linear``
    in fp64 (bitsandbytes' ``dequantize_4bit`` for W: nf4 + double quant, K a multiple of the block)."""
    bnb = pytest.importorskip("bitsandbytes")
    from tolerances import assert_close

    from lorafx.kernels import lora_linear_4bit as op
    from lorafx.kernels.quantized_site import fused_operands
    from lorafx.quantized import dequantized_weight

    g = torch.Generator().manual_seed(0)
    lin = bnb.nn.Linear4bit(128, 48, bias=True, compute_dtype=torch.float32, compress_statistics=True)
    lin.load_state_dict({"weight": torch.randn(48, 128, generator=g) / 11, "bias": torch.randn(48, generator=g)})
    lin = lin.cpu()
    operands = fused_operands(lin)
    x = torch.randn(2, 5, 128, generator=g, requires_grad=True)
    A = (torch.randn(8, 128, generator=g) / 11).requires_grad_()
    B = torch.randn(48, 8, generator=g, requires_grad=True)
    s, gate = torch.tensor(0.5), torch.rand(2, 5, 8, generator=g, requires_grad=True)
    args = (x, *operands, lin.bias.detach(), A, B, s, gate)
    torch.library.opcheck(op.lora_linear_4bit, args)
    dy0 = torch.randn(2, 5, 48, generator=g)
    plain = [t.detach() for t in (x, A, B)]  # a backward op: no autograd of its own, as lora_linear_backward
    back_args = (dy0, plain[0], *operands, plain[1], plain[2], s, gate.detach(), None, True)
    torch.library.opcheck(op.lora_linear_4bit_backward, back_args)
    y = op.lora_linear_4bit(*args)
    W = dequantized_weight(lin).double()
    leaves = [x, A, B, gate]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    xd, Ad, Bd, gd = ref_leaves
    ref = xd @ W.T + lin.bias.double() + 0.5 * ((xd @ Ad.T) * gd) @ Bd.T
    assert_close(y.double(), ref, torch.float32)  # an fp32 op vs fp64: the fp32 tolerance
    dy = torch.randn(y.shape, generator=g)
    for a, w in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, ref_leaves, dy.double()), strict=True):
        assert_close(a.double(), w, torch.float32)


if INTERPRETED:
    import bitsandbytes as bnb
    from bitsandbytes.backends.default import ops as bnb_default
    from tolerances import KERNEL_4BIT, assert_close
    from torch import nn

    import lorafx
    from lorafx.kernels import lora_linear_4bit as op
    from lorafx.kernels import quantized_site
    from lorafx.quantized import dequantized_weight

    def _linear4bit(K, N, quant_type, nested, bias=True, seed=0):
        g = torch.Generator().manual_seed(seed)
        lin = bnb.nn.Linear4bit(
            K, N, bias=bias, compute_dtype=torch.float32, compress_statistics=nested, quant_type=quant_type
        )
        state = {"weight": torch.randn(N, K, generator=g) / K**0.5}
        if bias:
            state["bias"] = torch.randn(N, generator=g)
        lin.load_state_dict(state)
        return lin.cpu()  # bitsandbytes quantizes on the first move to a device

    def _reference_weight(lin) -> torch.Tensor:
        qs = lin.weight.quant_state
        absmax = qs.absmax.float()
        if qs.nested:
            absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        table_dequant = bnb_default._dequantize_4bit_compute.__wrapped__  # without bitsandbytes' torch.compile
        W = table_dequant(lin.weight.data.reshape(-1), absmax, qs.code, qs.blocksize, qs.shape, torch.float32)
        if qs.shape[1] % qs.blocksize == 0:
            assert torch.equal(W, dequantized_weight(lin))
        return W.double()

    # (M, K, N, quant_type, double quant): K = 128 and 192 take the aligned path (one scale per column
    # of a K tile), K = 70 and 96 the per-element one (70: a quant block straddles two rows).
    CASES = [
        (5, 128, 40, "nf4", True),
        (7, 96, 33, "nf4", False),
        (3, 70, 19, "fp4", True),
        (17, 192, 24, "fp4", False),
    ]

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
    def test_fused_4bit_kernel_matches_dequant_then_matmul(case, dtype):
        M, K, N, quant_type, nested = case
        lin = _linear4bit(K, N, quant_type, nested, bias=M % 2 == 1, seed=M)
        operands = quantized_site.fused_operands(lin)
        W = _reference_weight(lin)
        assert_close(op.dequantize_4bit(*operands[:7], K, *operands[7:]).double(), W, torch.float64, atol=0, rtol=0)
        g = torch.Generator().manual_seed(1)
        for r, gate, dropout in ((1, False, False), (16, True, True)):
            x = torch.randn(M, K, generator=g).to(dtype)
            x_in = x * 0.5 if dropout else None
            A, B = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g)
            s, gt = torch.tensor(0.75), (torch.rand(M, r, generator=g) if gate else None)
            b = None if lin.bias is None else lin.bias.detach().to(dtype)
            got = op.triton_forward(x, *operands, b, A, B, s, gt, x_in)
            xd = x.double()
            h = (xd if x_in is None else x_in.double()) @ A.double().T * (1.0 if gt is None else gt.double())
            want = xd @ W.T + 0.75 * h @ B.double().T + (0 if b is None else b.double())
            assert got.dtype == dtype and got.shape == (M, N)
            assert_close(got.double(), want, torch.float64, **KERNEL_4BIT[dtype])
            composite = op.lora_linear_4bit(x, *operands, b, A, B, s, gt, x_in)  # the op's CPU kernel
            assert_close(composite.double(), want, torch.float64, **KERNEL_4BIT[dtype])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=lambda c: "-".join(map(str, c)))
    def test_fused_4bit_backward_matches_fp64_autograd(case, dtype):
        """``triton_backward``: ``dx = dy·dequant(Wq) + dh A`` with W decoded transposed (aligned: K =
        128, NF4; per-element: K = 70, FP4), and dA, dB, dg, d_xin, against fp64 autograd."""
        M, K, N, quant_type, nested = case
        lin = _linear4bit(K, N, quant_type, nested, bias=False, seed=M)
        operands = quantized_site.fused_operands(lin)
        W = _reference_weight(lin)
        g = torch.Generator().manual_seed(2)
        r = 8
        for gate, dropout in ((False, False), (True, True)):
            x = torch.randn(M, K, generator=g).to(dtype)
            x_in = x * 0.5 if dropout else None
            A, B = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g)
            s, gt = torch.tensor(0.75), (torch.rand(M, r, generator=g) if gate else None)
            dy = torch.randn(M, N, generator=g).to(dtype)
            got = op.triton_backward(dy, x, *operands, A, B, s, gt, x_in, True)
            leaves = [t.double().requires_grad_() for t in (x, A, B)]
            xd, Ad, Bd = leaves
            xin = xd * 0.5 if dropout else xd
            gd = gt.double().requires_grad_() if gate else None
            h = (xin @ Ad.T) * (1.0 if gd is None else gd)
            y = xd @ W.T + 0.75 * h @ Bd.T
            want = torch.autograd.grad(y, leaves + ([gd] if gate else []), dy.double())
            dx, d_xin, dA, dB, dg = got
            assert dx.dtype == dtype and dA.dtype == dB.dtype == torch.float32
            if dropout:  # dx is the base path's share of ∂x; x_in = x/2 adds d_xin/2
                dx = dx.double() + 0.5 * d_xin.double()
            for name, a, w in zip(("dx", "dA", "dB", "dg"), (dx, dA, dB, dg), want, strict=False):
                assert_close(a.double(), w, torch.float64, **KERNEL_4BIT[dtype], msg=name)

    def test_ranks_above_the_kernels_limit_run_the_composites(monkeypatch):
        """Above ``MAX_KERNEL_RANK`` (the kernel spills there) ``triton_forward``/``triton_backward`` are
        the op's composites, bit for bit, and launch nothing; at 128 the kernel runs."""
        from lorafx.kernels._common import MAX_KERNEL_RANK
        from lorafx.kernels._triton import lora_4bit

        def launched(*_, **__):
            raise AssertionError("the 4-bit kernel was launched")

        monkeypatch.setattr(lora_4bit, "lora_4bit", launched)
        M, K, N = 5, 128, 40
        lin = _linear4bit(K, N, "nf4", True, bias=True, seed=M)
        operands = quantized_site.fused_operands(lin)
        g = torch.Generator().manual_seed(3)
        x, b = torch.randn(M, K, generator=g), lin.bias.detach()
        for r in (MAX_KERNEL_RANK + 8, MAX_KERNEL_RANK):
            A, B, s = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g), torch.tensor(0.75)
            dy = torch.randn(M, N, generator=g)
            if r == MAX_KERNEL_RANK:
                with pytest.raises(AssertionError, match="launched"):
                    op.triton_forward(x, *operands, b, A, B, s)
                continue
            assert torch.equal(
                op.triton_forward(x, *operands, b, A, B, s), op.lora_linear_4bit(x, *operands, b, A, B, s)
            )
            got = op.triton_backward(dy, x, *operands, A, B, s, None, None, False)
            want = op.lora_linear_4bit_backward(dy, x, *operands, A, B, s, None, None, False)
            assert all(torch.equal(a, w) for a, w in zip(got, want, strict=True))

    def test_quantized_sites_run_the_fused_kernel_under_use_kernels(monkeypatch):
        """End to end: a model with bitsandbytes NF4 linears, adapted; ``use_kernels(model, "ops")`` points
        its quantized sites at the fused op. With the forward and backward ops' kernels registered for
        CPU (the interpreted Triton kernels, as ``register_triton`` does for CUDA) both run, and output
        and adapter gradients equal the composite path (the module's own forward + the adapter). K is a multiple of the quant
        block: bitsandbytes' CPU forward is wrong otherwise (see the module docstring)."""
        model = nn.Sequential(_linear4bit(64, 128, "nf4", True), nn.ReLU(), _linear4bit(128, 32, "nf4", False, seed=1))
        spec = lorafx.Spec(lorafx.LoRA(r=4, alpha=8, init="random"), targets=["0", "2"])
        model = lorafx.apply(model, spec).train()
        x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
        want = model(x)
        grads_want = torch.autograd.grad(want.sum(), [p for p in model.parameters() if p.requires_grad])

        calls = []

        def kernel(*args):
            calls.append(args[0].shape)
            return op.triton_forward(*args)

        monkeypatch.setattr(op, "has_fused_kernel", lambda device: True)
        fused_op = op.lora_linear_4bit
        if "cpu" not in fused_op._backend_fns:  # a CPU slot holding the composite, restored after the test
            fused_op.register_kernel("cpu")(fused_op._init_fn)
        monkeypatch.setitem(fused_op._backend_fns, "cpu", kernel)
        back_op = op.lora_linear_4bit_backward
        if "cpu" not in back_op._backend_fns:
            back_op.register_kernel("cpu")(back_op._init_fn)

        def backward_kernel(*args):
            calls.append("backward")
            return op.triton_backward(*args)

        monkeypatch.setitem(back_op._backend_fns, "cpu", backward_kernel)
        assert lorafx.use_kernels(model, "ops") == 2
        got = model(x)
        grads = torch.autograd.grad(got.sum(), [p for p in model.parameters() if p.requires_grad])
        lorafx.use_kernels(model, "composite")
        assert len(calls) == 4 and calls.count("backward") == 2  # both sites ran both kernels
        assert_close(got, want, **KERNEL_4BIT[torch.float32])
        for a, w in zip(grads, grads_want, strict=True):
            assert_close(a, w, **KERNEL_4BIT[torch.float32])
