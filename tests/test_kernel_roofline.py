"""The H100/H200 roofline of benchmarks/kernels.py against hand-computed times.

Reference: the roofline formula written out here (time = max(FLOPs / peak, bytes / bandwidth) per
kernel) with the datasheet constants; the benchmark prints these predictions beside its GPU timings.
"""

import pytest

from benchmarks import kernels


def test_roofline_constants_are_the_datasheet_values():
    assert kernels.GPUS["H100"] == {"flops": 989.4e12, "bandwidth": 3.35e12}
    assert kernels.GPUS["H200"] == {"flops": 989.4e12, "bandwidth": 4.8e12}


def test_large_m_is_compute_bound_and_small_m_reads_w():
    M, K, N, r = 8192, 4096, 4096, 16
    t = kernels.roofline(M, K, N, r, "H100")
    assert t["base"] == pytest.approx(2 * M * N * K / 989.4e12)  # 278 µs of tensor-core FLOPs
    # fused: one GEMM with K + r, plus a shrink that reads x again (memory bound: 64 MiB of fp16 x)
    shrink = (2 * (M * K + r * K) + 4 * M * r) / 3.35e12
    assert t["fused"] == pytest.approx(2 * M * N * (K + r) / 989.4e12 + shrink)
    assert t["base"] < t["fused"] < t["unfused"]
    small = kernels.roofline(16, K, N, r, "H200")
    w_bytes = 2 * (16 * K + K * N) + 2 * 16 * N
    assert small["base"] == pytest.approx(w_bytes / 4.8e12)  # 7 µs: W's 32 MiB over HBM3e
    assert small["fused"] / small["base"] < 1.02  # A, B and h are ~0.4% of W's bytes
