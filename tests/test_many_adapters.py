"""Serving many adapters eagerly: 128 named adapters on one model, switching, and threads.

Each adapter ``aK`` is built from seed ``K``; its reference is a fresh base model with only that
adapter (same seed), so every check compares against an independent single-adapter model.

``set_adapter`` is per-model state (like PEFT's ``set_adapter``): one model serves one adapter at a
time. Concurrent requests for different adapters therefore serialise ``set_adapter`` + forward
under one lock — a user's own, or ``lorafx.using_adapter`` (tested below); requests for the same
adapter may run concurrently without a lock.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from tolerances import assert_close

import lorafx
from lorafx.cli.models import tiny_llama

N = 128
TARGETS = ["q_proj", "v_proj"]
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def base():
    return tiny_llama(seed=0, hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=64)


def add(model, k: int):
    torch.manual_seed(1000 + k)
    spec = lorafx.Spec(lorafx.LoRA(r=1 + k % 4, alpha=4, init="random"), targets=TARGETS)
    return lorafx.apply(model, spec, name=f"a{k}")


@torch.no_grad()
def single(k: int) -> torch.Tensor:
    return add(base(), k)(IDS).logits


@pytest.fixture(scope="module")
def served():
    """(model with N adapters, {name: logits} computed by switching in order)."""
    model = base()
    for k in range(N):
        model = add(model, k)
    outputs = {}
    with torch.no_grad():
        for name in lorafx.adapter_names(model):
            lorafx.set_adapter(model, name)
            outputs[name] = model(IDS).logits
    return model, outputs


def test_each_adapter_matches_its_own_single_adapter_model(served):
    model, outputs = served
    assert lorafx.adapter_names(model) == [f"a{k}" for k in range(N)]
    for k in (0, 1, 37, 64, 99, N - 1):
        assert_close(outputs[f"a{k}"], single(k))
    # all N outputs differ from each other: no two adapters collapsed onto the same weights
    flat = torch.stack([o.flatten() for o in outputs.values()])
    assert torch.cdist(flat, flat).add(torch.eye(N) * 1e9).min() > 1e-4


def test_switching_in_any_order_is_stateless(served):
    model, outputs = served
    order = list(outputs)
    random.Random(0).shuffle(order)
    with torch.no_grad():
        for name in order:
            lorafx.set_adapter(model, name)
            assert torch.equal(model(IDS).logits, outputs[name]), name


def test_only_the_active_adapter_trains(served):
    model, _ = served
    lorafx.set_adapter(model, "a5")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a5." in n for n in trainable)
    assert len(trainable) == 2 * len(TARGETS)  # lora_A, lora_B per site


def cross_talk(outputs: dict, serve) -> list[str]:
    """4 threads x 12 requests for random adapters through ``serve(name) -> logits``; the names whose
    logits differ from that adapter's own."""
    errors = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(12):
            name = f"a{rng.randrange(N)}"
            if not torch.equal(serve(name), outputs[name]):
                errors.append(name)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_with_a_lock_get_their_own_adapter(served):
    model, outputs = served
    lock = threading.Lock()

    def serve(name):
        with lock, torch.no_grad():
            lorafx.set_adapter(model, name)
            return model(IDS).logits

    assert not cross_talk(outputs, serve)


def test_using_adapter_serves_threads_and_restores(served):
    model, outputs = served
    lorafx.set_adapter(model, "a3")

    def serve(name):
        with lorafx.using_adapter(model, name), torch.no_grad():
            return model(IDS).logits

    assert not cross_talk(outputs, serve)
    assert lorafx.active_adapter(model) == "a3"
    with lorafx.using_adapter(model, "a9"), lorafx.using_adapter(model, None):  # re-entrant, nested
        assert lorafx.active_adapter(model) is None
    assert lorafx.active_adapter(model) == "a3"
    with pytest.raises(lorafx.SpecError, match="no adapter named 'zz'"), lorafx.using_adapter(model, "zz"):
        pass
    assert lorafx.active_adapter(model) == "a3"


def test_threads_sharing_one_adapter_need_no_lock(served):
    model, _ = served
    lorafx.set_adapter(model, "a7")
    inputs = [torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(s)) for s in range(8)]
    with torch.no_grad():
        expected = [model(x).logits for x in inputs]
    results = [None] * len(inputs)

    def client(i: int) -> None:
        with torch.no_grad():
            results[i] = model(inputs[i]).logits

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected, strict=True):
        assert torch.equal(got, want)


def test_delete_half_then_rest_still_correct(served):
    model, outputs = served
    for k in range(0, N, 2):
        lorafx.delete_adapter(model, f"a{k}")
    assert len(lorafx.adapter_names(model)) == N // 2
    with torch.no_grad():
        for k in (1, 63, N - 1):
            lorafx.set_adapter(model, f"a{k}")
            assert torch.equal(model(IDS).logits, outputs[f"a{k}"])
        lorafx.set_adapter(model, None)
        assert_close(model(IDS).logits, base()(IDS).logits)
