"""Bytes saved for backward by one training forward, LoRA input dropout 0.05 vs none: lorafx vs PEFT.

Benchmark Llama (hidden 1024, 4 layers, intermediate 2816, vocab 32000), batch 4 x 512 tokens, LoRA
r = 16 on all seven projections. Every tensor autograd saves passes through
``torch.autograd.graph.saved_tensors_hooks``; each storage is counted once (a tensor saved by several
nodes, or views of one buffer, count once) and the model's parameters are left out (they are not
activations). lorafx draws the dropout mask from a seed and draws it again in backward
(``lorafx.seeded_dropout``); PEFT (``nn.Dropout`` before ``lora_A``) saves the mask and the dropped
input of every site.

    .venv/bin/python benchmarks/dropout_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402

import lorafx  # noqa: E402
from lorafx.cli.models import bench_llama, tiny_llama  # noqa: E402


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward of ``model`` on ``ids``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids).logits
    del out
    return sum(seen.values())


def contenders(base, p: float) -> dict:
    import peft

    fx = lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=16, alpha=32, dropout=p), targets="all-linear"))
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=p, target_modules="all-linear")
    )
    return {"lorafx": fx.train(), "peft": pm.train()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model and batch (a smoke run)")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = tiny_llama(0, hidden=256, layers=2, intermediate=704, vocab=4096) if args.quick else bench_llama(0)
    ids = torch.randint(0, base.config.vocab_size, (2, 64) if args.quick else (4, 512))
    mib = {}
    for p in (0.0, 0.05):
        for name, model in contenders(base, p).items():
            mib[(name, p)] = saved_bytes(model, ids) / 2**20
            del model
    data = {f"{n}_dropout_{p}": v for (n, p), v in mib.items()}
    data["config"] = {"quick": args.quick, "tokens": list(ids.shape), "r": 16}
    rows = [
        f"| {label} | {mib[(n, 0.0)]:,.0f} | {mib[(n, 0.05)]:,.0f} | {mib[(n, 0.05)] / mib[(n, 0.0)]:.3f}x |"
        for n, label in (("lorafx", "lorafx"), ("peft", "PEFT"))
    ]
    md = [
        f"Saved for backward by one training forward, batch {ids.shape[0]} x {ids.shape[1]} tokens, Llama hidden "
        f"{base.config.hidden_size}, {base.config.num_hidden_layers} layers, LoRA r = 16 on all seven projections; "
        "each storage counted once, parameters left out (`torch.autograd.graph.saved_tensors_hooks`).",
        "",
        "| | MiB, no dropout | MiB, dropout 0.05 | ratio |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ]
    path = write_results("dropout_memory" + ("_quick" if args.quick else ""), data, "\n".join(md))
    print("\n".join(md))
    print(f"written {path}")


if __name__ == "__main__":
    main()
