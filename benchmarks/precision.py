"""Merge precision per dtype: lorafx merge vs PEFT merge on the same base and adapter weights.

For fp32, fp16 and bf16 bases, one LoRA adapter (all linear sites, r=8, non-zero B scaled so that
rms(ΔW) = 0.1·rms(W) at every site, a typical trained magnitude) is loaded into lorafx and, through
``lorafx.to_peft`` + ``PeftModel.from_pretrained``, into PEFT. Reported per dtype and library:

* ``logits_max_diff``: max |merged − unmerged| logits on random tokens (what ``lorafx.verify_merge``
  reports);
* ``merged_w_not_rounded``: fraction of merged weight elements that differ from the correctly
  rounded ``round(W + ΔW)`` (sum in fp64). For half bases, ~0 means "summed in fp32, rounded once"
  (rare fp32-then-half double roundings remain); for fp32 it counts ΔW's own fp32 rounding;
* ``unmerge_w_max_err`` / ``unmerge10_w_max_err``: max |W − W₀| after 1 and 10 merge+unmerge
  cycles (subtract path; lorafx's ``merge(keep_original=True)`` restores exactly and is not shown).

PEFT 0.21 on CPU merges with ``W += ΔW_fp32`` (PyTorch promotes, so one rounding, like lorafx) but
unmerges with ``W -= ΔW.to(W.dtype)`` and ``safe_merge=True`` merges with ``W += ΔW.to(W.dtype)``:
ΔW is rounded to the base dtype first, two roundings (peft#1388).

Run: ``PYTHONPATH=. python benchmarks/precision.py [--quick]``; writes
``benchmarks/results/precision.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch

import lorafx
from lorafx.cli.models import tiny_llama

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RESULTS = Path(__file__).parent / "results"


def build_adapter(base: torch.nn.Module, rank: int) -> torch.nn.Module:
    """lorafx LoRA on every linear site with B rescaled so rms(ΔW) = 0.1·rms(W) (seeded)."""
    torch.manual_seed(1)
    model = lorafx.apply(
        copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=rank, alpha=2 * rank, init="random"), targets="all-linear")
    )
    with torch.no_grad():
        for sa in lorafx.iter_sites(model).values():
            a, w = sa.adapters["default"], model.get_submodule(sa.site).weight.float()
            ratio = a.delta_weight().pow(2).mean().sqrt() / w.pow(2).mean().sqrt()
            a.lora_B.mul_(0.1 / ratio)
    return model


def weights(model: torch.nn.Module, sites: list[str], peft: bool) -> dict[str, torch.Tensor]:
    root = model.base_model.model if peft else model
    return {
        s: (root.get_submodule(s).base_layer if peft else root.get_submodule(s)).weight.detach().clone() for s in sites
    }


def max_err(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@torch.no_grad()
def measure(model, merge, unmerge, ids, sites, peft, exact) -> dict:
    """Merge/unmerge metrics of one library on one model (see the module docstring)."""
    w0 = weights(model, sites, peft)
    unmerged = model(ids).logits.float()
    merge()
    merged = model(ids).logits.float()
    w_merged = weights(model, sites, peft)
    wrong = sum((w_merged[s] != exact[s]).sum().item() for s in sites)
    unmerge()
    one = max_err(weights(model, sites, peft), w0)
    for _ in range(9):
        merge()
        unmerge()
    return {
        "logits_max_diff": (merged - unmerged).abs().max().item(),
        "merged_w_not_rounded": wrong / sum(exact[s].numel() for s in sites),
        "unmerge_w_max_err": one,
        "unmerge10_w_max_err": max_err(weights(model, sites, peft), w0),
    }


def run_dtype(dtype: torch.dtype, size: dict, rank: int, tokens: tuple[int, int]) -> dict:
    from peft import PeftModel

    base = tiny_llama(seed=0, **size).to(dtype)
    lx = build_adapter(base, rank)
    sites = sorted(lorafx.iter_sites(lx))
    exact = {}  # round(W + s·B·A) with the sum in fp64: the correctly rounded merged weight
    for sa in lorafx.iter_sites(lx).values():
        a = sa.adapters["default"]
        w = lx.get_submodule(sa.site).weight
        exact[sa.site] = (w.double() + a.scale * a.lora_B.double() @ a.lora_A.double()).to(dtype)
    ids = torch.randint(0, size["vocab"], tokens, generator=torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as tmp:
        lorafx.to_peft(lx, tmp)
        pm, pm_safe = (PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval() for _ in range(2))
    safe_merge = lambda: pm_safe.merge_adapter(safe_merge=True)  # noqa: E731
    rows = {
        "lorafx": measure(lx, lambda: lorafx.merge(lx), lambda: lorafx.unmerge(lx), ids, sites, False, exact),
        "peft": measure(pm, pm.merge_adapter, pm.unmerge_adapter, ids, sites, True, exact),
        # PEFT's safe_merge=True rounds ΔW to the base dtype before adding (two roundings)
        "peft safe_merge": measure(pm_safe, safe_merge, pm_safe.unmerge_adapter, ids, sites, True, exact),
    }
    rows["lorafx"]["verify_merge_max_diff"] = lorafx.verify_merge(lx, ids)["max_abs_diff"]
    return rows


def markdown(result: dict) -> str:
    cols = ["logits_max_diff", "merged_w_not_rounded", "unmerge_w_max_err", "unmerge10_w_max_err"]
    lines = [
        f"Model: tiny Llama {result['size']}, LoRA r={result['rank']} on all {result['sites']} linear sites, rms(ΔW) = 0.1·rms(W), {result['tokens']} tokens.",
        "",
        "| dtype | library | merged − unmerged logits (max abs) | merged W ≠ round(W+ΔW) | W after merge+unmerge (max abs err) | after 10 cycles |",
        "|---|---|---|---|---|---|",
    ]
    for dt, rows in result["dtypes"].items():
        for lib, r in rows.items():
            cells = [f"{r[c]:.2e}" if c != "merged_w_not_rounded" else f"{100 * r[c]:.3f} %" for c in cols]
            lines.append(f"| {dt} | {lib} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="hidden 64, 2 layers (seconds) instead of hidden 512, 4 layers"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    size = (
        dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=256)
        if args.quick
        else dict(hidden=512, layers=4, intermediate=1408, heads=8, kv_heads=8, vocab=4096)
    )
    rank, tokens = 8, (2, 32)
    result = {"size": size, "rank": rank, "tokens": list(tokens), "torch": torch.__version__, "dtypes": {}}
    for name, dtype in DTYPES.items():
        result["dtypes"][name] = run_dtype(dtype, size, rank, tokens)
    result["sites"] = 7 * size["layers"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / "precision.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
