"""QLoRA numbers for the README: what each way of merging onto a quantized base costs.

A tiny Llama (hidden 64, 2 layers, seeded random weights) is loaded with transformers'
``BitsAndBytesConfig`` (nf4 + double quant, fp4, int8; fp32 compute) on CPU, adapted with LoRA r=8 on
all seven projections, trained 20 Adam steps (lr 1e-2) on one batch with gradient checkpointing, then
measured in train mode with grad enabled (bitsandbytes' fp32 dequant path; see
``tests/quant_helpers.py`` for its bf16 eval path on AVX512-BF16 CPUs). Max |Δ logits| against the
unmerged adapted model, for:

* ``dequantize``: ``lorafx.merge_dequantized`` (W = dequant(Wq) + ΔW in fp32);
* ``requantize``: ``lorafx.merge_requantized`` (Q(dequant(Wq) + ΔW)) and the largest fraction of
  ‖ΔW‖ a site's requantization lost;
* ``W16 + ΔW``: the wrong merge (adapter added to the original fp32 weights, unsloth-zoo#810);
* ``no adapter``: the base alone, for scale; ``eval bf16``: bitsandbytes' own eval forward.

Run: ``PYTHONPATH=.:tests python benchmarks/qlora.py``.
"""

from __future__ import annotations

import copy
import tempfile

import torch
from quant_helpers import bnb_llama, save_tiny_llama

import lorafx
from lorafx.cli.models import tiny_llama


def trained(base, ids):
    model = lorafx.apply(copy.deepcopy(base).train(), lorafx.Spec(lorafx.LoRA(r=8, alpha=16), targets="all-linear"))
    model.gradient_checkpointing_enable()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.gradient_checkpointing_disable()
    return model, losses


def w16_merge(model, ids, dense):
    """Logits of the wrong merge: the original fp32 W + ΔW at every site."""
    wrong = copy.deepcopy(dense)
    with torch.no_grad():
        for sa in lorafx.iter_sites(model).values():
            wrong.get_submodule(sa.site).weight += sa.adapters["default"].delta_weight()
    return wrong(ids).logits


def main() -> None:
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    dense = tiny_llama(0)
    directory = save_tiny_llama(tempfile.mkdtemp())
    print(
        "| base | loss 0 → 20 | dequantize | requantize | requant error / ‖ΔW‖ (max) | W16 + ΔW | no adapter | bnb eval |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("nf4-dq", "fp4", "int8"):
        base = bnb_llama(directory, kind)
        model, losses = trained(base, ids)
        ref = model(ids).logits.detach()

        def diff(out, ref=ref):
            return f"{(out.detach() - ref).abs().max().item():.2e}"

        lorafx.merge_dequantized(model)
        dq = diff(model(ids).logits)
        lorafx.unmerge(model)
        lost = max(lorafx.merge_requantized(model).values())
        rq = diff(model(ids).logits)
        lorafx.unmerge(model)
        wrong = diff(w16_merge(model, ids, dense))
        with lorafx.using_adapter(model, None):
            none = diff(model(ids).logits)
        with torch.no_grad():
            ev = diff(copy.deepcopy(model).eval()(ids).logits)
        print(f"| {kind} | {losses[0]:.3f} → {losses[-1]:.3f} | {dq} | {rq} | {lost:.1%} | {wrong} | {none} | {ev} |")


if __name__ == "__main__":
    main()
