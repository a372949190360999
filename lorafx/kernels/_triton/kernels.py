"""The ``@triton.jit`` kernels: a shrink kernel, then one fused GEMM + expand.

The LoRAFusion split: ``h = s·((x_in Aᵀ) ⊙ g)`` is small (``[M, R]``, fp32), so it is computed first
by :func:`shrink_kernel`; :func:`fused_kernel` then keeps ``x Wᵀ`` and ``h Bᵀ`` in one fp32
accumulator and writes the output once (bias in the epilogue). Unfused, the adapter costs a second
read-modify-write of the ``[M, N]`` output: 2·M·N·2 bytes, 128 MiB at M = 8192, N = 4096 in fp16.

Multi-adapter batches (SEGMENTED) run the same kernels over rows grouped by adapter (Punica's SGMV):
each program takes one adapter's rows (:func:`_row_block`), so the adapter products stay ``tl.dot``s
instead of per-row gathers. Both kernels share their K loop (:func:`_k_loop`), and every dot, the
expand included, goes through :func:`tensor_core_dot` onto tensor cores. Configs: :mod:`.configs`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lorafx.kernels._triton.configs import configs, prune


@triton.jit
def _row_block(pid_m, a, M, order_ptr, start_ptr, count_ptr, SEGMENTED: tl.constexpr, BLOCK_M: tl.constexpr):
    # Rows of this program and their mask: block pid_m of [0, M), or (SEGMENTED) block pid_m of adapter
    # a's segment, rows order[start[a] + ...]; every tile then holds one adapter's rows only.
    if SEGMENTED:
        local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = local < tl.load(count_ptr + a)
        rm = tl.load(order_ptr + tl.load(start_ptr + a) + local, mask=m_mask, other=0)
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
    return rm, m_mask


@triton.jit
def _k_loop(
    acc, a_ptr, b_ptr, kidx_ptr, rm, rn, m_mask, n_mask, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    GATHER_K: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # acc[rm, rn] += a[rm, :K] @ b[:K, rn]. GATHER_K: the K axis runs over kidx[0:K], columns of a and
    # rows of b picked in place (CE-LoRA's G[:, I] W[I, :] without materialising either).
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        if GATHER_K:
            kk = tl.load(kidx_ptr + kk, mask=k_mask, other=0)
        a = tl.load(
            a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak, mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        b = tl.load(
            b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=k_mask[:, None] & n_mask[None, :], other=0.0
        )
        acc = tensor_core_dot(a, b, acc, DOT_FP32)
    return acc


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # Program pid -> (row block, column block), column-major within groups of GROUP_M row blocks (the
    # last group may be shorter), so programs running together share W's column panels in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def tensor_core_dot(a, b, acc, DOT_FP32: tl.constexpr):
    # acc + a @ b on tensor cores. DOT_FP32 (fp32 or mixed operands): both upcast, then 3xTF32 (hi·hi +
    # hi·lo + lo·hi of a tf32 split): HMMA/HGMMA at ~fp32 accuracy where plain tf32 keeps 10 of fp32's
    # 23 mantissa bits and "ieee" runs on FFMA (2,048 per thread at a 128×256×16 tile, measured).
    # Otherwise b is cast to a's dtype (fp16/bf16; a no-op when they match).
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    return tl.dot(a, b.to(a.dtype), acc)


@triton.autotune(configs=configs("shrink"), key=["M", "K", "R"], prune_configs_by={"early_config_prune": prune})
@triton.jit
def shrink_kernel(
    # pointers
    x_ptr, c_ptr, g_ptr, s_ptr, order_ptr, start_ptr, count_ptr, h_ptr,
    # dims
    M, K, R,
    # strides
    stride_xm, stride_xk, stride_ca, stride_ck, stride_cr, stride_gm, stride_gr, stride_hm, stride_hr,
    # meta-parameters
    HAS_GATE: tl.constexpr, SEGMENTED: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # ---- h[M, R] = s · (x[M, K] @ c[K, R]) ⊙ g, fp32; program (m-block, adapter a), a = 0 unsegmented
    pid_m = tl.program_id(0)
    a = tl.program_id(1)
    if SEGMENTED:
        if pid_m * BLOCK_M >= tl.load(count_ptr + a):  # most programs of a short segment: nothing to do
            return
    rm, m_mask = _row_block(pid_m, a, M, order_ptr, start_ptr, count_ptr, SEGMENTED, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    r_mask = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc = _k_loop(
        acc, x_ptr, c_ptr + a * stride_ca, x_ptr, rm, rr, m_mask, r_mask, K,
        stride_xm, stride_xk, stride_ck, stride_cr,
        GATHER_K=False, DOT_FP32=DOT_FP32, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    # ---- epilogue: scale, gate, store fp32
    acc = acc * tl.load(s_ptr + a).to(tl.float32)
    out_mask = m_mask[:, None] & r_mask[None, :]
    if HAS_GATE:
        acc *= tl.load(g_ptr + rm[:, None] * stride_gm + rr[None, :] * stride_gr, mask=out_mask, other=0.0).to(
            tl.float32
        )
    tl.store(h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr, acc, mask=out_mask)


@triton.autotune(configs=configs("fused"), key=["M", "N", "K", "R"], prune_configs_by={"early_config_prune": prune})
@triton.jit
def fused_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, h_ptr, bt_ptr, order_ptr, start_ptr, count_ptr, kidx_ptr, y_ptr,
    # dims (NA: number of adapters, 1 unsegmented; segment NA holds the base-only rows)
    M, N, K, R, NA,
    # strides
    stride_xm, stride_xk, stride_wk, stride_wn, stride_hm, stride_hr,
    stride_ba, stride_br, stride_bn, stride_ym, stride_yn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_ADAPTER: tl.constexpr, SEGMENTED: tl.constexpr, DOT_FP32: tl.constexpr,
    GATHER_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # ---- tile of y[M, N] = x[M, K] @ w[K, N] + h[M, R] @ bt[R, N] + bias; program (m·n tile, adapter a)
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    a = tl.program_id(1)
    if SEGMENTED:
        if pid_m * BLOCK_M >= tl.load(count_ptr + a):
            return
    rm, m_mask = _row_block(pid_m, a, M, order_ptr, start_ptr, count_ptr, SEGMENTED, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # ---- base GEMM, fp32 accumulator
    acc = _k_loop(
        acc, x_ptr, w_ptr, kidx_ptr, rm, rn, m_mask, n_mask, K,
        stride_xm, stride_xk, stride_wk, stride_wn,
        GATHER_K=GATHER_K, DOT_FP32=DOT_FP32, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    # ---- adapter expand into the same accumulator (h already carries s and the gate)
    if HAS_ADAPTER:
        if a < NA:  # always true unsegmented (a = 0, NA = 1); false for the base-only segment
            rr = tl.arange(0, BLOCK_R)
            r_mask = rr < R
            h = tl.load(
                h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr,
                mask=m_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            bt = tl.load(
                bt_ptr + a * stride_ba + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                mask=r_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            if not DOT_FP32:  # fp16/bf16: h (fp32, already scaled) rounded to the operand dtype, as PEFT does
                h = h.to(x_ptr.dtype.element_ty)
            acc = tensor_core_dot(h, bt, acc, DOT_FP32)
    # ---- epilogue: bias, one write in the output dtype
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
