"""``lorafx::celora_input_grad``: CE-LoRA's approximate ∂x of the frozen ``x Wᵀ`` (Double-LoRA + top-k AMM).

Stateless: choosing the kept channels ``I`` (a step-scheduled side effect) stays in the CE-LoRA
adapter (:mod:`lorafx.variants.celora`), outside the op. On CUDA with triton the gathered-K GEMM
kernel is registered.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorafx.kernels._common import MAX_KERNEL_RANK, triton_on_cuda


@torch.library.custom_op("lorafx::celora_input_grad", mutates_args=())
def celora_input_grad(G: Tensor, W: Tensor, B0: Tensor, A0: Tensor, index: Tensor) -> Tensor:
    """CE-LoRA's ∂x of the frozen ``x Wᵀ``: ``G[:, I] W[I, :] + (G B0ᶜ) A0``, ``B0ᶜ`` = ``B0`` with rows
    ``I`` zeroed, for ``G [T, d_out]``, ``W [d_out, d_in]``, ``B0 [d_out, r0]``, ``A0 [r0, d_in]``,
    ``index [k]``. Equal to the paper's ``(G B0) A0 + G[:, I]·(W − B0 A0)[I, :]`` without forming the
    residual rows: 2T·r0·(d_out+d_in) + 2T·k·d_in FLOPs instead of 2T·d_out·d_in."""
    return celora_input_grad_composite(G, W, B0, A0, index)


def celora_input_grad_composite(G: Tensor, W: Tensor, B0: Tensor, A0: Tensor, index: Tensor) -> Tensor:
    """The CPU kernel of :func:`celora_input_grad` (plain PyTorch; also the benchmarks' baseline)."""
    u = G @ B0.index_fill(0, index, 0)  # [T, r0]: the dropped channels through the rank-r0 part
    # index_select, not G[:, I]: 0.12 ms vs 0.55 ms for T=512, k=563 (1 CPU thread).
    return torch.addmm(u @ A0, torch.index_select(G, 1, index), torch.index_select(W, 0, index))


@celora_input_grad.register_fake
def _(G, W, B0, A0, index):
    return G.new_empty(G.shape[0], W.shape[1])


def register_triton() -> None:
    """Register the shrink + gathered-K GEMM launchers for CUDA (runs at import on CUDA + triton)."""
    celora_input_grad.register_kernel("cuda")(cuda_kernel)


def cuda_kernel(G: Tensor, W: Tensor, B0: Tensor, A0: Tensor, index: Tensor) -> Tensor:
    """The CUDA kernel of :func:`celora_input_grad`: the shrink + gathered GEMM launchers up to
    ``MAX_KERNEL_RANK`` (r0), the composite above (the kernels spill there)."""
    if B0.shape[1] > MAX_KERNEL_RANK:
        return celora_input_grad_composite(G, W, B0, A0, index)
    from lorafx.kernels._triton import launchers

    return launchers.celora_input_grad(G, W, B0, A0, index)


if triton_on_cuda():
    register_triton()
