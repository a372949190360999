"""Triton kernels vs the reference composite, run by the Triton interpreter on CPU.

``TRITON_INTERPRET=1`` must be set before ``import triton`` and must not leak into other tests, so a
normal run executes this file again in a subprocess with the variable set; the tests below only run
there. Reference: the ``lorafx::`` ops' composites (:mod:`lorafx.kernels`, the canonical evaluator) in
float64 / the same dtype.
"""

import os

import pytest
import torch
from helpers import run_under_triton_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(INTERPRETED, reason="this is the launcher; the kernel tests run in its subprocess")
def test_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    run_under_triton_interpreter(__file__, "not under_the_triton")


if INTERPRETED:
    from tolerances import assert_close

    from lorafx.kernels import celora_input_grad, lora_expand, lora_linear, lora_linear_multi
    from lorafx.kernels._triton import launchers

    # fp16: inputs rounded to fp16, fp32 accumulation in both; the reference rounds h·B once more.
    KERNEL_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}
    SHAPES = [(1, 17, 19), (37, 23, 33), (20, 40, 9)]  # (M, K, N): none a multiple of 16

    def _data(M, K, N, r, dtype, gate, seed=0, bias=True):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(M, K, generator=g).to(dtype)
        W, b = (torch.randn(N, K, generator=g) / K**0.5).to(dtype), torch.randn(N, generator=g).to(dtype)
        A, B = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g) / r**0.5
        s = torch.tensor(0.75)
        gt = torch.rand(M, r, generator=g) if gate else None
        return x, W, b if bias else None, A, B, s, gt

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("r", [1, 8, 16, 64])
    @pytest.mark.parametrize("shape", SHAPES)
    def test_forward_matches_reference(shape, r, dtype):
        for gate in (False, True):
            args = _data(*shape, r, dtype, gate, bias=gate)
            want = lora_linear.lora_linear(*args)  # the CPU composite: canonical shrink, then expand
            assert_close(launchers.lora_linear(*args), want, **KERNEL_TOL[dtype])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("r", [1, 16, 64])
    @pytest.mark.parametrize("dropout", [False, True])
    def test_backward_matches_reference(dtype, r, dropout):
        x, W, b, A, B, s, g = _data(37, 23, 33, r, dtype, gate=True, seed=r)
        x_in = (x * 0.5) if dropout else None
        dy = torch.randn(37, 33, generator=torch.Generator().manual_seed(5)).to(dtype)
        got = launchers.lora_linear_backward(dy, x, W, A, B, s, g, x_in, True)
        want = lora_linear.lora_linear_backward(dy, x, W, A, B, s, g, x_in, True)
        for name, a, w in zip(("dx", "d_xin", "dA", "dB", "dg"), got, want, strict=True):
            assert a.shape == w.shape and a.dtype == w.dtype, name
            assert_close(a.float(), w.float(), **KERNEL_TOL[dtype], msg=name)

    @pytest.mark.parametrize("shape", [(64, 256, 96, 16), (37, 200, 70, 64), (16, 512, 48, 8)])
    def test_fp16_tensor_core_expand_vs_fp64(shape):
        """h (fp32, scaled) and B rounded to fp16 for the expand's tensor-core dot: the output stays
        within KERNEL_FP16_VS_FP64 of the exact fp64 value (numbers in tests/tolerances.py)."""
        from tolerances import KERNEL_FP16_VS_FP64

        M, K, N, r = shape
        g = torch.Generator().manual_seed(M)
        x, W = torch.randn(M, K, generator=g).half(), (torch.randn(N, K, generator=g) / K**0.5).half()
        A, B = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g) / r**0.5
        s = torch.tensor(0.75)
        got = launchers.lora_linear(x, W, None, A, B, s)
        x64, W64, A64, B64 = (t.double() for t in (x, W, A, B))
        want = x64 @ W64.T + 0.75 * (x64 @ A64.T) @ B64.T
        assert got.dtype == torch.float16
        assert_close(got.double(), want, **KERNEL_FP16_VS_FP64)

    def test_expand_matches_reference():
        x, W, b, A, B, s, g = _data(21, 18, 35, 8, torch.float32, gate=True)
        h = x @ A.T
        assert_close(
            launchers.lora_expand(x, W, b, h, B, s, g),
            lora_expand.lora_expand(x, W, b, h, B, s, g),
            **KERNEL_TOL[torch.float32],
        )

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_multi_adapter_uneven_rows(dtype):
        """Segments of 5, 1, 0 and 23 rows (23 > BLOCK_M = 16: two blocks) plus 4 base-only rows, shuffled."""
        gen = torch.Generator().manual_seed(3)
        n, r, K, N = 4, 8, 21, 27
        idx = torch.tensor([0] * 5 + [1] * 1 + [3] * 23 + [-1] * 4)[torch.randperm(33, generator=gen)]
        seg = launchers.segments(idx, n)
        assert seg.counts.tolist() == [5, 1, 0, 23, 4] and seg.starts.tolist() == [0, 5, 6, 6, 29]
        x = torch.randn(33, K, generator=gen).to(dtype)
        W, b = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype), torch.randn(N, generator=gen).to(dtype)
        A, B = torch.randn(n, r, K, generator=gen) / K**0.5, torch.randn(n, N, r, generator=gen) / r**0.5
        s = torch.tensor([0.5, 2.0, 1.0, 1.5])
        assert_close(
            launchers.lora_linear_multi(x, W, b, A, B, s, idx),
            lora_linear_multi.lora_linear_multi(x, W, b, A, B, s, idx),
            **KERNEL_TOL[dtype],
        )
        dy = torch.randn(33, N, generator=gen).to(dtype)
        xr = x.float().requires_grad_()
        lora_linear_multi.lora_linear_multi(xr, W.float(), b.float(), A, B, s, idx).backward(dy.float())
        assert_close(launchers.lora_linear_multi_dx(dy, W, A, B, s, idx).float(), xr.grad, **KERNEL_TOL[dtype])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("shape", [(37, 33, 23, 7, 14), (5, 19, 40, 1, 3), (17, 48, 20, 16, 47)])
    def test_celora_input_grad_gathers_the_kept_channels(shape, dtype):
        """(T, d_out, d_in, r0, k), none a multiple of the blocks; k = d_out - 1 keeps all but one."""
        T, d_out, d_in, r0, k = shape
        gen = torch.Generator().manual_seed(k)
        G, W = torch.randn(T, d_out, generator=gen).to(dtype), (torch.randn(d_out, d_in, generator=gen) / 4).to(dtype)
        B0, A0 = torch.randn(d_out, r0, generator=gen).to(dtype), torch.randn(r0, d_in, generator=gen).to(dtype)
        index = torch.randperm(d_out, generator=gen)[:k].sort().values
        got = launchers.celora_input_grad(G, W, B0, A0, index)
        want = celora_input_grad.celora_input_grad(*(t.double() for t in (G, W, B0, A0)), index)
        assert got.dtype == dtype
        assert_close(got.double(), want, **KERNEL_TOL[dtype])

    def test_ranks_above_the_kernels_limit_run_the_composites(monkeypatch):
        """Above ``MAX_KERNEL_RANK`` (128) the CUDA kernel each op file registers returns its composite,
        bit for bit, and launches nothing (the kernels spill there: ``_common.MAX_KERNEL_RANK``), and
        a CUDA site does not call the ``triton_op`` twin; at 128 itself the kernels run. The 4-bit
        op: ``tests/test_lora_4bit_kernel.py``."""
        from lorafx.kernels._common import MAX_KERNEL_RANK

        def launched(*_, **__):
            raise AssertionError("a Triton kernel was launched")

        monkeypatch.setattr(launchers, "shrink", launched)
        monkeypatch.setattr(launchers, "fused", launched)
        T, K, N, n = 6, 12, 10, 2
        gen = torch.Generator().manual_seed(0)
        for r in (MAX_KERNEL_RANK + 8, MAX_KERNEL_RANK + 64):
            x, W, b, A, B, s, g = _data(T, K, N, r, torch.float32, gate=True)
            dy, h = torch.randn(T, N, generator=gen), x @ A.T
            assert torch.equal(
                lora_linear.cuda_forward(x, W, b, A, B, s, g), lora_linear.lora_linear(x, W, b, A, B, s, g)
            )
            assert torch.equal(
                lora_expand.cuda_kernel(x, W, b, h, B, s, g), lora_expand.lora_expand(x, W, b, h, B, s, g)
            )
            got = lora_linear.cuda_backward(dy, x, W, A, B, s, g, None, True)
            want = lora_linear.lora_linear_backward(dy, x, W, A, B, s, g, None, True)
            assert all(torch.equal(a, w) for a, w in zip(got, want, strict=True))
            As, Bs, idx = A.expand(n, r, K) * 1.0, B.expand(n, N, r) * 1.0, torch.tensor([0, 1, -1, 1, 0, 0])
            ss = torch.tensor([0.5, 2.0])
            multi = lora_linear_multi._forward_on_cuda(x, W, b, As, Bs, ss, idx)
            assert torch.equal(multi, lora_linear_multi.lora_linear_multi(x, W, b, As, Bs, ss, idx))
            got = lora_linear_multi._backward_on_cuda(dy, x, W, As, Bs, ss, idx, True)
            want = lora_linear_multi.lora_linear_multi_backward(dy, x, W, As, Bs, ss, idx, True)
            assert all(torch.equal(a, w) for a, w in zip(got, want, strict=True))
            B0, A0, index = torch.randn(N, r, generator=gen), torch.randn(r, K, generator=gen), torch.tensor([1, 4])
            want = celora_input_grad.celora_input_grad(dy, W, B0, A0, index)
            assert torch.equal(celora_input_grad.cuda_kernel(dy, W, B0, A0, index), want)
        twin = lora_linear.register_triton()
        assert lora_linear.cuda_op(MAX_KERNEL_RANK + 8) is lora_linear.lora_linear
        assert lora_linear.cuda_op(MAX_KERNEL_RANK) is twin
        x, W, b, A, B, s, g = _data(T, K, N, MAX_KERNEL_RANK, torch.float32, gate=False)
        with pytest.raises(AssertionError, match="launched"):
            lora_linear.cuda_forward(x, W, b, A, B, s)

    def test_gpu_benchmark_cases_run(monkeypatch):
        """benchmarks/kernels.py's case builders, each run once at tiny sizes: the GPU benchmark's code
        paths (shapes, strides, argument order) are exercised here, only the timing needs CUDA."""
        from benchmarks import kernels as bench

        monkeypatch.setattr(bench, "_peft_layer", lambda *a, **k: None)  # peft's layer is plain PyTorch
        fwd = bench.forward_cases(19, 24, 20, 4, torch.float32, device="cpu")
        multi = bench.multi_cases(19, 24, 20, 4, 3, torch.float32, device="cpu")
        ce = bench.celora_cases(9, 24, 20, 3, 0.55, torch.float32, device="cpu")
        for cases in (fwd, multi, ce):
            outs = {k: fn() for k, fn in cases.items()}
            assert all(o.shape == next(iter(outs.values())).shape for o in outs.values())
        assert_close(fwd["fused"](), fwd["unfused"](), **KERNEL_TOL[torch.float32])
        assert_close(multi["segmented"](), multi["loop"](), **KERNEL_TOL[torch.float32])
        assert_close(ce["triton"](), ce["composite"](), **KERNEL_TOL[torch.float32])

    # ---- compile integration: an opaque custom op that launches the interpreted kernel ----------

    @torch.library.custom_op("lorafx_test::lora_linear_interp", mutates_args=())
    def lora_linear_interp(
        x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: torch.Tensor
    ) -> torch.Tensor:
        return launchers.lora_linear(x, W, b, A, B, s)

    @lora_linear_interp.register_fake
    def _(x, W, b, A, B, s):
        return x.new_empty((*x.shape[:-1], W.shape[0]))

    def test_compiled_kernel_path_matches_eager():
        import torch._dynamo

        x, W, b, A, B, s, _ = _data(13, 24, 20, 8, torch.float32, gate=False)

        def block(x):
            h = torch.relu(lora_linear_interp(x, W, b, A, B, s))
            return lora_linear_interp(h, W[:, :20], b, A[:, :20], B, s).sum(-1)

        torch._dynamo.reset()
        graphs = []

        def count(gm, example_inputs):
            graphs.append(gm)
            return torch._inductor.compile(gm, example_inputs)

        compiled = torch.compile(block, fullgraph=True, backend=count)
        assert_close(compiled(x), block(x))
        calls = [n for n in graphs[0].graph.nodes if n.target is torch.ops.lorafx_test.lora_linear_interp.default]
        assert len(calls) == 2  # the kernel op is in the graph, once per site, no graph break
        torch._dynamo.reset()

        class Block(torch.nn.Module):
            def forward(self, x):
                return block(x)

        ep = torch.export.export(Block(), (x,))  # and torch.export keeps it as one node per site
        calls = [n for n in ep.graph.nodes if n.target is torch.ops.lorafx_test.lora_linear_interp.default]
        assert len(calls) == 2
        assert_close(ep.module()(x), block(x))

    def test_triton_op_runs_the_kernels_with_the_op_autograd():
        """``lorafx::lora_linear_triton`` (the inductor-visible form on GPU), eagerly on CPU tensors."""
        lora_linear.register_triton()  # what lorafx.kernels.lora_linear does at import on a CUDA machine
        x, W, b, A, B, s, g = _data(19, 21, 23, 8, torch.float32, gate=True)
        x, A, B = x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
        y = torch.ops.lorafx.lora_linear_triton(x, W, b, A, B, s, g)
        want = lora_linear.lora_linear(x, W, b, A, B, s, g)
        assert_close(y, want, **KERNEL_TOL[torch.float32])
        dy = torch.randn_like(y)
        for a, w in zip(torch.autograd.grad(y, (x, A, B), dy), torch.autograd.grad(want, (x, A, B), dy), strict=True):
            assert_close(a, w, **KERNEL_TOL[torch.float32])
