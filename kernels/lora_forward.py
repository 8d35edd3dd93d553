"""Forward of the fused LoRA layer: Y = X W + b + s * D(X) A[:, :r] B[:r, :].

Two launches, so that the down-projection is computed once and not once per
output tile:
1. ``_lora_down_kernel``: S = s D(X) A[:, :r], a skinny [M, r] product (memory
   bound: it reads X once). S, with the scale folded in, is kept for the
   backward.
2. ``_fused_forward_kernel``: the frozen GEMM X W, whose reduction loop
   continues over the rank with S and B, then the bias: one pass over Y.
   This is the reduction ``[X | S] @ [W ; B]`` of length K + r.
"""

import torch
import triton
import triton.language as tl

from .configs import down_configs, gemm_configs, limit_tile_per_thread, rank_block
from .dropout import drop_threshold, keep_mask
from .tiling import grouped_tile


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: tf32 for fp32 inputs only where torch allows it, as torch's own matmul."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@triton.autotune(configs=down_configs(), key=["M", "K", "BLOCK_R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": limit_tile_per_thread("BLOCK_M", "BLOCK_K")})
@triton.jit(do_not_specialize=["rank", "seed", "stride_sm"])
def _lora_down_kernel(
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
    """S[m, j] = out_scale * sum_k D(X)[m, k] A[k, j] for j < rank.

    X: [M, K], A: [K, R] (R >= rank), S: [M, rank]. D(X) = X * keep / (1 - p), and
    out_scale = s / (1 - p) carries both the LoRA scale and the dropout rescaling.
    Grid: (cdiv(M, BLOCK_M), cdiv(rank, BLOCK_R)).
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


@triton.autotune(configs=gemm_configs(), key=["M", "N", "K", "BLOCK_R"])
@triton.jit(do_not_specialize=["rank", "stride_sm"])
def _fused_forward_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    # sizes and scalars
    M, N, K, rank,
    # strides
    stride_xm, stride_xk, stride_wk, stride_wn, stride_sm, stride_sr,
    stride_br, stride_bn, stride_ym, stride_yn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y = X W + bias + S B[:rank, :].

    X: [M, K], W: [K, N], bias: [N], S: [M, rank] (already scaled), B: [R, N], Y: [M, N].
    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), grouped by GROUP_M row tiles
    so that neighbouring programs share W tiles in L2.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    # The LoRA term continues the same reduction over the rank. It is one or
    # two steps long, so it is not software-pipelined (that would only cost
    # shared memory).
    for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < rank
        s = tl.load(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        b = tl.load(b_ptr + ranks[:, None] * stride_br + cols[None, :] * stride_bn,
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0).to(s.dtype)
        acc = tl.dot(s, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed):
    """Launch the fused forward. Inputs are already validated by the caller.

    x: [M, K] in the compute dtype; weight: [K, N] same dtype; bias: [N] or None;
    lora_a: [K, R], lora_b: [R, N] in any float dtype (cast to x's dtype per tile).
    Returns (Y [M, N], S = scale * D(X) A[:, :rank] [M, rank]), both in x's dtype.
    """
    M, K = x.shape
    N = weight.shape[1]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    s_down = torch.empty((M, rank), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, s_down
    block_r = rank_block(rank)
    precision = dot_precision(x.dtype)
    has_dropout = dropout_p > 0.0

    def down_grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(rank, block_r))

    _lora_down_kernel[down_grid](
        x, lora_a, s_down,
        M, K, rank, seed, drop_threshold(dropout_p), scale / (1.0 - dropout_p),
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), s_down.stride(0), s_down.stride(1),
        HAS_DROPOUT=has_dropout, DOT_PRECISION=precision, BLOCK_R=block_r,
    )

    def gemm_grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _fused_forward_kernel[gemm_grid](
        x, weight, bias if bias is not None else y, s_down, lora_b, y,
        M, N, K, rank,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), s_down.stride(0), s_down.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, DOT_PRECISION=precision, BLOCK_R=block_r,
    )
    return y, s_down
