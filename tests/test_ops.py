"""The lorafx:: op family: opcheck (schema, fake, autograd registration, AOT), values and gradients
against independent formulas written here (dense ΔW math, float64)."""

import pytest
import torch
from tolerances import assert_close

from lorafx.kernels.celora_input_grad import celora_input_grad
from lorafx.kernels.lora_expand import lora_expand
from lorafx.kernels.lora_linear import lora_linear, lora_linear_backward
from lorafx.kernels.lora_linear_multi import lora_linear_multi, lora_linear_multi_backward

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _operands(T=6, d_in=13, d_out=11, r=3, gate=True, dropout=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    x = rnd(2, T // 2, d_in).requires_grad_()
    W, b = rnd(d_out, d_in), rnd(d_out)
    A, B = rnd(r, d_in).requires_grad_(), rnd(d_out, r).requires_grad_()
    s = torch.tensor(1.5, dtype=dtype)
    gt = rnd(2, T // 2, r).requires_grad_() if gate else None
    x_in = (x.detach() * 0.5).requires_grad_() if dropout else None
    return x, W, b, A, B, s, gt, x_in


def _dense(x, W, b, A, B, s, g, x_in):
    """Independent formula: per-token gated ΔW applied row by row (no shrink-first ordering)."""
    xi = x if x_in is None else x_in
    h = torch.einsum("tk,rk->tr", xi.reshape(-1, xi.shape[-1]), A)
    if g is not None:
        h = h * g.reshape(-1, g.shape[-1])
    y = x.reshape(-1, x.shape[-1]) @ W.T + b + s * torch.einsum("tr,or->to", h, B)
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_lora_linear_values_and_grads(gate, dropout):
    args = _operands(gate=gate, dropout=dropout)
    y = lora_linear(*args)
    assert_close(y, _dense(*args), torch.float64)
    leaves = [t for t in args if t is not None and t.requires_grad]
    got = torch.autograd.grad(y.square().sum(), leaves)
    want = torch.autograd.grad(_dense(*args).square().sum(), leaves)
    for a, w in zip(got, want, strict=True):
        assert_close(a, w, torch.float64)


@pytest.mark.parametrize("gate", [False, True])
def test_opcheck_lora_linear(gate):
    torch.library.opcheck(lora_linear, _operands(gate=gate, dtype=torch.float32), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(
        lora_linear, _operands(gate=gate, dropout=True, dtype=torch.float32), test_utils=OPCHECK_TESTS
    )


def test_expand_matches_linear_and_opchecks():
    x, W, b, A, B, s, g, _ = _operands()
    h = (x @ A.T).detach().requires_grad_()
    assert_close(lora_expand(x, W, b, h, B, s, g), lora_linear(x, W, b, A, B, s, g), torch.float64)
    torch.library.opcheck(lora_expand, (x, W, b, h, B, s, g), test_utils=OPCHECK_TESTS)
    torch.autograd.gradcheck(lora_expand, (x, W, b, h, B, s, g))


def test_gradcheck_with_trainable_base_and_scale():
    x, W, b, A, B, s, g, x_in = _operands(T=4, d_in=5, d_out=3, r=2, dropout=True)
    W, b, s = W.requires_grad_(), b.requires_grad_(), s.requires_grad_()
    torch.autograd.gradcheck(lora_linear, (x, W, b, A, B, s, g, x_in))


def _multi_operands(dtype=torch.float64, rows=(3, 0, 5, 1)):
    g = torch.Generator().manual_seed(1)
    n, r, d_in, d_out = 3, 4, 9, 7
    idx = torch.tensor([i for i, c in enumerate(rows) for _ in range(c)])
    idx[idx == 3] = -1  # last group: base only
    idx = idx[torch.randperm(len(idx), generator=g)]
    x = torch.randn(len(idx), d_in, generator=g, dtype=dtype).requires_grad_()
    W, b = torch.randn(d_out, d_in, generator=g, dtype=dtype), torch.randn(d_out, generator=g, dtype=dtype)
    A = torch.randn(n, r, d_in, generator=g, dtype=dtype).requires_grad_()
    B = torch.randn(n, d_out, r, generator=g, dtype=dtype).requires_grad_()
    s = torch.tensor([0.5, 2.0, 1.0], dtype=dtype)
    return x, W, b, A, B, s, idx


def test_multi_adapter_matches_per_row_loop():
    x, W, b, A, B, s, idx = _multi_operands()
    y = lora_linear_multi(x, W, b, A, B, s, idx)
    rows = []
    for t in range(len(idx)):  # independent formula: one row at a time, dense ΔW
        i = int(idx[t])
        Wt = W if i < 0 else W + s[i] * B[i] @ A[i]
        rows.append(x[t] @ Wt.T + b)
    want = torch.stack(rows)
    assert_close(y, want, torch.float64)
    got = torch.autograd.grad(y.square().sum(), (x, A, B))
    exp = torch.autograd.grad(want.square().sum(), (x, A, B))
    for a, w in zip(got, exp, strict=True):
        assert_close(a, w, torch.float64)


def test_opcheck_multi():
    torch.library.opcheck(lora_linear_multi, _multi_operands(torch.float32), test_utils=OPCHECK_TESTS)
    x, W, b, A, B, s, idx = (t.detach() for t in _multi_operands(torch.float32))
    dy = torch.randn(x.shape[0], W.shape[0])
    for need_dx in (True, False):
        torch.library.opcheck(lora_linear_multi_backward, (dy, x, W, A, B, s, idx, need_dx), test_utils=OPCHECK_TESTS)


def test_multi_adapter_training_compiles_with_data_dependent_row_counts():
    """Per-adapter row counts change between calls: the backward op keeps them out of the graph."""
    import torch._dynamo

    x, W, b, A, B, s, _ = _multi_operands(torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: lora_linear_multi(*a).square().sum(), fullgraph=True)
    for seed in range(3):  # different assignments of the 9 rows to adapters, same shapes
        idx = torch.randint(-1, 3, (x.shape[0],), generator=torch.Generator().manual_seed(seed))
        got = torch.autograd.grad(compiled(x, W, b, A, B, s, idx), (x, A, B))
        want = torch.autograd.grad(lora_linear_multi(x, W, b, A, B, s, idx).square().sum(), (x, A, B))
        for a, w in zip(got, want, strict=True):
            assert_close(a, w)
    torch._dynamo.reset()


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck_backward_op(gate, dropout):
    x, W, b, A, B, s, g, x_in = (
        t.detach() if t is not None else None for t in _operands(gate=gate, dropout=dropout, dtype=torch.float32)
    )
    dy = torch.randn(*x.shape[:-1], W.shape[0])
    torch.library.opcheck(lora_linear_backward, (dy, x, W, A, B, s, g, x_in, gate), test_utils=OPCHECK_TESTS)


def test_ops_and_passes_import_without_triton_on_cpu():
    import subprocess
    import sys

    code = (
        "import sys, lorafx, lorafx.kernels, lorafx.passes.lower_to_ops, lorafx.passes.fuse_shrinks\n"
        "print(sorted(m for m in ('triton', 'onnx', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_celora_input_grad_op_matches_the_paper_formula_and_opchecks():
    g = torch.Generator().manual_seed(0)
    T, d_out, d_in, r0, k = 6, 11, 7, 3, 5
    G, W = (
        torch.randn(T, d_out, generator=g, dtype=torch.float64),
        torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
    )
    B0, A0 = (
        torch.randn(d_out, r0, generator=g, dtype=torch.float64),
        torch.randn(r0, d_in, generator=g, dtype=torch.float64),
    )
    index = torch.randperm(d_out, generator=g)[:k].sort().values
    got = celora_input_grad(G, W, B0, A0, index)
    res = W - B0 @ A0
    # the paper's form, (G B0) A0 + G[:, I]·Res[I, :], written out here
    assert_close(got, (G @ B0) @ A0 + G[:, index] @ res[index], torch.float64)
    dropped = torch.ones(d_out, dtype=torch.bool)
    dropped[index] = False
    assert_close(got, G @ W - G[:, dropped] @ res[dropped], torch.float64)  # exact minus the dropped terms
    everything = torch.arange(d_out)
    assert_close(celora_input_grad(G, W, B0, A0, everything), G @ W, torch.float64)  # k = d_out: exact
    torch.library.opcheck(
        celora_input_grad, (G.float(), W.float(), B0.float(), A0.float(), index), test_utils=OPCHECK_TESTS
    )
