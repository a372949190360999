"""One example config per variant, for test tables that run every variant (ONNX, compile, files, ...).

Variants that are not registered yet are skipped, so a test table grows as variants land. The
constructor arguments are the variants' public API (see lorafx/variants/*.py).
"""

import lorafx


def example_configs(vector_length: int = 256) -> dict:
    """name -> a small config of that variant with non-trivial (non-zero-output) initialisation."""
    make = {
        "lora": lambda: lorafx.LoRA(r=4, alpha=8, init="random"),
        "mor": lambda: lorafx.MoR(r=4, alpha=8, experts=3, init="random"),
        "unilora": lambda: lorafx.UniLoRA(r=4, vector_length=vector_length, seed=0),
        "celora": lambda: lorafx.CELoRA(r=8, alpha=16, keep_ratio=0.5, init="random"),
        "capaboost": lambda: lorafx.CapaBoost(r=4, alpha=8, copies=2, density=0.5, seed=0, init="random"),
        "droplora": lambda: lorafx.DropLoRA(r=4, alpha=8, rank_dropout=0.5, init="random"),
    }
    out = {}
    for name, factory in make.items():
        try:
            out[name] = factory()
        except AttributeError:  # variant not in this build yet
            continue
    return out
