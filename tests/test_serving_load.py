"""Serving load: one onnxruntime multi-adapter session holding 120 adapters, hit from 8 threads.

Each request is a batch whose rows use different adapters (at most the exported 4 slots per batch);
every row must equal eager PyTorch with that row's adapter — no cross-talk between rows, requests
or threads.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from tolerances import ONNX_FP32

import lorafx
from lorafx.cli.models import tiny_mlp

pytest.importorskip("onnxruntime")

N_ADAPTERS, SLOTS, THREADS, REQUESTS = 120, 4, 8, 48


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from lorafx.export import AdapterSession, to_onnx

    root = tmp_path_factory.mktemp("serving")
    torch.manual_seed(0)
    model = tiny_mlp()
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    for name in names:
        model = lorafx.apply(model, lorafx.Spec(lorafx.LoRA(r=4, init="random"), targets=["up", "mid"]), name=name)
    model.eval()
    x = torch.randn(8, 32)
    with torch.no_grad():
        expected = {}
        for name in names:
            lorafx.set_adapter(model, name)
            expected[name] = model(x).numpy()
    to_onnx(model, (x,), root / "multi", mode="multi", adapters=names[:SLOTS])
    sess = AdapterSession(root / "multi")
    for name in names[SLOTS:]:
        sess.load_adapter(lorafx.save_adapter(model, root / "files" / name, name=name), name=name)
    assert len(sess.adapters) == N_ADAPTERS
    return sess, x.numpy(), expected, names


def test_every_adapter_alone_matches_eager(served):
    sess, x, expected, names = served
    input_name = sess.session.get_inputs()[0].name
    for name in names[:: N_ADAPTERS // 12]:
        out = next(iter(sess.run({input_name: x}, adapter=name).values()))
        np.testing.assert_allclose(out, expected[name], **ONNX_FP32)


def test_threads_with_mixed_rows_have_no_cross_talk(served):
    sess, x, expected, names = served
    input_name = sess.session.get_inputs()[0].name

    def request(seed: int) -> float:
        rng = random.Random(seed)
        chosen = rng.sample(names, SLOTS)
        rows = [rng.choice(chosen) for _ in range(len(x))]
        out = next(iter(sess.run({input_name: x}, adapter=rows).values()))
        want = np.stack([expected[name][i] for i, name in enumerate(rows)])
        return float(np.abs(out - want).max())

    with ThreadPoolExecutor(THREADS) as pool:
        errors = list(pool.map(request, range(REQUESTS)))
    assert len(errors) == REQUESTS and max(errors) <= ONNX_FP32["atol"], max(errors)
