"""MoE expert LoRA: base Mixtral vs lorafx (grouped form) vs PEFT (``ParamWrapper``), side by side.

A Mixtral of hidden 256, intermediate 512, 8 experts (top 2), 2 layers, batch 2 x 128 tokens, LoRA
r = 8 on "all-linear" (attention, router, experts; ``gate_up_proj`` at rank 16 in both libraries).
Reports the median forward (no grad) time of each and its ratio to the base model, and the median
train step (forward + backward + Adam on the adapters) of lorafx relative to PEFT. PEFT folds
``s·B_e A_e`` of every expert into the expert tensors on each forward (a parametrization:
E·d_out·d_in·r per projection); lorafx runs the adapter on each expert's routed tokens only.

    .venv/bin/python benchmarks/moe.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import speed_rows, write_results  # noqa: E402
from overhead import speed_medians  # noqa: E402

import lorafx  # noqa: E402


def build(quick: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    hidden, inter = (64, 128) if quick else (256, 512)
    cfg = MixtralConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    base = MixtralForCausalLM(cfg).eval()
    fx_model = lorafx.apply(copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=8, init="random"), targets="all-linear"))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules="all-linear"))
    return base, fx_model, peft_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, few repeats (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 11)
    base, fx_model, peft_model = build(args.quick)
    ids = torch.randint(0, 1024, (2, 32 if args.quick else 128), generator=torch.Generator().manual_seed(0))

    fwd_t, train_t = speed_medians(base, fx_model, peft_model, ids, repeats)
    c = base.config
    data = {
        "config": {"quick": args.quick, "batch": list(ids.shape), "r": 8, "repeats": repeats},
        "forward_s": fwd_t,
        "forward_ratio_to_base": {k: v / fwd_t["base"] for k, v in fwd_t.items()},
        "train_step_s": train_t,
        "train_ratio_lorafx_to_peft": train_t["lorafx"] / train_t["peft"],
    }
    md = [
        f"Mixtral (hidden {c.hidden_size}, intermediate {c.intermediate_size}, {c.num_local_experts} experts top "
        f"{c.num_experts_per_tok}, {c.num_hidden_layers} layers), batch {ids.shape[0]} x {ids.shape[1]}, LoRA r = 8 "
        f'"all-linear" (experts and router included). Medians of {repeats} interleaved runs, '
        f"{torch.get_num_threads()} CPU threads, shared machine.",
        "",
        *speed_rows(fwd_t, train_t),
        "",
    ]
    path = write_results("moe" + ("_quick" if args.quick else ""), data, "\n".join(md))
    print("\n".join(md))
    print(f"written {path}")


if __name__ == "__main__":
    main()
