"""Distributed training on CPU: DDP and FSDP2 (``fully_shard``) with gloo, 2 processes.

Each variant of ``example_configs()`` trains an adapted tiny Llama for a few AdamW steps three ways
from identical initial weights: in one process on the global batch (the reference), under DDP with
each of 2 ranks holding half the batch, and under FSDP2 with each Llama layer and the root sharded.
Both ranks compute a per-token mean loss over equally many tokens, and DDP/FSDP average the gradients,
so the distributed gradient is the global-batch gradient up to fp32 summation order; the final adapter
weights must agree to the fp32 tolerance. Rank 0 saves the DDP-trained adapter with
``lorafx.save_adapter``, and every FSDP2 rank calls it (it gathers the shards, rank 0 writes); a fresh
model loads each and must give the single-process model's logits.

Everything distributed runs in ONE ``torch.multiprocessing.spawn`` (module fixture): starting the 2
processes and importing transformers costs ~8 s on the 2-core CI machine, the training itself < 1 s
per variant.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tolerances import assert_close
from variant_cases import example_configs

import lorafx
from lorafx.cli.models import tiny_llama

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 4  # sequences; 2 per rank
SEQ = 8
VOCAB = 64


def build(config) -> torch.nn.Module:
    """The same adapted 1-layer tiny Llama in every process (seeded base weights and adapter init)."""
    model = tiny_llama(seed=0, hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=VOCAB)
    torch.manual_seed(1)
    return lorafx.apply(model, lorafx.Spec(config, targets="all-linear"))


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def deterministic_train_mode(model: torch.nn.Module) -> bool:
    """Train mode unless the variant draws random masks in training (DropLoRA): the single process
    and each rank draw different masks for different batch shapes, so no comparison would hold."""
    ids = batches()[0]
    model.train()
    with torch.no_grad():
        same = torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    return same


def train(model: torch.nn.Module, inner: torch.nn.Module, rank: int, world: int, train_mode: bool) -> None:
    """AdamW on the trainable parameters; ``rank``/``world`` pick this process's slice of each batch."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train(train_mode)
    torch.manual_seed(3)  # same random stream everywhere (CE-LoRA's column choice, if any)
    per = GLOBAL_BATCH // world
    for ids in batches():
        mine = ids[rank * per : (rank + 1) * per]
        loss = model(input_ids=mine, labels=mine).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lorafx.step(inner)
    model.eval()


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, gathered to full tensors (FSDP2 holds DTensor shards)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = t.detach().clone()
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    try:
        for name, config in example_configs().items():
            model = build(config)
            mode = deterministic_train_mode(model)
            ddp = DDP(model)
            train(ddp, model, rank, WORLD, mode)
            if rank == 0:
                torch.save(adapter_state(model), Path(out_dir) / f"ddp_{name}.pt")
                lorafx.save_adapter(model, Path(out_dir) / f"ddp_saved_{name}")
            model = build(config)
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            train(model, model, rank, WORLD, mode)
            state = adapter_state(model)  # collective: every rank gathers
            if rank == 0:
                torch.save(state, Path(out_dir) / f"fsdp_{name}.pt")
            lorafx.save_adapter(model, Path(out_dir) / f"fsdp_saved_{name}")  # every rank; rank 0 writes
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without C++ static destructors: a gloo background thread still joinable at interpreter
    # exit aborted rank 1 ("terminate called without an active exception", SIGABRT) in 1 of 6 full
    # suite runs, after every result had been written. An exception above still fails the run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@functools.cache
def reference(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The single-process run (cached: 4 tests per variant read it, none changes it)."""
    model = build(example_configs()[name])
    train(model, model, 0, 1, deterministic_train_mode(model))
    return model, adapter_state(model)


VARIANTS = list(example_configs())


# Variants whose training is not a function of the global batch alone, with the reason (strict xfail:
# the entry must go when the variant is fixed).
NOT_BATCH_INVARIANT = {
    # Empty: CE-LoRA, which picks kept output channels in lorafx.step from the ‖G[:, i]‖² its backward
    # stored, all-reduces those across ranks first (celora._select) so every rank ranks on the global
    # batch. Without that, ranks
    # kept different channels: max |Δ lora_A| 1.6e-3 after 4 steps vs one process.
}
PARITY = [
    pytest.param(n, marks=pytest.mark.xfail(reason=NOT_BATCH_INVARIANT[n], strict=True))
    if n in NOT_BATCH_INVARIANT
    else n
    for n in VARIANTS
]


@pytest.mark.parametrize("name", PARITY)
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_distributed_matches_single_process(distributed_run, name, engine):
    _, expected = reference(name)
    got = torch.load(distributed_run / f"{engine}_{name}.pt")
    assert set(got) == set(expected) and expected
    start = adapter_state(build(example_configs()[name]))
    for key, value in expected.items():
        assert not torch.equal(value, start[key]), f"{key} did not train"  # the comparison is not vacuous
        assert_close(got[key], value, msg=lambda m, k=key: f"{engine} {name} {k}: {m}")


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_adapter_saved_from_distributed_run_loads_in_fresh_model(distributed_run, name, engine):
    """Rank 0 saved the DDP adapter, every rank called save for FSDP2: the file holds the trained weights."""
    trained = torch.load(distributed_run / f"{engine}_{name}.pt")
    fresh = tiny_llama(seed=0, hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, vocab=VOCAB)
    fresh = lorafx.load_adapter(fresh, distributed_run / f"{engine}_saved_{name}")
    loaded = adapter_state(fresh)
    assert set(loaded) == set(trained)
    for key, value in trained.items():
        assert torch.equal(loaded[key], value), key
    if name not in NOT_BATCH_INVARIANT:  # and it is the single-process model
        ids = batches()[0]
        with torch.no_grad():
            assert_close(fresh(ids).logits, reference(name)[0](ids).logits)
