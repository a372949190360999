"""The adapter layout of an exported graph, and the tensors that feed it.

A layout is the list of exported sites, each with its form (see :mod:`lorafx.export.tensors`) and
the exported shape of every adapter tensor. Graph inputs are named ``<site FQN>.<key>`` (e.g.
``model.layers.0.self_attn.q_proj.A``). An adapter *feed* maps those names to tensors: an adapter of
lower rank is zero-padded to the exported shape, and a site the adapter does not cover gets zeros
with scale 0 (the base output, exactly).

Adapter files written beside an export (``adapters/<name>/``) hold the unpadded feed tensors, keyed
by input name; lorafx's own adapter directories (:func:`lorafx.save_adapter`) are read by building their adapters
the way :func:`lorafx.load_adapter` does, on a stand-in model made from the file's site shapes (no
real model needed), and taking :func:`site_tensors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorafx.adapter import Adapter
from lorafx.errors import AdapterFileError, ExportError, SpecError
from lorafx.export.tensors import SCALE, form_of, pad_to, site_tensors
from lorafx.state import iter_sites

EXPORT_WEIGHTS = "lorafx_export_adapter.safetensors"
EXPORT_CONFIG = "lorafx_export_adapter.json"


@dataclass
class SiteLayout:
    """One exported site: its FQN, form, variant and the exported shape of each adapter tensor."""

    site: str
    form: str
    variant: str
    d_in: int
    d_out: int
    shapes: dict[str, list[int]]
    template: Adapter | None = field(default=None, repr=False, compare=False)  # lowers fed tensors at export

    def name(self, key: str) -> str:
        return f"{self.site}.{key}"

    @property
    def scale_in_b(self) -> bool:
        """The graph input ``B`` is ``s·B`` (no scale input, no Mul node): canonical sites exported now.

        Measured (Llama hidden 256, 14 sites, one decode step at past 64, onnxruntime CPU, medians
        of 300 / 200 interleaved runs, load average ~1.6 on 2 cores): the graph with the scale apart
        took 1.18x / 1.18x the merged step at batch 1 / 8, this one 1.13x / 1.15x (812 -> 778 µs,
        2351 -> 2279 µs). Manifests written before this change list a ``scale`` tensor for
        canonical sites, and are fed as they were."""
        return self.form == "canonical" and SCALE not in self.shapes

    def to_dict(self) -> dict:
        return {
            "site": self.site,
            "form": self.form,
            "variant": self.variant,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "tensors": {self.name(k): {"key": k, "shape": s, "dtype": "float32"} for k, s in self.shapes.items()},
            **({"B_includes_scale": True} if self.scale_in_b else {}),
        }

    @staticmethod
    def from_dict(d: dict) -> SiteLayout:
        shapes = {t["key"]: list(t["shape"]) for t in d["tensors"].values()}
        return SiteLayout(d["site"], d["form"], d["variant"], d["d_in"], d["d_out"], shapes)


def build_layout(model: nn.Module, names: list[str], rank: int | None = None) -> list[SiteLayout]:
    """The layout that every adapter in ``names`` fits; ``rank`` widens canonical sites to at least that R."""
    layout = []
    for site, sa in iter_sites(model).items():
        present = [sa.adapters[n] for n in names if n in sa.adapters]
        if present:
            layout.append(_site_layout(site, present, [site_tensors(a) for a in present], rank))
    if not layout:
        raise ExportError(f"adapters {names} have no site on this model")
    return layout


def _site_layout(site: str, present: list[Adapter], tensors: list[dict], rank: int | None) -> SiteLayout:
    a0 = present[0]
    forms = {form_of(a) for a in present}
    variants = sorted({a.config.name for a in present})
    if forms == {"canonical"}:
        widest = max(t["A"].shape[0] for t in tensors)
        if rank is not None and rank < widest:  # a graph narrower than its adapter would drop rank rows
            raise ExportError(f"site {site!r}: rank={rank} is below the adapter's rank {widest}; pass rank >= {widest}")
        R = max(widest, rank or 0)
        shapes = {"A": [R, a0.in_features], "B": [a0.out_features, R]}  # s folded into B: see scale_in_b
        return SiteLayout(site, "canonical", "+".join(variants), a0.in_features, a0.out_features, shapes, a0)
    keys = {tuple(sorted(t)) for t in tensors}
    if len(forms) > 1 or len(variants) > 1 or len(keys) > 1:
        raise ExportError(
            f"site {site!r}: adapters of variants {variants} (forms {sorted(forms)}) cannot share one exported graph; export them separately"
        )
    shapes = {k: [max(t[k].shape[i] for t in tensors) for i in range(tensors[0][k].dim())] for k in tensors[0]}
    return SiteLayout(site, form_of(a0), variants[0], a0.in_features, a0.out_features, shapes, a0)


def make_feed(layout: list[SiteLayout], tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Input name -> tensor at the exported shape for one adapter (padding, zeros for absent sites).

    ``tensors`` hold each site's ``scale`` (adapter files keep A, B and s apart); a site whose graph
    takes ``s·B`` (:attr:`SiteLayout.scale_in_b`) gets ``B`` multiplied by it and no scale input."""
    known = {sl.name(k) for sl in layout for k in _file_keys(sl)}
    extra = sorted(set(tensors) - known)
    if extra:
        raise AdapterFileError(
            f"{source}: tensors {extra[:6]} match no site of the exported graph (exported sites: {[sl.site for sl in layout][:6]}...)"
        )
    feed = {}
    for sl in layout:
        names = [sl.name(k) for k in _file_keys(sl)]
        have = [n for n in names if n in tensors]
        if have and len(have) != len(names):
            raise AdapterFileError(f"{source}: site {sl.site!r} lacks {sorted(set(names) - set(have))}")
        for k, shape in sl.shapes.items():
            n = sl.name(k)
            feed[n] = pad_to(tensors[n].float(), shape, f"{source}: {n}") if have else torch.zeros(shape)
        if have and sl.scale_in_b:
            feed[sl.name("B")] = feed[sl.name("B")] * tensors[sl.name(SCALE)].float().reshape(())
    return feed


def _file_keys(sl: SiteLayout) -> list[str]:
    """The tensor keys an adapter file holds for site ``sl``: its graph inputs, and the scale folded into B."""
    return [*sl.shapes, SCALE] if sl.scale_in_b else list(sl.shapes)


def model_feed_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Input name -> unpadded tensor of adapter ``name`` on a live model."""
    out = {}
    for site, sa in iter_sites(model).items():
        if name in sa.adapters:
            out.update({f"{site}.{k}": v for k, v in site_tensors(sa.adapters[name]).items()})
    return out


def write_export_adapter(directory: Path, name: str, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Write one adapter's feed tensors (unpadded) and a small JSON beside an export."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / EXPORT_WEIGHTS))
    (directory / EXPORT_CONFIG).write_text(
        json.dumps(
            {"format": "lorafx.export_adapter", "format_version": 1, "name": name, **info}, indent=2, sort_keys=True
        )
    )


def read_any_adapter(directory: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(name, input name -> tensor) from an exported adapter dir or a lorafx :func:`save_adapter` dir."""
    from lorafx.adapter_files import CONFIG, read_safetensors

    directory = Path(directory)
    if (directory / EXPORT_CONFIG).is_file():
        meta = json.loads((directory / EXPORT_CONFIG).read_text())
        return meta.get("name", directory.name), read_safetensors(directory / EXPORT_WEIGHTS)
    if (directory / CONFIG).is_file():
        return _from_lorafx_dir(directory)
    raise AdapterFileError(f"{directory}: not an adapter directory (expected {EXPORT_CONFIG} or {CONFIG})")


def _from_lorafx_dir(directory: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Build the adapters a lorafx adapter dir describes as :func:`lorafx.load_adapter` does (plan and
    build off a model, strict load), on a stand-in model made from the file's site shapes."""
    from lorafx.adapter_files import WEIGHTS, load_prepared, read_adapter_dir
    from lorafx.apply import prepare
    from lorafx.spec import Spec

    meta, state = read_adapter_dir(directory)
    name = meta.get("name", "default")
    try:
        prep = prepare(_shape_model(meta["base"]["sites"]), Spec.from_dict(meta["spec"]), name)
    except (KeyError, TypeError, ValueError, SpecError) as e:
        raise AdapterFileError(
            f"{directory}: cannot rebuild the adapter from its JSON ({type(e).__name__}: {e})"
        ) from None
    scales = meta.get("scales") if meta.get("format_version", 1) >= 2 else None  # set_scale'd adapters
    load_prepared(prep, state, str(directory / WEIGHTS), scales=scales)
    out = {}
    for fqn, a in prep.adapters.items():
        out.update({f"{fqn}.{k}": v for k, v in site_tensors(a.eval()).items()})
    return name, out


def _shape_model(sites: dict[str, list[int]]) -> nn.Module:
    """A model with an ``nn.Linear`` of shape ``[d_out, d_in]`` at each site FQN, in eval mode (as
    the served model: no CE-LoRA SVD at build). Each weight is one zero expanded to its shape (stride
    0), so a stand-in for a 7B model's 224 sites costs bytes, not the 26 GB of its fp32 weights."""
    root = nn.Module()
    for fqn, (d_out, d_in) in sites.items():
        linear = nn.Linear(d_in, d_out, bias=False, device="meta")
        linear.weight = nn.Parameter(torch.zeros(()).expand(d_out, d_in), requires_grad=False)
        if fqn == "":
            return linear.eval()  # the adapted model was a single linear
        *parents, leaf = fqn.split(".")
        module = root
        for p in parents:
            if p not in module._modules:
                module.add_module(p, nn.Module())
            module = getattr(module, p)
        module.add_module(leaf, linear)
    return root.eval()
