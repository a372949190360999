"""Static GPU verification on a CPU: compile each Triton kernel specialization for NVIDIA targets and
read what the GPU would run.

For every specialization (kernel × flags × dtype × autotune config kept by the kernel's
``prune_configs_by`` × rank R × arch), :func:`compile_row` runs ``triton.compile`` ahead of time for
``GPUTarget("cuda", cap, 32)`` (no driver, no device), then reads

* ``ptxas -v`` (the bundled ptxas, triton's own flags): registers, spill store/load bytes;
* the compiled metadata: shared memory bytes, checked against the arch's per-block limit;
* the TTGIR: every dot op and whether its result has a tensor-core (``#mma``) layout, so a dot that
  fell back to FMA (e.g. an ``ieee`` fp32 expand) is named even when another dot uses HMMA;
* ``nvdisasm``: HMMA/HGMMA (tensor-core) and FFMA instruction counts.

``python -m benchmarks.kernels --static`` sweeps :data:`SPECS` and writes
``benchmarks/results/kernels_static.{json,md}``; ``tests/test_kernels_static.py`` checks a subset.

To verify one more kernel, append a :class:`Spec` to :data:`SPECS` (or pass your own list to
:func:`sweep`): the autotuned kernel, its pointer dtypes, its constexpr flags, the stride arguments the
launcher passes as 1, and whether it has a rank (``BLOCK_R``). Its ``@triton.autotune`` configs (after
its ``early_config_prune``, if any) are swept. DOT_FP32 and BLOCK_R are filled in (when the kernel
has them) from the first two pointer types and R, unless ``flags`` sets them.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("fp16", "bf16", "fp32")
RANKS = (8, 16, 24, 32, 48, 64, 96, 128)  # every BLOCK_R (16-128), with R % 16 == 0 and without
# name -> (compute capability, shared memory per block in bytes: A100 163 KiB, H100/B200 227 KiB,
# from NVIDIA's CUDA C programming guide, "Technical Specifications per Compute Capability").
ARCHES = {"sm_80": (80, 166_912), "sm_90a": (90, 232_448), "sm_100a": (100, 232_448)}
_MMA = re.compile(r"^(HMMA|HGMMA|UTCHMMA|UTCQMMA|UTCMMA|UTCOMMA|IMMA)")
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
# Dot ops of the TTGIR: tt.dot (mma.sync on sm_80, or FMA when its result layout is #blocked),
# warp_group_dot (wgmma, sm_90a), tc_gen5_mma (tcgen05, sm_100a: no result, the accumulator lives in
# tensor memory; the pipeliner peels the K loop's first one, so sm_100a rows count one dot more).
_DOT = re.compile(r"(?:= |^\s*)(tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma)\b(.*)$")


@dataclass(frozen=True)
class Spec:
    """One kernel specialization family. ``pointers(dtype)`` gives the triton type of each pointer
    argument that differs from ``*{dtype}``; ``flags`` the constexpr flags; ``unit_strides`` the stride
    arguments equal to 1 in the launcher's call (the JIT specializes those to constants)."""

    name: str
    kernel: str  # attribute of :mod:`lorafx.kernels._triton.kernels` (or "module:attr")
    flags: dict
    pointers: dict = field(default_factory=dict)  # arg -> triton type, "{dt}" is the dtype
    unit_strides: tuple = ()
    ranked: bool = True
    dtypes: tuple = DTYPES
    # the two pointers whose types decide DOT_FP32 as the launcher does (default: the first two arguments)
    dot_operands: tuple | None = None

    def resolve(self):
        import importlib

        module, _, attr = self.kernel.rpartition(":")
        return getattr(importlib.import_module(module or "lorafx.kernels._triton.kernels"), attr)


_I64 = {"order_ptr": "*i64", "start_ptr": "*i64", "count_ptr": "*i64", "kidx_ptr": "*i64"}
_FUSED_UNIT = ("stride_xk", "stride_wk", "stride_hr", "stride_br", "stride_yn")  # x2, W.t(), h, B.t(), y
_FUSED = dict(HAS_BIAS=True, HAS_ADAPTER=True, SEGMENTED=False, GATHER_K=False)
_SHRINK = dict(HAS_GATE=False, SEGMENTED=False)
# The 4-bit kernel decodes bitsandbytes' packed weight (uint8 codes, uint8 double-quantized scales, fp32
# tables) to x's dtype: its DOT_FP32 follows x alone; bitsandbytes' default blocks are 64 and 256.
_4BIT = "lorafx.kernels._triton.lora_4bit:lora_4bit_kernel"
_Q4 = dict(BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=False, ALIGNED=True, TRANS=False, HAS_BIAS=True, HAS_ADAPTER=True)
_Q4_PTRS = {"q_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "absmax2_ptr": "*fp32", "code2_ptr": "*fp32",
            "offset_ptr": "*fp32", "h_ptr": "*fp32", "bt_ptr": "*fp32"}  # fmt: skip
# The launchers' calls (lorafx/kernels/_triton/launchers.py), one Spec per distinct specialization.
SPECS = [
    Spec("fused", "fused_kernel", _FUSED, {**_I64, "h_ptr": "*fp32"}, _FUSED_UNIT),
    Spec("fused_mixed", "fused_kernel", _FUSED, {**_I64, "h_ptr": "*fp32", "bt_ptr": "*fp32"}, _FUSED_UNIT,
         dtypes=("fp16", "bf16")),  # fp32 adapters on a half model (autocast training)
    Spec("fused_segmented", "fused_kernel", {**_FUSED, "SEGMENTED": True}, {**_I64, "h_ptr": "*fp32"},
         ("stride_xk", "stride_wk", "stride_hr", "stride_bn", "stride_yn")),  # B[n].transpose(1, 2)
    Spec("fused_celora", "fused_kernel", {**_FUSED, "HAS_BIAS": False, "GATHER_K": True},
         {**_I64, "h_ptr": "*fp32"}, ("stride_xk", "stride_wn", "stride_hr", "stride_bn", "stride_yn")),
    Spec("gemm_grad", "fused_kernel", {**_FUSED, "HAS_BIAS": False, "HAS_ADAPTER": False},
         {**_I64, "x_ptr": "*fp32"}, ("stride_xm", "stride_wn", "stride_yn"), ranked=False),  # dA = dhᵀ x_in
    Spec("shrink", "shrink_kernel", _SHRINK, {**_I64, "c_ptr": "*fp32", "g_ptr": "*fp32", "h_ptr": "*fp32",
         "s_ptr": "*fp32"}, ("stride_xk", "stride_ck", "stride_hr")),  # A.t(): [K, R] with stride (1, K)
    Spec("shrink_gate_segmented", "shrink_kernel", {"HAS_GATE": True, "SEGMENTED": True},
         {**_I64, "g_ptr": "*fp32", "h_ptr": "*fp32", "s_ptr": "*fp32"}, ("stride_xk", "stride_ck", "stride_hr")),
    # lorafx/kernels/lora_linear_4bit.py: forward (bt = B.t()), the same on a K that is no multiple of
    # the quant block (per-element scales, no double quant), and the backward's dX (TRANS, bt = A)
    Spec("lora_4bit", _4BIT, {**_Q4, "NESTED": True}, _Q4_PTRS, ("stride_xk", "stride_hr", "stride_br", "stride_yn"),
         dot_operands=("x_ptr", "x_ptr")),
    Spec("lora_4bit_elementwise", _4BIT, {**_Q4, "ALIGNED": False}, {**_Q4_PTRS, "absmax_ptr": "*fp32"},
         ("stride_xk", "stride_hr", "stride_br", "stride_yn"), dot_operands=("x_ptr", "x_ptr")),
    Spec("lora_4bit_dx", _4BIT, {**_Q4, "NESTED": True, "TRANS": True, "HAS_BIAS": False}, _Q4_PTRS,
         ("stride_xk", "stride_hr", "stride_bn", "stride_yn"), dot_operands=("x_ptr", "x_ptr")),
]  # fmt: skip


def _types(spec: Spec, dtype: str) -> dict:
    return {k: v.format(dt=dtype) for k, v in spec.pointers.items()}


def dot_fp32(spec: Spec, dtype: str) -> bool:
    """The launchers' DOT_FP32 for this specialization: the two GEMM operands not one half type."""
    first, second = spec.dot_operands or spec.resolve().fn.arg_names[:2]  # x and w (fused), x and c (shrink)
    types = {**{n: f"*{dtype}" for n in (first, second)}, **_types(spec, dtype)}
    return types[first] == "*fp32" or types[first] != types[second]


def kept_configs(spec: Spec, dtype: str, R: int) -> list:
    """The spec's autotune configs that its ``early_config_prune`` keeps for this launch."""
    import torch

    kernel = spec.resolve()
    flags = {"DOT_FP32": dot_fp32(spec, dtype), "BLOCK_R": _block_r(R), **spec.flags}
    torch_dtype = {
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
        "fp32": torch.float32,
        "i64": torch.int64,
        "u8": torch.uint8,
    }
    types = _types(spec, dtype)
    named = {n: torch.empty(0, dtype=torch_dtype[types.get(n, f"*{dtype}")[1:]]) for n in kernel.fn.arg_names}
    named = {**{n: t for n, t in named.items() if n.endswith("_ptr")}, "R": R}  # R: its 16-alignment prunes too
    prune = getattr(kernel, "early_config_prune", None)
    return prune(kernel.configs, named, **flags) if prune else list(kernel.configs)


def _block_r(R: int) -> int:
    return max(16, 1 << (R - 1).bit_length())


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_row(job: tuple) -> dict:
    """One table row: ``job = (spec, dtype, triton.Config, R, arch)``."""
    import triton
    from triton.backends.compiler import GPUTarget

    spec, dtype, config, R, arch = job
    cap, smem_limit = ARCHES[arch]
    fn = spec.resolve().fn
    constexprs = {"DOT_FP32": dot_fp32(spec, dtype), "BLOCK_R": _block_r(R), **spec.flags, **config.kwargs}
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name in spec.unit_strides:
            signature[name] = "constexpr"
            constexprs.setdefault(name, 1)
            continue
        signature[name] = _types(spec, dtype).get(name, f"*{dtype}") if name.endswith("_ptr") else "i32"
        rank_sized = name in ("R", "stride_hm", "stride_bn", "stride_br", "stride_cr", "stride_ck")
        if not rank_sized or R % 16 == 0:  # pointers and the model's dims are 16-aligned; ranks may not be
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    tile = "×".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in config.kwargs)
    row = {"kernel": spec.name, "arch": arch, "dtype": dtype, "R": R if spec.ranked else None, "smem_limit": smem_limit}
    row["config"] = f"{tile} w{config.num_warps} s{config.num_stages}"
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)
    except Exception as e:  # a config the target cannot build is a row with its error, not a crashed sweep
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    regs, spill_st, spill_ld = _ptxas(compiled.asm["ptx"], arch)
    ops = _opcodes(compiled.asm["cubin"])
    dots = [m.group(2) for m in map(_DOT.search, compiled.asm["ttgir"].splitlines()) if m]
    return {
        **row, "registers": regs, "spill_bytes": spill_st + spill_ld, "smem_bytes": compiled.metadata.shared,
        "smem_limit": smem_limit, "dots": len(dots), "dots_fma": sum("#blocked" in d.split("->")[-1] for d in dots),
        "mma": sum(n for op, n in ops.items() if _MMA.match(op)), "ffma": ops.get("FFMA", 0),
    }  # fmt: skip


def _ptxas(ptx: str, arch: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` with triton's flags."""
    tool = _tool("ptxas-blackwell" if ARCHES[arch][0] >= 100 else "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [tool, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src), "-o", f"{d}/k.o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(spills.group(1)), int(spills.group(2))


def _opcodes(cubin: bytes) -> Counter:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("nvdisasm"), f.name], capture_output=True, text=True, check=True).stdout
    return Counter(m.group(1).split(".")[0] for m in map(_OPCODE.search, sass.splitlines()) if m)


def jobs(specs=None, dtypes=DTYPES, ranks=RANKS, arches=("sm_80", "sm_90a"), configs=None) -> list[tuple]:
    """Every (spec, dtype, config, R, arch) to compile, for the configs each spec's pruner keeps;
    ``configs`` (indices into those) narrows them."""
    out = []
    for spec in specs or SPECS:
        for dtype in (d for d in dtypes if d in spec.dtypes):
            for R in ranks if spec.ranked else ranks[:1]:
                kept = kept_configs(spec, dtype, R)
                picked = kept if configs is None else [kept[i] for i in sorted({i % len(kept) for i in configs})]
                out += [(spec, dtype, c, R, a) for c in picked for a in arches]
    return out


def quick_jobs(arches=("sm_80", "sm_90a")) -> list[tuple]:
    """The fused forward kernel in full; every other spec at R = 16 and 128, smallest and largest tile."""
    out = jobs([SPECS[0]], arches=arches)
    for spec in SPECS[1:]:
        out += [j for j in jobs([spec], ranks=(16, 128), arches=arches, configs=(0, -1)) if j not in out]
    return out


def sweep(job_list: list[tuple], workers: int | None = None, progress: bool = False) -> list[dict]:
    """Compile every job (in ``workers`` processes) and return the rows in job order."""
    workers = workers or min(4, os.cpu_count() or 1)
    rows = []
    with ProcessPoolExecutor(workers) as pool:
        for i, row in enumerate(pool.map(compile_row, job_list, chunksize=1)):
            rows.append(row)
            if progress and (i + 1) % 20 == 0:
                print(f"  {i + 1}/{len(job_list)} compiled", flush=True)
    return rows


def problems(row: dict) -> list[str]:
    """What is wrong with one row: spills, shared memory over the limit, a dot off the tensor cores."""
    if "error" in row:
        return [row["error"]]
    out = []
    if row["spill_bytes"]:
        out.append(f"spills {row['spill_bytes']} B")
    if row["smem_bytes"] > row["smem_limit"]:
        out.append(f"shared memory {row['smem_bytes']} B > {row['smem_limit']} B")
    if row["dots_fma"] or not row["mma"]:
        out.append(f"{row['dots_fma']} of {row['dots']} dots on FMA, {row['mma']} MMA instructions")
    return out


def markdown(rows: list[dict]) -> str:
    cols = ["kernel", "arch", "dtype", "config", "R", "registers", "spill_bytes", "smem_bytes", "mma", "ffma"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * 4 + "|---:" * 6 + "|"]
    for r in rows:
        lines.append("| " + " | ".join("–" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict], results: Path) -> list[str]:
    """Write ``kernels_static.{json,md}`` under ``results``; return the problem lines (empty: all pass)."""
    import json

    bad = [
        f"{r['kernel']} {r['arch']} {r['dtype']} {r['config']} R={r['R']}: {'; '.join(p)}"
        for r in rows
        if (p := problems(r))
    ]
    results.mkdir(exist_ok=True)
    (results / "kernels_static.json").write_text(json.dumps({"rows": rows, "problems": bad}, indent=1) + "\n")
    arches = sorted({r["arch"] for r in rows})
    head = (
        f"{len(rows)} specializations compiled for {', '.join(arches)} (`python -m benchmarks.kernels --static`); "
        f"{len(bad)} with spills, shared memory over the limit or a dot off the tensor cores.\n\n"
    )
    (results / "kernels_static.md").write_text(head + markdown(rows) + "\n")
    (results / "kernels_static_summary.md").write_text(head + summary(rows) + "\n")
    return bad


def _span(rows: list[dict], key: str) -> str:
    return f"{min(r[key] for r in rows)}–{max(r[key] for r in rows)}" if rows else "–"


def summary(rows: list[dict]) -> str:
    """One line per kernel × arch × dtype: how many specializations, the register range, the worst
    spill and shared memory, dots on tensor cores, and the MMA / FFMA instruction ranges."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"], r["dtype"]), []).append(r)
    lines = [
        "| kernel | arch | dtype | specializations | registers | max spill (B) | max smem (B) / limit "
        "| dots on MMA | MMA instr. | FFMA instr. |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (kernel, arch, dtype), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        dots = f"{sum(r['dots'] - r['dots_fma'] for r in ok)} / {sum(r['dots'] for r in ok)}"
        worst = max((r["spill_bytes"] for r in ok), default=0), max((r["smem_bytes"] for r in ok), default=0)
        lines.append(
            f"| {kernel} | {arch} | {dtype} | {len(rs)}{f' ({len(rs) - len(ok)} failed)' if len(ok) < len(rs) else ''} "
            f"| {_span(ok, 'registers')} | {worst[0]} | {worst[1]} / {rs[0]['smem_limit']} | {dots} "
            f"| {_span(ok, 'mma')} | {_span(ok, 'ffma')} |"
        )
    return "\n".join(lines)
