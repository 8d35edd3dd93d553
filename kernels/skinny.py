"""The skinny product of the LoRA path: [M, K] x [K, rank] with a runtime rank.

Memory bound (it reads the [M, K] operand once), so it is computed once per
layer call instead of once per output tile of the GEMM.
"""

import torch
import triton
import triton.language as tl

from .configs import down_configs, limit_tile_per_thread, rank_block
from .dropout import drop_threshold, keep_mask


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: tf32 for fp32 inputs only where torch allows it, as torch's own matmul."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@triton.autotune(configs=down_configs(), key=["M", "K", "BLOCK_R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": limit_tile_per_thread("BLOCK_M", "BLOCK_K")})
@triton.jit(do_not_specialize=["rank", "seed", "stride_sm"])
def _skinny_product_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr,
    # sizes and scalars
    M, K, rank, seed, threshold, out_scale,
    # strides
    stride_xm, stride_xk, stride_ak, stride_ar, stride_sm, stride_sr,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S[m, j] = out_scale * sum_k D(X)[m, k] A[k, j] for j < rank: a skinny [M, rank] product.

    X: [M, K], A: [K, R] (R >= rank, any strides), S: [M, rank]. D(X) = X * keep / (1 - p)
    with HAS_DROPOUT, else X. It serves the forward's S = s D(X) A_r (out_scale =
    s / (1 - p)) and the backward's dS = s dY B_r^T (X = dY, A = B^T through its
    strides, no dropout). Grid: (cdiv(M, BLOCK_M), cdiv(rank, BLOCK_R)).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    rank_ok = ranks < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(seed, rows, k0, K, threshold, BLOCK_K), x, 0.0)
        # Adapters may be fp32 while X is bf16 (autocast): compute in X's dtype.
        a = tl.load(a_ptr + cols[:, None] * stride_ak + ranks[None, :] * stride_ar,
                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0).to(x.dtype)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
    # The scales go once on the accumulator instead of on every element.
    acc = acc * out_scale
    tl.store(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
             acc.to(s_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


def skinny_product(x, a, rank, out_scale, dropout_p=0.0, seed=0):
    """out_scale * D(x) a[:, :rank] -> [M, rank] in x's dtype. x: [M, K]; a: [K, >= rank], any strides."""
    M, K = x.shape
    out = torch.empty((M, rank), dtype=x.dtype, device=x.device)
    block_r = rank_block(rank)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(rank, block_r))

    _skinny_product_kernel[grid](
        x, a, out,
        M, K, rank, seed, drop_threshold(dropout_p), out_scale,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        HAS_DROPOUT=dropout_p > 0.0, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r,
    )
    return out
