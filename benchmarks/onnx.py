"""onnxruntime latency of a LoRA Llama exported base / merged / unmerged / multi (K adapters).

Run from the repository root as a module (a script named onnx.py run by path would shadow the onnx
package): ``python -m benchmarks.onnx [--quick]``. Writes ``benchmarks/results/onnx.json`` and ``.md``.

Rows (batch 8, CPU execution provider, median of ``--repeat`` runs after warm-up):

* base — the model without adapters; every ratio is against it.
* merged — LoRA folded into W: the same graph, so ≈ 1.00×.
* unmerged — adapter tensors fed as inputs: the added-FLOP ratio is printed beside it.
* multi — one run of a batch whose 8 rows use K different adapters (Gather + batched MatMul).
* unmerged, one run per adapter — the mixed batch on one unmerged session, split by adapter (K runs
  of batch 8/K): what a server without per-row adapters does.
* K separate sessions — one merged session per adapter (K copies of the weights in memory), each
  running its own rows (K runs of batch 8/K), or each running the whole batch and keeping its rows.

Then greedy decode tokens/s with the KV cache (:mod:`benchmarks.onnx_decode`: PyTorch eager,
onnxruntime, onnxruntime-genai vs ORT GenAI's builder), written to ``onnx_decode.json`` / ``.md``;
``--no-decode`` skips it, ``--decode-new`` sets the new tokens (default 128).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

if not __package__:
    raise SystemExit("run as a module from the repository root: python -m benchmarks.onnx [--quick]")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import lorafx  # noqa: E402
from lorafx.cli.models import tiny_llama  # noqa: E402
from lorafx.export import AdapterSession, to_onnx  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = dict(hidden=1024, layers=4, intermediate=2816, heads=16, kv_heads=16, vocab=32000)  # cli.models.bench_llama
QUICK = dict(hidden=256, layers=2, intermediate=704, heads=4, kv_heads=4, vocab=2000)


def median_ms(fns: dict, repeat: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time of each callable; rounds interleave them so load drift hits all alike."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def added_flop_ratio(base_model: torch.nn.Module, model: torch.nn.Module, r: int) -> float:
    """Adapter FLOPs / base FLOPs per token: Σ r·(d_in + d_out) over sites / Σ d_in·d_out over all linears."""
    base = sum(m.in_features * m.out_features for m in base_model.modules() if isinstance(m, torch.nn.Linear))
    adapter = sum(sa.in_features + sa.out_features for sa in lorafx.iter_sites(model).values()) * r
    return adapter / base


def build(cfg: dict, r: int, k: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = tiny_llama(0, **cfg)
    torch.manual_seed(1)
    model = tiny_llama(0, **cfg)
    for i in range(k):
        model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=r, init="random"), targets=TARGETS), name=f"a{i}")
    lorafx.set_adapter(model, "a0")
    return base, model.eval()


def run(cfg: dict, batch: int, seq: int, r: int, k: int, repeat: int) -> dict:
    base, model = build(cfg, r, k)
    ids = torch.randint(0, cfg["vocab"], (batch, seq))
    feed = {"input_ids": ids.numpy()}
    rows = [f"a{i % k}" for i in range(batch)]
    names = [f"a{i}" for i in range(k)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        to_onnx(base, {"input_ids": ids}, tmp / "base", mode="merged")
        to_onnx(model, {"input_ids": ids}, tmp / "merged", mode="merged")
        to_onnx(model, {"input_ids": ids}, tmp / "unmerged", mode="unmerged", adapters=["a0"])
        to_onnx(model, {"input_ids": ids}, tmp / "multi", mode="multi", adapters=names)
        to_onnx(model, {"input_ids": ids}, tmp / "unmerged_k", mode="unmerged", adapters=names)
        export_s = time.perf_counter() - t0
        sess = {m: AdapterSession(tmp / m) for m in ("base", "merged", "unmerged", "multi")}
        sess["multi_as_unmerged"] = AdapterSession(tmp / "unmerged_k")
        separate = [AdapterSession(tmp / "merged") for _ in range(k)]  # one merged session per adapter
        idx = [np.array([j for j, n in enumerate(rows) if n == name]) for name in names]
        whole = {"input_ids": feed["input_ids"]}
        fns = {
            "base": lambda: sess["base"].run(feed),
            "merged": lambda: sess["merged"].run(feed),
            "unmerged": lambda: sess["unmerged"].run(feed, adapter="a0"),
            f"multi (K={k}, mixed rows)": lambda: sess["multi"].run(feed, adapter=rows),
            f"unmerged, one run per adapter ({k} × batch {batch // k})": lambda: sess["multi_as_unmerged"].run(
                feed, adapter=rows
            ),
            f"{k} separate sessions, own rows ({k} × batch {batch // k})": lambda: [
                s.run({"input_ids": feed["input_ids"][i]}) for s, i in zip(separate, idx, strict=True)
            ],
            f"{k} separate sessions, whole batch each": lambda: [s.run(whole) for s in separate],
        }
        mb = {m: _mb(tmp / m) for m in ("base", "merged", "unmerged", "multi")}
        adapter_mb = _mb(tmp / "multi" / "adapters", "*/*.safetensors") / k
        weights = [mb["base"], mb["merged"], mb["unmerged"] + adapter_mb, mb["multi"] + k * adapter_mb]
        weights += [mb["unmerged"] + k * adapter_mb, k * mb["merged"], k * mb["merged"]]
        res = median_ms(fns, repeat)
    return {
        "config": cfg,
        "batch": batch,
        "seq": seq,
        "r": r,
        "K": k,
        "repeat": repeat,
        "export_s": round(export_s, 1),
        "added_flop_ratio": added_flop_ratio(base, model, r),
        "median_ms": res,
        "weights_mb": dict(zip(res, weights, strict=True)),
    }


def _mb(directory: Path, pattern: str = "model.onnx*") -> float:
    """Size in MB of the files matching ``pattern`` (the graph and its external data, or adapter files)."""
    return sum(p.stat().st_size for p in directory.glob(pattern)) / 1e6


def to_markdown(out: dict) -> str:
    base = out["median_ms"]["base"]
    c = out["config"]
    lines = [
        f"Llama hidden {c['hidden']}, {c['layers']} layers, intermediate {c['intermediate']}, vocab {c['vocab']}; batch {out['batch']} × seq {out['seq']}; LoRA r={out['r']} on {', '.join(TARGETS)}; onnxruntime CPU, median of {out['repeat']} runs.",
        "",
        "| graph | median ms | vs base | weights in memory, MB |",
        "|---|---:|---:|---:|",
    ]
    for name, ms in out["median_ms"].items():
        lines.append(f"| {name} | {ms:.2f} | {ms / base:.2f}× | {out['weights_mb'][name]:.0f} |")
    lines += ["", f"Added FLOPs of the unmerged adapters: {out['added_flop_ratio'] * 100:.1f}% of the base linears."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small Llama (hidden 256, 2 layers), seq 32, 5 repeats")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="default 128 (32 with --quick)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--k", type=int, default=4, help="adapters in the multi graph")
    p.add_argument("--repeat", type=int, default=None, help="default 20 (5 with --quick)")
    p.add_argument("--out", default="benchmarks/results/onnx")
    p.add_argument("--no-decode", action="store_true", help="skip the KV-cache decode rows")
    p.add_argument("--decode-new", type=int, default=None, help="decode: new tokens (default 128; 16 with --quick)")
    p.add_argument("--decode-repeat", type=int, default=3)
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    seq = args.seq or (32 if args.quick else 128)
    repeat = args.repeat or (5 if args.quick else 20)
    out = run(cfg, args.batch, seq, args.r, args.k, repeat)
    md = to_markdown(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=2))
    Path(args.out + ".md").write_text(md)
    print(md)
    if not args.no_decode:
        from benchmarks import onnx_decode

        decode = ["--new", str(args.decode_new)] if args.decode_new else []
        decode += ["--repeat", str(args.decode_repeat), "--out", str(Path(args.out).parent / "onnx_decode")]
        out["decode"] = onnx_decode.main(decode + (["--quick"] if args.quick else []))
    return out


if __name__ == "__main__":
    main()
