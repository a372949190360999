"""The fused 4-bit kernel compiled for NVIDIA GPUs without one: AOT ``triton.compile`` for sm_80 and
sm_90a, then the ``ptxas -v`` and ``nvdisasm`` shipped in the triton wheel. Checks: no register spills
(ptxas ``0 bytes spill stores``, no local loads/stores in the SASS) and every ``tl.dot`` on tensor
cores (HMMA on sm_80; HGMMA, or HMMA for tiles under 64 rows, on sm_90a), none on CUDA cores (the
decode multiplies with FMUL; a dot on CUDA cores would show up as hundreds of FFMA per thread).

One representative config runs by default (~7 s of CPU); every autotune config x target x path is
``slow`` (8 compiles per target, 30 s to 2 min each on this shared 2-core machine).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
STRIDES = ["stride_xm", "stride_xk", "stride_hm", "stride_hr", "stride_br", "stride_bn", "stride_ym", "stride_yn"]


def compile_4bit(arch: int, dtype: str, tile: tuple, nested: bool, aligned: bool, tmp: Path, trans=False) -> dict:
    """Compile ``lora_4bit_kernel`` for ``sm_<arch>`` (90: sm_90a) and read its resources; ``trans``:
    the backward's ``dy·dequant(Wq)`` form."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lorafx.kernels._triton.lora_4bit import lora_4bit_kernel

    bm, bn, bk, warps, stages = tile
    sig = {
        "x_ptr": f"*{dtype}",
        "q_ptr": "*u8",
        "absmax_ptr": "*u8" if nested else "*fp32",
        **dict.fromkeys(["code_ptr", "absmax2_ptr", "code2_ptr", "offset_ptr"], "*fp32"),
        "bias_ptr": f"*{dtype}",
        **dict.fromkeys(["h_ptr", "bt_ptr"], "*fp32"),
        "y_ptr": f"*{dtype}",
        **dict.fromkeys(["M", "N", "K", "R", "KW"], "i32"),
        **dict.fromkeys(STRIDES, "i32"),
    }
    meta = dict(BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=nested, ALIGNED=aligned, TRANS=trans)
    meta.update(HAS_BIAS=not trans, HAS_ADAPTER=True)
    meta.update(DOT_FP32=False, BLOCK_R=16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    sig.update(dict.fromkeys(meta, "constexpr"))
    src = ASTSource(lora_4bit_kernel.fn, sig, meta)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx, cubin = tmp / "k.ptx", tmp / "k.cubin"
    ptx.write_text(kernel.asm["ptx"])
    cubin.write_bytes(kernel.asm["cubin"])
    sm = "sm_90a" if arch == 90 else f"sm_{arch}"
    cmd = [str(BIN / "ptxas"), "-v", f"-arch={sm}", str(ptx), "-o", str(tmp / "k.o")]
    ptxas = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    sass = subprocess.run([str(BIN / "nvdisasm"), str(cubin)], capture_output=True, text=True, check=True).stdout
    count = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HMMA", "HGMMA", "FFMA", "LDL", "STL")}
    return dict(
        registers=int(re.search(r"Used (\d+) registers", ptxas).group(1)),
        spill_stores=int(re.search(r"(\d+) bytes spill stores", ptxas).group(1)),
        spill_loads=int(re.search(r"(\d+) bytes spill loads", ptxas).group(1)),
        shared=kernel.metadata.shared,
        **count,
    )


def assert_tensor_cores_no_spills(res: dict, arch: int) -> None:
    assert res["spill_stores"] == res["spill_loads"] == 0 and res["LDL"] == res["STL"] == 0, res
    assert res["HGMMA"] + res["HMMA"] > 0, res  # the dots run on tensor cores
    if arch == 80:
        assert res["HGMMA"] == 0, res
    # No dot lowered to CUDA-core FMAs: a 64 x 64 x 16 step alone would be 512 per thread. The FFMAs
    # present are the double-quant scales, code2·absmax2 + offset, one per scale a thread holds (1 in
    # the forward, 16-32 in the backward's TRANS tiles, where each thread holds a column of scales).
    assert res["FFMA"] <= 64, res


@pytest.fixture(autouse=True)
def _no_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("AOT compilation needs the compiler, not the interpreter")


def test_4bit_kernel_compiles_for_sm90a_on_tensor_cores_without_spills(tmp_path):
    """The representative config: fp16, double-quantized NF4 scales, K a multiple of the quant block,
    64 x 64 x 64 tiles, 4 warps, 3 stages (measured: 200 registers, 0 spills, 5 HGMMA: 4 in the K
    loop, 1 for the adapter expand; sm_80 in the slow test: 255 registers, 0 spills, 40 HMMA)."""
    res = compile_4bit(90, "fp16", (64, 64, 64, 4, 3), nested=True, aligned=True, tmp=tmp_path)
    assert_tensor_cores_no_spills(res, 90)
    assert res["HGMMA"] > 0, res  # sm_90a: warpgroup MMA for a 64-row tile


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_autotune_config_compiles_without_spills(arch, tmp_path):
    """Every GPU autotune config of the kernel in fp16, on both paths the launcher can pick (the
    unaligned path only with the configs ``_prune`` keeps), and the largest tile in bf16 (measured:
    the same registers and MMA counts as fp16), then the backward's transposed decode (``TRANS``) for
    every config ``_prune`` keeps for it. 12 compiles per target, 30 s to 2 min each on this machine."""
    from lorafx.kernels._triton import lora_4bit

    configs = _gpu_configs(lora_4bit)
    kept_unaligned = lora_4bit._prune(configs, {}, ALIGNED=False)
    runs = []
    for cfg in configs:
        k = cfg.kwargs
        tile = (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], cfg.num_warps, cfg.num_stages)
        runs.append(("fp16", tile, True, True))
        if cfg in kept_unaligned:
            runs.append(("fp16", tile, False, False))
    runs.append(("bf16", (64, 128, 64, 4, 3), True, True))
    for dtype, tile, nested, aligned in runs:
        res = compile_4bit(arch, dtype, tile, nested, aligned, tmp_path)
        print(arch, dtype, tile, nested, aligned, res)
        assert_tensor_cores_no_spills(res, arch)
    for cfg in lora_4bit._prune(configs, {}, ALIGNED=True, TRANS=True):  # the backward's ∂x
        k = cfg.kwargs
        tile = (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], cfg.num_warps, cfg.num_stages)
        res = compile_4bit(arch, "fp16", tile, True, True, tmp_path, trans=True)
        print(arch, "fp16 trans", tile, res)
        assert_tensor_cores_no_spills(res, arch)


def _gpu_configs(module) -> list:
    # the module's config list as on a GPU machine (the interpreter, if set, would give one tiny config)
    saved = module._INTERPRET
    module._INTERPRET = False
    try:
        return module._configs()
    finally:
        module._INTERPRET = saved
