"""Greedy decode tokens/s of a LoRA Llama: PyTorch eager, onnxruntime (lorafx KV-cache exports) and
onnxruntime-genai (lorafx's export vs ORT GenAI's model builder with the same PEFT adapter).

Called by ``python -m benchmarks.onnx`` (rows appended to its results); alone:
``python -m benchmarks.onnx_decode [--quick]``. Every row decodes ``--new`` tokens after a
``--prompt``-token prompt, greedy, without stopping at EOS; tokens/s = batch × new / median wall time
of whole generate calls (prefill included), rounds interleaved so load drift hits all rows alike.

onnxruntime rows (lorafx ``AdapterSession.generate``, CPU execution provider, thread-pool spinning
off: see :func:`no_spinning`):

* base / merged — plain graphs; unmerged — adapter tensors as graph inputs, as ``generate`` feeds
  them on CPU (numpy arrays through ``session.run``);
* unmerged, OrtValue I/O binding — adapters bound once as ``OrtValue``, the cache kept as ``OrtValue``
  between steps (what ``generate`` does on a GPU provider);
* unmerged, ORT adapter API — the adapter as ``onnxruntime.LoraAdapter`` (``.onnx_adapter``) activated by
  ``RunOptions.add_active_adapter``, through ``session.run`` (onnxruntime ignores it under I/O binding);
* multi — K adapters stacked, rows cycling through them (batch 1: one row).

onnxruntime-genai rows: lorafx's own KV-cache export with ``a0`` as an ``.onnx_adapter``; the model
builder's graph with the PEFT copy of ``a0`` baked in (the reference); and the builder's graph with
``a0`` swappable (:func:`lorafx.export.build_with_builder`: the builder's LoRA tensors as inputs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lorafx
from lorafx.cli.models import tiny_llama, word_tokenizer
from lorafx.export import AdapterSession, build_with_builder, to_onnx
from lorafx.export.decode import BoundStep, NumpyStep, Sampling, generate_tokens

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(cfg: dict, r: int, k: int):
    base = tiny_llama(0, **cfg)
    model = tiny_llama(0, **cfg)
    torch.manual_seed(1)
    for i in range(k):
        model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=r, init="random"), targets=TARGETS), name=f"a{i}")
    lorafx.set_adapter(model, "a0")
    for m in (base, model):
        m.generation_config.eos_token_id = None  # decode every token: a random model may emit EOS
    return base, model.eval()


def eager_fn(model, ids, new):
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def fn():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=True)

    return fn


def ort_fns(tmp: Path, base, model, ids: torch.Tensor, new: int, k: int) -> dict:
    import onnxruntime as ort

    ex = ids[:2] if ids.shape[0] >= 2 else ids.repeat(2, 1)
    to_onnx(base, ex, tmp / "base", mode="merged", kv_cache=True)
    to_onnx(model, ex, tmp / "merged", mode="merged", kv_cache=True)
    to_onnx(model, ex, tmp / "unmerged", mode="unmerged", adapters=["a0"], kv_cache=True)
    to_onnx(model, ex, tmp / "multi", mode="multi", adapters=[f"a{i}" for i in range(k)], kv_cache=True)
    s = {m: AdapterSession(tmp / m, sess_options=no_spinning()) for m in ("base", "merged", "unmerged", "multi")}
    np_ids = ids.numpy()
    mask = np.ones_like(np_ids)
    gen = dict(eos_token_id=None)
    un = s["unmerged"]
    kv = un.manifest["kv_cache"]
    lora = ort.LoraAdapter()
    lora.Load(str(tmp / "unmerged" / un.manifest["onnx_adapters"]["a0"]))
    opts = ort.RunOptions()
    opts.add_active_adapter(lora)
    greedy = Sampling()
    bound = {n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in un.adapters["a0"].items()}
    rows = [f"a{i % k}" for i in range(len(np_ids))]
    return {
        "onnxruntime base": lambda: s["base"].generate(np_ids, new, **gen),
        "onnxruntime merged": lambda: s["merged"].generate(np_ids, new, **gen),
        "onnxruntime unmerged": lambda: un.generate(np_ids, new, adapter="a0", **gen),
        "onnxruntime unmerged, OrtValue I/O binding": lambda: generate_tokens(
            BoundStep(un.session, kv, bound), kv, np_ids, mask, new, greedy, None, None
        ),
        # the lambda holds ``lora``: RunOptions does not keep the adapter alive (freed: std::bad_alloc)
        "onnxruntime unmerged, ORT adapter API": lambda lora=lora: generate_tokens(
            NumpyStep(un.session, kv, {}, run_options=opts), kv, np_ids, mask, new, greedy, None, None
        ),
        f"onnxruntime multi (K={k}, rows cycle)": lambda: s["multi"].generate(np_ids, new, adapter=rows, **gen),
    }


def no_spinning():
    """onnxruntime session options without thread-pool spinning.

    Measured here (hidden 256, 32 tokens, 12 interleaved generate calls over base, merged and
    unmerged sessions in one process, 2 shared cores): with onnxruntime's default spinning, the
    same merged session timed 62 ms and 104 ms depending on its place in the round (batch 8: 125
    and 173 ms), which made the identical base graph look 0.8x merged in earlier tables; with
    ``session.intra_op.allow_spinning = 0`` every call took 25-31 ms and two copies of one row
    agree within 7-10%. onnxruntime-genai rows are unaffected (two copies of the builder row
    within 1%)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def genai_fns(tmp: Path, base, model, ids: np.ndarray, new: int) -> tuple[dict, dict]:
    """onnxruntime-genai on lorafx's unmerged export (adapter a0 active), on the model builder's graph of
    the same base + PEFT adapter a0 (baked in), and on the builder's graph with lorafx's a0 as a
    swappable ``.onnx_adapter`` (:func:`lorafx.export.build_with_builder`). Returns (functions, notes)."""
    import onnxruntime_genai as og

    notes = {}
    hf, peft_dir, built, swappable = tmp / "hf", tmp / "peft", tmp / "builder", tmp / "builder_lorafx"
    base.save_pretrained(hf)
    word_tokenizer(base.config.vocab_size).save_pretrained(hf)
    lorafx.to_peft(model, peft_dir, name="a0")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(built)]
    cmd += ["-p", "fp32", "-e", "cpu", "-c", str(tmp / "cache"), "--extra_options", f"adapter_path={peft_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    notes["builder_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    build_with_builder(model, swappable, word_tokenizer(base.config.vocab_size), adapters=["a0"])
    notes["build_with_builder_s"] = round(time.perf_counter() - t0, 1)
    models = {
        "onnxruntime-genai, lorafx unmerged export + .onnx_adapter": (tmp / "unmerged", "adapters/a0.onnx_adapter"),
        "onnxruntime-genai, lorafx adapter on the builder's graph (build_with_builder)": (
            swappable,
            "adapters/a0.onnx_adapter",
        ),
    }
    if proc.returncode == 0:
        models["onnxruntime-genai, ORT GenAI builder (PEFT adapter baked in)"] = (built, None)
    else:
        notes["builder_error"] = proc.stderr[-800:]
    fns = {}
    for label, (directory, adapter_file) in models.items():
        m = og.Model(str(directory))
        adapters = None
        if adapter_file is not None:
            adapters = og.Adapters(m)
            adapters.load(str(directory / adapter_file), "a0")
        fns[label] = _genai_call(og, m, adapters, ids, new)
    return fns, notes


def _genai_call(og, model, adapters, ids: np.ndarray, new: int):
    def fn():
        params = og.GeneratorParams(model)
        n = ids.shape[1] + new
        params.set_search_options(max_length=n, min_length=n, do_sample=False, batch_size=ids.shape[0])
        gen = og.Generator(model, params)
        if adapters is not None:
            gen.set_active_adapter(adapters, "a0")
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        return gen.get_sequence(0)

    return fn


def median_s(fns: dict, repeat: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for i in range(repeat + 1):  # the first round warms up
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def run(cfg: dict, batches: list[int], prompt: int, new: int, r: int, k: int, repeat: int, genai: bool) -> dict:
    base, model = build(cfg, r, k)
    merged_model = tiny_llama(0, **cfg)
    torch.manual_seed(1)
    merged_model = lorafx.apply(merged_model, lorafx.Spec(lorafx.LoRA(r=r, init="random"), targets=TARGETS), name="a0")
    lorafx.merge(merged_model)
    merged_model.generation_config.eos_token_id = None
    out = {"config": cfg, "prompt": prompt, "new": new, "r": r, "K": k, "repeat": repeat, "rows": {}, "notes": {}}
    tmp = Path(tempfile.mkdtemp())
    try:
        for batch in batches:
            ids = torch.randint(3, cfg["vocab"], (batch, prompt), generator=torch.Generator().manual_seed(batch))
            fns = {
                "PyTorch eager base": eager_fn(base, ids, new),
                "PyTorch eager merged": eager_fn(merged_model, ids, new),
                "PyTorch eager unmerged": eager_fn(model, ids, new),
            }
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            fns |= ort_fns(tmp, base, model, ids, new, k)
            if genai:
                g, notes = genai_fns(tmp, base, model, ids.numpy(), new)
                fns |= g
                out["notes"] |= notes
            med = median_s(fns, repeat)
            out["rows"][str(batch)] = {n: {"median_s": s, "tokens_per_s": batch * new / s} for n, s in med.items()}
            print(to_markdown(out), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def to_markdown(out: dict) -> str:
    c = out["config"]
    batches = list(out["rows"])
    lines = [
        f"Greedy decode, Llama hidden {c['hidden']}, {c['layers']} layers, vocab {c['vocab']}; prompt {out['prompt']}, "
        f"{out['new']} new tokens; LoRA r={out['r']} on all 7 projections; CPU, median of {out['repeat']} generate calls.",
        "",
        "| runtime | "
        + " | ".join(f"batch {b}: tokens/s" for b in batches)
        + " | "
        + " | ".join(f"batch {b}: vs merged" for b in batches)
        + " |",
        "|---|" + "---:|" * (2 * len(batches)),
    ]
    names = list(dict.fromkeys(n for b in batches for n in out["rows"][b]))
    for n in names:
        tps = [out["rows"][b].get(n, {}).get("tokens_per_s") for b in batches]
        ref = [_merged_ref(out["rows"][b], n) for b in batches]
        cells = [f"{t:.0f}" if t else "–" for t in tps]
        ratios = [
            f"{out['rows'][b][n]['median_s'] / m:.2f}×" if t and m else "–"
            for b, t, m in zip(batches, tps, ref, strict=True)
        ]
        lines.append(f"| {n} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def _merged_ref(rows: dict, name: str) -> float | None:
    """The merged row of the same runtime (latency ratios compare like with like)."""
    key = "PyTorch eager merged" if name.startswith("PyTorch") else "onnxruntime merged"
    if name.startswith("onnxruntime-genai"):
        key = next((n for n in rows if "baked in" in n), None)
    return rows.get(key, {}).get("median_s") if key else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small Llama (hidden 256, 2 layers), 16 new tokens")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=None, help="new tokens (default 128; 16 with --quick)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-genai", action="store_true")
    p.add_argument("--out", default="benchmarks/results/onnx_decode")
    args = p.parse_args(argv)
    from benchmarks.onnx import FULL, QUICK

    cfg = QUICK if args.quick else FULL
    new = args.new or (16 if args.quick else 128)
    out = run(cfg, args.batch, args.prompt, new, args.r, args.k, args.repeat, not args.no_genai)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=2))
    Path(args.out + ".md").write_text(to_markdown(out))
    return out


if __name__ == "__main__":
    main()
