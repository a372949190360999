"""Unmerged-adapter overhead: base model vs lorafx vs PEFT, side by side in one process.

Llama of hidden 1024, 4 layers, intermediate 2816 (vocab 32000), batch 2 x 256 tokens, LoRA r = 16
on all linears (not the head). Reports the median forward (no grad) time of each contender and its
ratio to the base model, and the median train step (forward + backward + Adam on the adapters) of
lorafx relative to PEFT. The added FLOPs of the adapters are ~2% of the base model's.

    .venv/bin/python benchmarks/overhead.py [--quick] [--repeats N]
    .venv/bin/python benchmarks/overhead.py --decode [--quick] [--repeats N] [--no-compile]

``--decode`` times KV-cache decoding instead (batch 1 and 8, eager ``generate`` and a compiled static-cache
loop, then single decode steps of each, interleaved; see ``benchmarks/_decode.py``) and writes
``results/overhead_decode.{json,md}``. The eager step rows also time lower bounds for any unmerged
implementation (hand-written sites with no checks) and the merged model: ``benchmarks/_decode_floor.py``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _decode import compiled_steps, generate_fn, static_decode_fn, step_fn  # noqa: E402
from _decode_floor import FLOORS, compiled_floor_models, compiled_floor_steps, floor_models  # noqa: E402
from common import interleaved_medians, speed_rows, write_results  # noqa: E402

import lorafx  # noqa: E402
from lorafx.cli.models import bench_llama, tiny_llama  # noqa: E402


def build(quick: bool):
    base = tiny_llama(0, hidden=256, layers=2, intermediate=704, vocab=4096) if quick else bench_llama(0)
    r = 16
    fx_model = lorafx.apply(
        copy.deepcopy(base), lorafx.Spec(lorafx.LoRA(r=r, alpha=32, init="random"), targets="all-linear")
    )
    import peft

    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=32, target_modules="all-linear")
    )
    return base, fx_model, peft_model


def added_flop_ratio(model) -> float:
    base = sum(sa.in_features * sa.out_features for sa in lorafx.iter_sites(model).values())
    head = model.lm_head.weight.numel()
    adapters = sum(
        sa.adapters["default"].config.r * (sa.in_features + sa.out_features) for sa in lorafx.iter_sites(model).values()
    )
    return adapters / (base + head)


def train_step_fn(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)

    def step():
        out = model(ids).logits
        loss = out.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def speed_medians(base, fx_model, peft_model, ids, repeats: int) -> tuple[dict, dict]:
    """Median seconds of a no-grad forward (base, lorafx, PEFT) and of a train step (lorafx, PEFT),
    interleaved in one process; leaves the adapted models in train mode."""

    def fwd(m):
        def run():
            with torch.no_grad():
                m(ids)

        return run

    fwd_t = interleaved_medians({"base": fwd(base), "lorafx": fwd(fx_model), "peft": fwd(peft_model)}, repeats)
    for m in (fx_model, peft_model):
        m.train()
    train_t = interleaved_medians(
        {"lorafx": train_step_fn(fx_model, ids), "peft": train_step_fn(peft_model, ids)}, max(3, repeats // 2)
    )
    return fwd_t, train_t


def decode_main(args) -> None:
    """Per-token decode time of base, lorafx and PEFT at batch 1 and 8, eager and compiled."""
    repeats = args.repeats or (3 if args.quick else 9)
    torch.manual_seed(0)
    base, fx_model, peft_model = build(args.quick)
    models = {"base": base, "lorafx": fx_model, "peft": peft_model}
    for m in models.values():
        m.eval()
    new = 8 if args.quick else 32
    steps = None if args.no_compile else compiled_steps(base, fx_model, peft_model)
    rows, data = [], {}
    for batch in args.batches:
        ids = torch.randint(0, base.config.vocab_size, (batch, 4))
        modes = {"eager": {k: generate_fn(m, ids, new) for k, m in models.items()}}
        if steps is not None:
            modes["compiled"] = {k: static_decode_fn(m, steps[k], ids, new) for k, m in models.items()}
            for k, fn in modes["compiled"].items():  # compiles; and the compiled step decodes as eager does
                if not torch.equal(fn(), static_decode_fn(models[k], models[k], ids, new)()):
                    raise RuntimeError(f"compiled {k} decodes other tokens than eager {k} (batch {batch})")
        for mode, fns in modes.items():
            t = {k: v / new for k, v in interleaved_medians(fns, repeats).items()}
            data[f"{mode}_batch{batch}"] = {"ms_per_token": {k: v * 1e3 for k, v in t.items()}}
            data[f"{mode}_batch{batch}"]["ratio_to_base"] = {k: v / t["base"] for k, v in t.items()}
            rows.append(_decode_row(f"{mode}, batch {batch}", t))
    floors = decode_floors(fx_model, steps is not None, base.config.vocab_size, new, args.batches)
    step_rows, floor_rows, past = decode_step_rows(models, steps, args, data, max_len=4 + new, floors=floors)
    flops = added_flop_ratio(fx_model)
    md = [
        f"KV-cache decoding, greedy, prompt 4 tokens + {new} new, same model and LoRA r = 16 on all linears "
        f"(adapters add {flops * 100:.1f}% of the FLOPs and weight bytes); eager = `generate` (dynamic cache), "
        f"compiled = `torch.compile`d decode step over a `StaticCache`. Medians of {repeats} interleaved runs, "
        f"{torch.get_num_threads()} CPU threads.",
        "",
        "| decode | base ms/token | lorafx ms/token | PEFT ms/token | lorafx / base | PEFT / base |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Single decode steps (one new token at {past} cached, the cache put back after each; same "
        f"models): medians of {step_repeats(args)} steps interleaved round-robin.",
        "",
        "| decode step | base ms | lorafx ms | PEFT ms | lorafx / base | PEFT / base |",
        "|---|---:|---:|---:|---:|---:|",
        *step_rows,
        "",
        "Lower bounds, timed in the same round-robin as the step rows above (`benchmarks/_decode_floor.py`): "
        "lorafx's sites replaced by hand-written code with no check at all, and the adapters merged "
        "into the weights.",
        "",
        "| decode step | lorafx / base | " + " | ".join(f"{k} / base" for k in FLOORS) + " |",
        "|---|---:|" + "---:|" * len(FLOORS),
        *floor_rows,
        "",
    ]
    data["config"] = {
        "quick": args.quick,
        "new_tokens": new,
        "repeats": repeats,
        "r": 16,
        "step_past": past,
        "step_repeats": step_repeats(args),
    }
    path = write_results("overhead_decode" + ("_quick" if args.quick else "") + args.tag, data, "\n".join(md))
    print("\n".join(md))
    print(f"written {path}")


def decode_floors(fx_model, compiled: bool, vocab: int, new: int, batches) -> dict[str, dict[str, tuple]]:
    """``{"eager"|"compiled": {name: (model, step)}}``: the lower bounds of ``_decode_floor``, checked
    first. Each floor model computes the lorafx model's logits (to fp32 rounding: a bound that computes
    something else bounds nothing) on a batch-8 decode step, and each compiled one decodes the lorafx
    model's tokens at each of ``batches`` (compiling its graph for each); raises otherwise."""
    floors = {"eager": {k: (m, m) for k, m in floor_models(fx_model).items()}}
    if compiled:
        models = compiled_floor_models(fx_model)
        floors["compiled"] = {k: (models[k], step) for k, step in compiled_floor_steps(models).items()}
    ids = torch.randint(0, vocab, (8, 6))
    with torch.no_grad():
        out = fx_model(ids, use_cache=True)
        ref = fx_model(ids[:, -1:], past_key_values=copy.deepcopy(out.past_key_values)).logits
        for mode, named in floors.items():
            for name, (model, step) in named.items():
                logits = model(ids[:, -1:], past_key_values=model(ids, use_cache=True).past_key_values).logits
                torch.testing.assert_close(logits, ref, msg=lambda m, k=name: f"decode floor {k!r}: {m}")
                for batch in batches if mode == "compiled" else ():  # compiles; decodes lorafx's tokens
                    prompt = torch.randint(0, vocab, (batch, 4))
                    tokens = static_decode_fn(model, step, prompt, new)()
                    if not torch.equal(tokens, static_decode_fn(fx_model, fx_model, prompt, new)()):
                        raise RuntimeError(
                            f"compiled decode floor {name!r} decodes other tokens than lorafx (batch {batch})"
                        )
    return floors


def _decode_row(label: str, t: dict) -> str:
    """A markdown row of seconds ``t`` per contender: ms each, then lorafx and PEFT over base."""
    ms = " | ".join(f"{t[k] * 1e3:.2f}" for k in ("base", "lorafx", "peft"))
    return f"| {label} | {ms} | {t['lorafx'] / t['base']:.3f}x | {t['peft'] / t['base']:.3f}x |"


STEP_PAST = 20  # cached tokens before the timed step


def step_repeats(args) -> int:
    return 20 if args.quick else 200


def decode_step_rows(
    models: dict, steps: dict | None, args, data: dict, max_len: int, floors: dict
) -> tuple[list[str], list[str], int]:
    """Single-step rows (``_decode.step_fn``), eager and compiled, each batch, at ``STEP_PAST`` cached
    tokens (fewer if the compiled loops' cache, ``max_len``, is shorter); the ``floors``
    (:func:`decode_floors`) run in the same round-robin as their mode's contenders. Fills ``data``.
    Returns the rows, the floor rows and the past length."""
    rows, floor_rows = [], []
    vocab = models["base"].config.vocab_size
    past = min(STEP_PAST, max_len - 1)
    for batch in args.batches:
        modes = {"eager": {k: step_fn(m, m, batch, past, vocab) for k, m in models.items()}}
        if steps is not None:
            modes["compiled"] = {k: step_fn(m, steps[k], batch, past, vocab, static=max_len) for k, m in models.items()}
        for mode, named in floors.items():
            static = max_len if mode == "compiled" else None
            modes[mode].update(
                {k: step_fn(m, step, batch, past, vocab, static=static) for k, (m, step) in named.items()}
            )
        for mode, fns in modes.items():
            t = interleaved_medians(fns, step_repeats(args), warmup=5)
            data[f"step_{mode}_batch{batch}"] = {
                "ms": {k: v * 1e3 for k, v in t.items()},
                "ratio_to_base": {k: v / t["base"] for k, v in t.items()},
            }
            rows.append(_decode_row(f"{mode}, batch {batch}", t))
            ratios = " | ".join(f"{t[k] / t['base']:.3f}x" if k in t else "–" for k in ("lorafx", *FLOORS))
            floor_rows.append(f"| {mode}, batch {batch} | {ratios} |")
    return rows, floor_rows, past


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, few repeats (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--decode", action="store_true", help="KV-cache decoding rows instead (batch 1 and 8)")
    ap.add_argument("--no-compile", action="store_true", help="with --decode: eager rows only")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="with --decode: batch sizes")
    ap.add_argument("--tag", default="", help="with --decode: suffix of the results file name")
    args = ap.parse_args()
    if args.decode:
        return decode_main(args)
    repeats = args.repeats or (3 if args.quick else 15)
    torch.manual_seed(0)
    base, fx_model, peft_model = build(args.quick)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (2, 64 if args.quick else 256))
    for m in (base, fx_model, peft_model):
        m.eval()

    fwd_t, train_t = speed_medians(base, fx_model, peft_model, ids, repeats)
    flops = added_flop_ratio(fx_model)
    data = {
        "config": {"quick": args.quick, "batch": list(ids.shape), "r": 16, "repeats": repeats},
        "forward_s": fwd_t,
        "forward_ratio_to_base": {k: v / fwd_t["base"] for k, v in fwd_t.items()},
        "train_step_s": train_t,
        "train_ratio_lorafx_to_peft": train_t["lorafx"] / train_t["peft"],
        "added_flops_ratio": flops,
    }
    md = [
        f"Benchmark Llama (hidden {base.config.hidden_size}, {base.config.num_hidden_layers} layers, intermediate {base.config.intermediate_size}), batch {ids.shape[0]} x {ids.shape[1]}, LoRA r = 16 on all linears; adapters add {flops * 100:.1f}% FLOPs. Medians of {repeats} interleaved runs, {torch.get_num_threads()} CPU threads.",
        "",
        *speed_rows(fwd_t, train_t),
        "",
    ]
    path = write_results("overhead" + ("_quick" if args.quick else ""), data, "\n".join(md))
    print("\n".join(md))
    print(f"written {path}")


if __name__ == "__main__":
    main()
