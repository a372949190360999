"""CPU benchmark: torch.compile of a LoRA-adapted Llama, lorafx vs PEFT, same model and adapters.

For each library: the same seeded Llama, LoRA r = 16 on q/k/v/o/gate/up/down, two named adapters
("a" active, "b" loaded), identical adapter weights (copied across). Measured:

* eager train step (forward + backward + AdamW step), median ms;
* compile time: wall time of the first compiled train step minus one eager step;
* compiled train step, median ms; graph count (Dynamo graphs, 1 = no graph break);
* recompiles caused by switching to adapter "b" and back (Dynamo's own counter);
* max |loss difference| lorafx vs PEFT after the timed steps' first forward (same numbers expected).

``python -m benchmarks.compile [--quick]``; writes benchmarks/results/compile.json and .md. Numbers
on the shared 2-core machine are disturbed by other jobs; re-run on a quiet machine for the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import lorafx
from lorafx.models import tiny_llama

RESULTS = Path(__file__).parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lorafx_model(size: dict, r: int):
    model = tiny_llama(seed=0, **size)
    cfg = lorafx.LoRA(r=r, alpha=2 * r, init="random")
    model = lorafx.apply(model, lorafx.Spec(cfg, targets=TARGETS), "a")
    model = lorafx.apply(model, lorafx.Spec(cfg, targets=TARGETS), "b", activate=False)
    return model


def _peft_model(size: dict, r: int, source):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(tiny_llama(seed=0, **size), cfg, adapter_name="a")
    model.add_adapter("b", cfg)
    model.set_adapter("a")
    with torch.no_grad():
        for fqn, sa in lorafx.iter_sites(source).items():
            layer = model.base_model.model.get_submodule(fqn)
            for name in ("a", "b"):
                layer.lora_A[name].weight.copy_(sa.adapters[name].lora_A)
                layer.lora_B[name].weight.copy_(sa.adapters[name].lora_B)
    return model


def _switch(model, name: str) -> None:
    if hasattr(model, "peft_config"):
        model.set_adapter(name)
    else:
        lorafx.set_adapter(model, name)


def _train_step(fn, opt, ids):
    loss = fn(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _median_ms(fn, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):  # first eager steps pay one-off costs (AdamW state, allocator): ~1 s each here
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure(model, ids, steps: int, fullgraph: bool) -> dict:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    with torch.no_grad():
        first_loss = float(model(input_ids=ids, labels=ids).loss)
    eager_ms = _median_ms(lambda: _train_step(model, opt, ids), steps)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=fullgraph)
    t = time.perf_counter()
    _train_step(compiled, opt, ids)
    compile_s = time.perf_counter() - t - eager_ms / 1e3
    graphs = counters["stats"]["unique_graphs"]
    compiled_ms = _median_ms(lambda: _train_step(compiled, opt, ids), steps)
    for name in ("b", "a"):
        _switch(model, name)
        _train_step(compiled, opt, ids)
    recompiles = counters["stats"]["unique_graphs"] - graphs
    return dict(
        eager_ms=eager_ms,
        compile_s=compile_s,
        compiled_ms=compiled_ms,
        graphs=graphs,
        recompiles_on_switch=recompiles,
        loss=first_loss,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (checks the script works)")
    args = parser.parse_args(argv)
    if args.quick:
        size, tokens, steps, r = (
            dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=256),
            (2, 32),
            3,
            8,
        )
    else:
        size, tokens, steps, r = (
            dict(hidden=256, layers=4, intermediate=704, heads=8, kv_heads=4, vocab=4096),
            (4, 128),
            10,
            16,
        )
    ids = torch.randint(0, size["vocab"], tokens, generator=torch.Generator().manual_seed(0))
    lfx = _lorafx_model(size, r)
    peft = _peft_model(size, r, lfx)
    rows = {"lorafx": measure(lfx, ids, steps, fullgraph=True), "peft": measure(peft, ids, steps, fullgraph=False)}
    loss_diff = abs(rows["lorafx"]["loss"] - rows["peft"]["loss"])
    lines = [
        f"Llama hidden {size['hidden']}, {size['layers']} layers, tokens {tokens[0]}×{tokens[1]}, LoRA r={r} on 7 projections, "
        f"2 adapters, CPU ({torch.get_num_threads()} threads); |loss lorafx − PEFT| = {loss_diff:.1e}",
        "",
        "| | eager step (ms) | compile (s) | compiled step (ms) | Dynamo graphs | recompiles on adapter switch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r_ in rows.items():
        lines.append(
            f"| {name} | {r_['eager_ms']:.1f} | {r_['compile_s']:.1f} | {r_['compiled_ms']:.1f} | {r_['graphs']} | {r_['recompiles_on_switch']} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compile.json").write_text(
        json.dumps({"size": size, "tokens": tokens, "r": r, "loss_diff": loss_diff, "rows": rows}, indent=2)
    )
    (RESULTS / "compile.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
