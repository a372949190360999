"""Static GPU verification of the Triton kernels, on the CPU: compiled for sm_80 and sm_90a.

Reference: ``ptxas -v`` and ``nvdisasm`` shipped in the triton wheel, and the TTGIR's dot layouts
(:mod:`benchmarks.kernels_static`). A representative subset of ``python -m benchmarks.kernels --static``
(which sweeps every specialization): for each launcher call, the largest tile its pruner keeps at the
widest rank it keeps that tile for, and the smallest tile, in one dtype each. Compiled artefacts
land in triton's cache, so a second run costs only ptxas and nvdisasm.
"""

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from benchmarks import kernels_static as ks  # noqa: E402

ARCHES = ("sm_80", "sm_90a")
SPECS = {s.name: s for s in ks.SPECS}
# (spec, dtype, R, config indices into the pruned list: 0 the smallest tile, -1 the largest)
SUBSET = [
    ("fused", "fp16", 32, (-1,)),  # 128×128×64 over 8 warps, the largest tile
    ("fused", "bf16", 64, (-1,)),
    ("fused", "bf16", 128, (0, -1)),
    ("fused", "fp32", 16, (0, -1)),  # 3xTF32 base GEMM and expand
    ("fused", "fp32", 128, (0,)),  # the fallback tile, 16×32×32, at the widest rank
    ("fused_mixed", "bf16", 32, (-1,)),
    ("fused_mixed", "fp16", 128, (-1,)),  # fp32 B loaded, then cast: the expand's widest operand
    ("fused_segmented", "fp16", 16, (-1,)),
    ("fused_celora", "bf16", 16, (-1,)),
    ("gemm_grad", "fp16", 8, (-1,)),
    ("shrink", "fp16", 128, (-1,)),
    ("shrink_gate_segmented", "fp32", 8, (-1,)),
    ("lora_4bit", "fp16", 16, (1,)),  # 64×64×64: 4 HGMMA in the K loop + 1 expand on sm_90a
    ("lora_4bit", "fp32", 128, (-1,)),  # 3xTF32 decode-GEMM and expand at the widest rank
    ("lora_4bit_elementwise", "bf16", 64, (-1,)),  # per-element scales gathered beside the tile
    ("lora_4bit_dx", "fp16", 32, (-1,)),  # the backward's transposed decode, 128×64 over 8 warps
    ("fused", "fp16", 96, (-1,)),  # a rank no multiple of 16 (no divisibility hint), widest rank block
    ("lora_4bit_dx", "fp32", 24, (-1,)),  # where the sweep found an unaligned rank spilling (pruned now)
]


@pytest.fixture(scope="module")
def rows():
    jobs = []
    for name, dtype, R, picks in SUBSET:
        jobs += ks.jobs([SPECS[name]], dtypes=(dtype,), ranks=(R,), arches=ARCHES, configs=picks)
    return ks.sweep(jobs)


def test_every_kept_config_compiles_without_spills_on_tensor_cores(rows):
    assert len(rows) == 2 * sum(len(p) for *_, p in SUBSET), "a subset entry matched no config"
    bad = [f"{r['kernel']} {r['arch']} {r['dtype']} {r['config']} R={r['R']}: {ks.problems(r)}" for r in rows]
    assert not [b for b, r in zip(bad, rows, strict=True) if ks.problems(r)], "\n".join(bad)
    for r in rows:  # the adapter expand is the fused kernel's second dot; 3xTF32 makes each dot three
        spec = SPECS[r["kernel"]]
        logical = 2 if spec.flags.get("HAS_ADAPTER") else 1
        assert r["dots"] == logical * (3 if ks.dot_fp32(spec, r["dtype"]) else 1) and r["dots_fma"] == 0, r
        assert r["mma"] > 0 and r["ffma"] < r["mma"] * 4, r  # FFMA left: epilogue scale/bias only, not a dot


def test_the_checks_catch_an_fma_dot_a_spill_and_shared_memory_overflow():
    """The same harness on what the kernels no longer do: an fp32 ``ieee`` expand dot (FFMA), and the
    128×256 tile the pruner rules out (spills on sm_80), then on a shared-memory overflow."""
    from lorafx.kernels._triton import configs

    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3)
    assert not configs.fits(big, 2, 16)
    row = ks.compile_row((SPECS["fused"], "fp16", big, 16, "sm_80"))
    assert row["spill_bytes"] > 0 and any("spills" in p for p in ks.problems(row)), row
    probe = ks.Spec("ieee", f"{__name__}:ieee_dot", {}, ranked=False)
    fma = ks.compile_row((probe, "fp32", ieee_dot.configs[0], 16, "sm_80"))
    assert fma["dots_fma"] == 1 and fma["mma"] == 0 and fma["ffma"] > 0, fma
    assert any("on FMA" in p for p in ks.problems(fma))
    assert ks.problems({**row, "spill_bytes": 0, "smem_bytes": row["smem_limit"] + 1}) == [
        f"shared memory {row['smem_limit'] + 1} B > {row['smem_limit']} B"
    ]


def test_the_tiles_the_full_sweep_saw_spill_are_pruned_and_do_spill():
    """Each entry of ``SPILLS_FROM_BLOCK_R`` (found by the full sweep, not predicted by the word counts)
    is dropped by its launcher's pruner at that rank; one of them, compiled, still spills."""
    from lorafx.kernels._triton import configs

    spec_of = {
        "mixed": ("fused_mixed", "fp16"),
        "segmented": ("fused_segmented", "fp16"),
        "gather": ("fused_celora", "bf16"),
    }
    for (mode, bm, bn, bk, warps, fp32), block_r in configs.SPILLS_FROM_BLOCK_R.items():
        name, dtype = spec_of[mode]
        dtype = "fp32" if fp32 else dtype
        tiles = {
            (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
            for c in ks.kept_configs(SPECS[name], dtype, block_r)
        }
        assert (bm, bn, bk, warps) not in tiles, (mode, bm, bn, bk, warps)
    tile = next(c for c in configs.configs("fused") if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (32, 64))
    row = ks.compile_row((SPECS["fused_celora"], "fp16", tile, 64, "sm_80"))
    assert row["spill_bytes"] > 0, row


def test_the_4bit_tiles_the_sweep_saw_spill_are_pruned():
    """Each (path, operand type, tile, rank block) of the 4-bit kernel's ``_SPILLS`` is dropped by its
    pruner at that rank block, and one of them, compiled anyway, spills (the table is not stale)."""
    from lorafx.kernels._triton import lora_4bit

    spec_of = {"forward": "lora_4bit", "elementwise": "lora_4bit_elementwise", "dx": "lora_4bit_dx"}
    checked = 0
    for (path, fp32, bm, bn), blocks in lora_4bit._SPILLS.items():
        for block_r in blocks:
            kept = ks.kept_configs(SPECS[spec_of[path]], "fp32" if fp32 else "fp16", block_r)
            assert kept and (bm, bn) not in {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept}
            checked += 1
    assert checked > 20
    tile = next(
        c for c in lora_4bit.lora_4bit_kernel.configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (64, 128)
    )
    row = ks.compile_row((SPECS["lora_4bit"], "fp16", tile, 16, "sm_80"))
    assert row["spill_bytes"] > 0, row


def test_tiles_that_spill_only_at_ranks_no_multiple_of_16_are_pruned_there():
    """The unaligned tables (found by the sweep at R = 24): each tile is dropped at a rank of its block
    that is no multiple of 16 and kept at the aligned rank of the same block, where it does not spill;
    compiled at R = 24 the 4-bit one spills on sm_80, at R = 32 it does not (the tables are not stale)."""
    from lorafx.kernels._triton import configs, lora_4bit

    cases = [
        ({"gather": "fused_celora"}[mode], "fp32" if fp32 else "fp16", (bm, bn, bk, warps), block_r)
        for (mode, bm, bn, bk, warps, fp32), block_r in configs.SPILLS_FROM_BLOCK_R_UNALIGNED.items()
    ]
    spec_of = {"forward": "lora_4bit", "dx": "lora_4bit_dx"}
    for (path, fp32, bm, bn), blocks in lora_4bit._SPILLS_UNALIGNED.items():
        cases += [(spec_of[path], "fp32" if fp32 else "fp16", (bm, bn), b) for b in blocks]
    assert len(cases) >= 3
    for name, dtype, tile, block_r in cases:

        def tiles(R, name=name, dtype=dtype, tile=tile):
            keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K")[: min(len(tile), 3)]
            return {
                (*(c.kwargs[k] for k in keys), c.num_warps)[: len(tile)] for c in ks.kept_configs(SPECS[name], dtype, R)
            }

        assert tile not in tiles(block_r - 8), (name, dtype, tile, block_r)  # R = 24: block 32, unaligned
        assert tile in tiles(block_r), (name, dtype, tile, block_r)  # R = 32: the same block, kept
    config = next(
        c for c in lora_4bit.lora_4bit_kernel.configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (32, 64)
    )
    spilled, clean = (ks.compile_row((SPECS["lora_4bit"], "fp16", config, R, "sm_80")) for R in (24, 32))
    assert spilled["spill_bytes"] > 0 and clean["spill_bytes"] == 0, (spilled, clean)


@triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=4)], key=[])
@triton.jit
def ieee_dot(x_ptr, w_ptr, y_ptr, BLOCK: tl.constexpr):
    # y = x @ w for one BLOCK × BLOCK fp32 tile, the old expand's "ieee" precision: FFMA, no MMA
    r = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r[:, None] * BLOCK + r[None, :])
    w = tl.load(w_ptr + r[:, None] * BLOCK + r[None, :])
    tl.store(y_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(x, w, input_precision="ieee"))
