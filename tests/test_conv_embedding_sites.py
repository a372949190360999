"""Convolution and embedding sites (lorafx.site_kinds): PEFT 0.21 parity both ways, merge, adapter
files, ONNX (merged and unmerged, in onnxruntime), torch.compile, variants that carry over, refusals."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tolerances import ONNX_FP32, assert_close
from torch import nn

import lorafx
from lorafx.errors import SpecError

peft = pytest.importorskip("peft")

TARGETS = ["emb", "c1", "c2", "c3"]


class ConvNet(nn.Module):
    """One site of each kind: an embedding, Conv1d, Conv2d (strided, padded), Conv3d, a linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8, padding_idx=0)
        self.c1 = nn.Conv1d(8, 6, 3, padding=1)
        self.c2 = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.c3 = nn.Conv3d(
            2, 4, (1, 3, 3), padding=(0, 1, 1)
        )  # with bias: torch 2.13 cannot export a bias-less Conv3d
        self.head = nn.Linear(6 + 5 + 4, 3)

    def forward(self, ids, img, vol):
        h1 = self.c1(self.emb(ids).transpose(1, 2)).mean(-1)
        h2 = self.c2(img).mean((-1, -2))
        h3 = self.c3(vol).mean((-1, -2, -3))
        return self.head(torch.cat([h1, h2, h3], -1))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (2, 7), generator=g)
    ids[0, 0] = 0  # the padding row
    return ids, torch.randn(2, 3, 9, 9, generator=g), torch.randn(2, 2, 3, 5, 5, generator=g)


def _base():
    torch.manual_seed(0)
    return ConvNet()


def _adapted(base, config=None, targets=TARGETS):
    return lorafx.apply(copy.deepcopy(base), lorafx.Spec(config or lorafx.LoRA(r=2, alpha=6.0, init="random"), targets))


def _peft_layer_tensors(peft_model, fqn):
    layer = peft_model.base_model.model.get_submodule(fqn)
    if "default" in layer.lora_embedding_A:
        return layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _check_grads(fx_model, peft_model):
    for fqn, sa in lorafx.iter_sites(fx_model).items():
        a = sa.adapters["default"]
        pa, pb = _peft_layer_tensors(peft_model, sa.site)
        assert_close(a.lora_A.grad, pa.grad.reshape(a.lora_A.shape))
        assert_close(a.lora_B.grad, pb.grad.reshape(a.lora_B.shape))
        assert a.lora_B.grad.abs().sum() > 0 and a.lora_A.grad.abs().sum() > 0, fqn


def test_to_peft_loads_in_peft_with_same_outputs_and_grads(tmp_path):
    base = _base()
    fx_model = _adapted(base)
    fx_model.train()
    x = _inputs()
    lorafx.to_peft(fx_model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    kinds = {type(m).__name__ for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert kinds == {"Embedding", "Conv1d", "Conv2d", "Conv3d"}
    out = fx_model(*x)
    assert (out - base(*x)).abs().max() > 1e-3  # the adapter changes the output
    assert_close(out, peft_model(*x))
    fx_model(*x).square().sum().backward()
    peft_model(*x).square().sum().backward()
    _check_grads(fx_model, peft_model)


def test_from_peft_checkpoint_matches_peft(tmp_path):
    base = _base()
    cfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=TARGETS, init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg)
    peft_model.save_pretrained(tmp_path)
    fx_model = lorafx.from_peft(copy.deepcopy(base), tmp_path)
    x = _inputs(1)
    assert_close(fx_model(*x), peft_model(*x))
    back = tmp_path / "back"
    lorafx.to_peft(fx_model, back)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), back)
    assert_close(again(*x), peft_model(*x))


def test_default_init_is_peft_init_and_keeps_outputs():
    base = _base()
    fx_model = _adapted(base, lorafx.LoRA(r=2))
    x = _inputs()
    assert_close(fx_model(*x), base(*x))
    emb = lorafx.iter_sites(fx_model)["emb"].adapters["default"]
    assert emb.lora_A.abs().sum() == 0 and emb.lora_B.abs().sum() > 0  # PEFT: A = 0, B ~ N(0, 1)
    conv = lorafx.iter_sites(fx_model)["c2"].adapters["default"]
    assert conv.lora_A.abs().sum() > 0 and conv.lora_B.abs().sum() == 0  # PEFT: kaiming A, B = 0


def test_merge_unmerge_and_verify_merge():
    base = _base()
    fx_model = _adapted(base)
    x = _inputs()
    with torch.no_grad():
        unmerged = fx_model(*x)
        weights = {n: p.clone() for n, p in base.named_parameters()}
        lorafx.merge(fx_model)
        merged = fx_model(*x)
        # the merged weights are the base weights plus ΔW in the module's own layout
        emb = lorafx.iter_sites(fx_model)["emb"].adapters["default"]
        delta_e = (emb.lora_B @ emb.lora_A).t() * 3.0
        assert_close(fx_model.emb.weight, weights["emb.weight"] + delta_e)
        c2 = lorafx.iter_sites(fx_model)["c2"].adapters["default"]
        ref = F.conv2d(x[1], weights["c2.weight"], weights["c2.bias"], 2, 1)
        ref = ref + 3.0 * F.conv2d(
            F.conv2d(x[1], c2.lora_A.reshape(2, 3, 3, 3), None, 2, 1), c2.lora_B[..., None, None]
        )
        assert_close(F.conv2d(x[1], fx_model.c2.weight, fx_model.c2.bias, 2, 1), ref)
        lorafx.unmerge(fx_model)
        again = fx_model(*x)
    assert_close(merged, unmerged)
    assert_close(again, unmerged)
    report = lorafx.verify_merge(fx_model, x)
    assert report["sites"] == len(TARGETS) and report["max_abs_diff"] < 1e-5
    plain = lorafx.merge_and_unload(fx_model)  # the original modules back, with W + ΔW
    assert type(plain.c2) is nn.Conv2d and type(plain.emb) is nn.Embedding
    with torch.no_grad():
        assert_close(plain(*x), unmerged)


def test_dilated_conv_merged_equals_unmerged():
    # PEFT's lora_A ignores the base's dilation; lorafx keeps it, so merge folds exactly what runs.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2))
    fx_model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, init="random"), ["0"]))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        unmerged = fx_model(x)
        lorafx.merge(fx_model)
        assert_close(fx_model(x), unmerged)


def test_adapter_files_round_trip(tmp_path):
    base = _base()
    fx_model = _adapted(base)
    lorafx.save_adapter(fx_model, tmp_path)
    other = lorafx.load_adapter(copy.deepcopy(base), tmp_path)
    x = _inputs()
    assert_close(other(*x), fx_model(*x))


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_onnx_export_matches_eager(mode, tmp_path):
    pytest.importorskip("onnxruntime")
    from lorafx.export import to_onnx
    from lorafx.export.check import compare_export

    fx_model = _adapted(_base()).eval()
    to_onnx(fx_model, _inputs(), tmp_path, mode=mode)
    assert compare_export(fx_model, _inputs(), tmp_path) < ONNX_FP32["atol"]
    manifest = json.loads((tmp_path / "lorafx_export.json").read_text())
    fed = {s["site"] for s in manifest["sites"]}
    assert fed == (set(TARGETS) if mode == "unmerged" else set())  # every conv and embedding adapter is an input


def test_compile_fullgraph_matches_eager():
    fx_model = _adapted(_base())
    x = _inputs()
    compiled = torch.compile(fx_model, fullgraph=True, backend="aot_eager")
    assert_close(compiled(*x), fx_model(*x))


@pytest.mark.parametrize(
    "config", [lorafx.CapaBoost(r=2, copies=2), lorafx.UniLoRA(r=2, vector_length=64)], ids=["capaboost", "unilora"]
)
def test_carried_over_variants_merge(config):
    fx_model = _adapted(_base(), config)
    for sa in lorafx.iter_sites(fx_model).values():  # non-zero adapters
        with torch.no_grad():
            for p in sa.adapters["default"].parameters():
                p.normal_(0, 0.3)
    for p in getattr(fx_model, "lorafx_shared", nn.Module()).parameters():
        with torch.no_grad():
            p.normal_(0, 0.3)
    x = _inputs()
    with torch.no_grad():
        unmerged = fx_model(*x)
        assert (unmerged - _base()(*x)).abs().max() > 1e-4
        lorafx.merge(fx_model)
        assert_close(fx_model(*x), unmerged)


@pytest.mark.parametrize(
    "config",
    [lorafx.MoR(r=2, experts=2), lorafx.DropLoRA(r=2), lorafx.CELoRA(r=2)],
    ids=["mor", "droplora", "celora"],
)
@pytest.mark.parametrize("target", ["c2", "emb"])
def test_variants_that_do_not_carry_over_are_refused_by_name(config, target):
    base = _base()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(SpecError, match=rf"'{target}'.*variant '{config.name}' does not carry over"):
        lorafx.apply(base, lorafx.Spec(config, [target]))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


class _ScaledEmbedding(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2.0


@pytest.mark.parametrize(
    "module, why",
    [
        (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Embedding(10, 4, max_norm=1.0), "max_norm=1.0"),
        (_ScaledEmbedding(10, 4), "_ScaledEmbedding has its own forward"),
    ],
    ids=["grouped", "reflect", "max_norm", "subclass"],
)
def test_unsupported_modules_are_refused_by_name(module, why):
    model = nn.Sequential(module)
    with pytest.raises(SpecError, match=rf"'0'.*{why}"):
        lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2), ["0"]))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.embed(ids))


@pytest.mark.parametrize("targets", [["embed"], ["embed", "lm_head"]], ids=["embedding-only", "both"])
def test_tied_embedding_and_head_are_refused(targets):
    with pytest.raises(SpecError, match=r"'embed'.*shared with \['lm_head.weight'\]"):
        lorafx.apply(TiedLM(), lorafx.Spec(lorafx.LoRA(r=2), targets))


def test_untied_embedding_adapts():
    model = TiedLM()
    lorafx.untie(model, ["lm_head"])
    fx_model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=2, init="random"), ["embed"]))
    ids = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        out = fx_model(ids)
        lorafx.merge(fx_model)
        assert_close(fx_model(ids), out)


def test_all_linear_does_not_select_conv_or_embedding():
    fx_model = lorafx.apply(_base(), lorafx.Spec(lorafx.LoRA(r=2), "all-linear"))
    assert set(lorafx.iter_sites(fx_model)) == {"head"}  # PEFT's "all-linear": Linear and Conv1D only


def test_torch_save_round_trips_conv_and_embedding_sites(tmp_path):
    fx_model = _adapted(_base())
    torch.save(fx_model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    x = _inputs()
    assert_close(loaded(*x), fx_model(*x))
    assert set(lorafx.iter_sites(loaded)) == set(TARGETS)


def test_onnx_multi_mode_is_refused_at_conv_and_embedding_sites(tmp_path):
    pytest.importorskip("onnxruntime")
    from lorafx.export import to_onnx

    fx_model = _adapted(_base()).eval()
    with pytest.raises(lorafx.LorafxError, match="per-row adapters .* not supported at (convolution|embedding) sites"):
        to_onnx(fx_model, _inputs(), tmp_path / "m", mode="multi")


def test_inspect_counts_conv_per_output_position_and_embedding_without_its_lookup():
    rows = {r.fqn: r for r in lorafx.build_report(_base(), lorafx.Spec(lorafx.LoRA(r=2), TARGETS)).sites}
    assert rows["emb"].flops_per_token == 2 * 2 * 8  # h = Aᵀ[ids] is a gather; only h Bᵀ multiplies
    assert rows["c2"].flops_per_token == 2 * 2 * (3 * 3 * 3 + 5)  # x Aᵀ over a 3×3×3 receptive field, then B
    assert (rows["c2"].module_type, rows["emb"].module_type) == ("Conv2d", "Embedding")


def test_several_active_and_per_row_are_refused_at_conv_and_embedding_sites():
    """Several active adapters and per-row adapters sum or gather in the canonical form of linear
    sites; at conv and embedding sites they are refused by name, and the model keeps running adapter a."""
    spec = lorafx.Spec(lorafx.LoRA(r=2, init="random"), targets=TARGETS)
    model = lorafx.apply(lorafx.apply(_base(), spec, name="a"), spec, name="b")
    lorafx.set_adapter(model, "a")
    ids, img, vol = _inputs()
    before = model(ids, img, vol)
    with pytest.raises(SpecError, match=r"cannot be active together at sites \['emb'"):
        lorafx.set_adapter(model, ["a", "b"])
    assert lorafx.active_adapter(model) == "a"
    with pytest.raises(
        SpecError, match="per-row adapters run on linear sites only, .emb. is a site of kind .embedding."
    ):
        with lorafx.using_adapter(model, ["a", "b"]):
            model(ids, img, vol)
    assert lorafx.active_adapter(model) == "a"
    assert torch.equal(model(ids, img, vol), before)
