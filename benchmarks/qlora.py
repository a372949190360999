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

The same for torchao int8 weight-only (``Int8WeightOnlyConfig()``; requantized with it again). A
second table gives memory against PEFT 0.21 (``get_peft_model`` with the same LoRA r=8 on
``"all-linear"``): bytes of the base weights in the ``state_dict`` (packed weights, quant state,
dense embeddings/norms/head) and trainable parameters.

Run: ``PYTHONPATH=.:tests python benchmarks/qlora.py``.
"""

from __future__ import annotations

import copy
import tempfile

import torch
from quant_helpers import bnb_llama, save_tiny_llama, torchao_llama
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

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


def _nbytes(t: torch.Tensor) -> int:
    # a torchao tensor subclass reports its logical dtype's element size: count its inner tensors
    if is_traceable_wrapper_subclass(t):
        return sum(_nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def _bytes(model, skip) -> int:
    return sum(_nbytes(t) for k, t in model.state_dict().items() if not skip(k))


def memory(base) -> str:
    """``| base bytes lorafx / PEFT | trainable lorafx / PEFT |`` for LoRA r=8 on all-linear."""
    import peft

    model = lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=8, alpha=16), targets="all-linear"))
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    ours = _bytes(model, lambda k: ".lorafx." in k)
    theirs = _bytes(ref, lambda k: "lora_" in k)
    trainable = lorafx.trainable_parameters(model)[0]
    peft_trainable = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    return f"{ours:,} / {theirs:,} | {trainable:,} / {peft_trainable:,}"


def bases(directory):
    for kind in ("nf4-dq", "fp4", "int8"):
        yield kind, bnb_llama(directory, kind)
    yield "torchao int8", torchao_llama()


def main() -> None:
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    dense = tiny_llama(0)
    directory = save_tiny_llama(tempfile.mkdtemp())
    rows, mem = [], [f"| fp32 (no quantization) | {_bytes(dense, lambda k: False):,} | – |"]
    for kind, base in bases(directory):
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
        ev = "–"
        if "torchao" not in kind:
            with torch.no_grad():
                ev = diff(copy.deepcopy(model).eval()(ids).logits)
        rows.append(
            f"| {kind} | {losses[0]:.3f} → {losses[-1]:.3f} | {dq} | {rq} | {lost:.1%} | {wrong} | {none} | {ev} |"
        )
        mem.append(f"| {kind} | {memory(base)} |")
    print(
        "| base | loss 0 → 20 | dequantize | requantize | requant error / ‖ΔW‖ (max) | W16 + ΔW | no adapter | bnb eval |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("| base | base weight bytes in state_dict, lorafx / PEFT | trainable parameters, lorafx / PEFT |")
    print("|---|---|---|")
    print("\n".join(mem))


if __name__ == "__main__":
    main()
