"""The eager per-site hot path (decoding): no work per call that can be done once, and never stale.

References: the aten ops a site runs (counted with a dispatch mode), hand-written LoRA formulas, and
the adapted model's own outputs before and after every state change that the eager scale float must
follow (set_scale, an in-place write to the buffer, dtype moves, state-dict loads, inference tensors).
"""

import copy

import torch
import torch.nn.functional as F
from tolerances import assert_close
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorafx


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _site(dropout=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10, bias=False))
    model = lorafx.apply(
        model, lorafx.Spec(lorafx.LoRA(r=3, alpha=6, dropout=dropout, init="random"), targets="all-linear")
    )
    sa = next(iter(lorafx.iter_sites(model).values()))
    return model.eval(), sa.adapters["default"]


def _base_weight(model):
    return next(p for n, p in model.named_parameters() if n.endswith("weight") and "adapters" not in n)


def _reference(adapter, x, W, scale):
    return F.linear(x, W) + scale * F.linear(F.linear(x, adapter.lora_A), adapter.lora_B)


def test_eval_site_runs_three_matmuls_and_no_scale_multiply():
    model, adapter = _site(dropout=0.1)
    x = torch.randn(1, 1, 12)
    with torch.no_grad(), _CountOps() as counter:
        y = model(x)
    ops = counter.ops
    assert ops.count("mm") + ops.count("addmm") + ops.count("addmm_") == 3, ops
    assert "mul" not in ops and "_to_copy" not in ops and "native_dropout" not in ops, ops
    assert_close(y, _reference(adapter, x, _base_weight(model), 2.0))


def test_eager_scale_follows_every_write():
    model, adapter = _site()
    W = _base_weight(model)
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert adapter.scale_arg() == 2.0
        lorafx.set_scale(model, 0.5)
        assert_close(model(x), _reference(adapter, x, W, 0.5))
        adapter.scale_t.fill_(3.0)  # behind lorafx's back: the version counter tells
        assert adapter.scale_arg() == 3.0
        assert_close(model(x), _reference(adapter, x, W, 3.0))
        state = copy.deepcopy(model.state_dict())
        lorafx.set_scale(model, 1.25)
        model.load_state_dict(state)
        assert_close(model(x), _reference(adapter, x, W, 3.0))
        model.double()
        assert adapter.scale_arg() == 3.0 and adapter.scale_t.dtype == torch.float64
        assert_close(model(x.double()), _reference(adapter, x.double(), W, 3.0), torch.float64)
        model.float()
        with torch.inference_mode():
            model.to(torch.float32)  # a fresh buffer made under inference mode keeps no version counter
            assert isinstance(adapter.scale_arg(), torch.Tensor)
            assert_close(model(x), _reference(adapter, x, W, 3.0))


def test_traced_calls_get_the_scale_tensor():
    _, adapter = _site()
    seen = []

    def grab(x):
        seen.append(adapter.lower(x).scale)
        return x

    torch.compile(grab, backend="eager", fullgraph=True)(torch.randn(2, 12))
    assert seen and isinstance(seen[0], torch.Tensor)
    assert isinstance(adapter.lower(torch.randn(2, 12)).scale, float)


def _expand_b(model, x):
    """The B the eager expand reads at the model's one site (what ``lower`` hands on)."""
    sa = next(iter(lorafx.iter_sites(model).values()))
    return sa(x).B


def test_eval_expand_reads_a_transposed_copy_of_b_that_follows_every_write():
    model, adapter = _site()
    W = _base_weight(model)
    x = torch.randn(3, 12)

    def check():
        with torch.no_grad():
            B = _expand_b(model, x)
            assert B.t().is_contiguous() and torch.equal(B, adapter.lora_B), "expand must read Bᵀ contiguous"
            assert_close(model(x), _reference(adapter, x, W, 2.0))

    check()
    assert _expand_b(model, x) is adapter.lora_B  # autograd on: the parameter itself
    keys = set(model.state_dict())
    with torch.no_grad():
        adapter.lora_B.mul_(-3.0)  # in place: the version counter tells
    check()
    model.train()
    opt = torch.optim.SGD([adapter.lora_B], lr=0.5)
    model(x).square().sum().backward()
    opt.step()
    model.eval()
    check()
    adapter.lora_B = nn.Parameter(torch.randn_like(adapter.lora_B))  # a new object
    check()
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        adapter.lora_B.zero_()
    model.load_state_dict(state)
    check()
    adapter.lora_B.data.copy_(torch.randn_like(adapter.lora_B))  # .data bypasses the version counter
    model.eval()  # ... and eval() refreshes the copy, as documented
    check()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        next(iter(lorafx.iter_sites(twin).values())).adapters["default"].lora_B.add_(1.0)
    check()  # the original is not affected by its copy
    model.double()
    W, x = _base_weight(model), x.double()
    with torch.no_grad():
        assert _expand_b(model, x).dtype == torch.float64
        assert_close(model(x), _reference(adapter, x, W, 2.0), torch.float64)
    assert set(model.state_dict()) == keys  # the copy is not state


def test_no_transposed_copy_under_torch_distributed(tmp_path):
    import torch.distributed as dist

    model, adapter = _site()
    with torch.no_grad():  # a copy made before the process group exists is not used once it does
        assert _expand_b(model, torch.randn(2, 12)).t().is_contiguous()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:  # collectives write into parameters without bumping versions: the parameter is read each call
        with torch.no_grad():
            assert _expand_b(model, torch.randn(2, 12)) is adapter.lora_B
    finally:
        dist.destroy_process_group()
    with torch.no_grad():
        assert _expand_b(model, torch.randn(2, 12)).t().is_contiguous()


def _matmuls_traced(model, x):
    """Output and the matmul calls of the graph Dynamo records for ``model(x)`` under no_grad."""
    seen = []

    def backend(gm, _):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    return out, [t for t in seen if "linear" in t or "mm" in t]


def test_compiled_one_token_expand_is_a_reduction_and_equals_eager():
    model, adapter = _site()
    W = _base_weight(model)
    x1, x3 = torch.randn(1, 1, 12), torch.randn(1, 3, 12)
    out1, mm1 = _matmuls_traced(model, x1)
    out3, mm3 = _matmuls_traced(model, x3)
    assert len(mm1) == 2, mm1  # base and shrink; the one-token expand is a product and a sum
    assert len(mm3) == 3, mm3  # more tokens: the expand stays a matmul
    assert_close(out1, _reference(adapter, x1, W, 2.0))
    assert_close(out3, _reference(adapter, x3, W, 2.0))
