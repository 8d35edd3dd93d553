"""Forward of the fused LoRA layer: Y = X W + b + s * D(X) A[:, :r] B[:r, :].

Two launches, so that the down-projection is computed once and not once per
output tile:
1. ``skinny.skinny_product``: S = D(X) A[:, :r], a skinny product (memory
   bound: it reads X once), stored [M, R] in X's dtype with zeros past the
   active rank, and kept for the backward.
2. ``_fused_forward_kernel``: the frozen GEMM X W, whose reduction loop
   continues over the rank with S and s B, then the bias: one pass over Y.
   This is the reduction ``[X | S] @ [W ; s B]`` of length K + r.

The scale multiplies B's tile (in fp32, then X's dtype), not S: S is as large
as X times A, and an outlier input channel (LLM activations carry some in the
tens of thousands) times a scale of 32 leaves fp16's range (65,504) while the
output, s S B with B small, stays inside it. Keeping S unscaled keeps it in
X's dtype at X's cost; an fp32 S would double its memory and make the rank
loop an fp32 product.

The rank r, the scale s and the dropout seed are 0-d device tensors read by
the kernels, so shapes, grids and autotune keys depend on the adapter width R
only: one compiled graph (and one CUDA graph) serves every rank 1..R.
"""

import torch
import triton
import triton.language as tl

from .configs import (gemm_configs, limit_tile_per_thread, m_bucket, rank_block,
                      transposed_weight_at_widest_rank_block)
from .skinny import device_scalar, dot_precision, skinny_product
from .tiling import cdiv, grouped_tile


@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "N", "K", "BLOCK_R", "stride_wk"],
                 prune_configs_by={"early_config_prune": limit_tile_per_thread(
                     "BLOCK_M", "BLOCK_N", when=transposed_weight_at_widest_rank_block)})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _fused_forward_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr, rank_ptr, scale_ptr,
    # sizes (M_BUCKET: the autotune key's m_bucket(M), not read)
    M, N, K, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_wk, stride_wn, stride_sm, stride_sr,
    stride_br, stride_bn, stride_ym, stride_yn, stride_bias,
    # meta-parameters
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y = X W + bias + S (scale B[:rank, :]).

    X: [M, K], W: [K, N], bias: [N], S: [M, R] (unscaled), B: [R, N], Y: [M, N], each with any strides;
    rank and scale: 0-d device tensors (integer, float), 1 <= rank <= R.
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
    rank = tl.load(rank_ptr).to(tl.int32)
    scale = tl.load(scale_ptr).to(tl.float32)
    for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < rank
        s = tl.load(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        b = tl.load(b_ptr + ranks[:, None] * stride_br + cols[None, :] * stride_bn,
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        b = (b.to(tl.float32) * scale).to(s.dtype)
        acc = tl.dot(s, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed, row_offset=None, snapshot=False):
    """Launch the fused forward. Inputs are already validated by the caller.

    x: [M, K] in the compute dtype; weight: [K, N] same dtype; bias: [N] or None;
    lora_a: [K, R], lora_b: [R, N] in any float dtype (cast to x's dtype per tile); every tensor with any strides.
    rank, scale, seed: 0-d device tensors (integer, fp32, int64) or numbers;
    row_offset: the dropout mask's first row (see ``dropout``), a 0-d int64
    device tensor, a number or None (0).
    Returns (Y [M, N], S [M, R]), both in x's dtype: S[:, :rank] = D(X) A[:, :rank]
    (unscaled) and S[:, rank:] = 0; with `snapshot`, (Y, S, (rank, scale,
    row_offset)): 0-d copies (int32, fp32, int64; row offset 0 without dropout)
    of the values the kernels read, written by the first launch at no launch of
    their own, for a backward that must not see later writes to the originals.
    """
    M, K = x.shape
    N = weight.shape[1]
    R = lora_a.shape[1]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    rank = device_scalar(rank, torch.int32, x.device)
    scale = device_scalar(scale, torch.float32, x.device)
    snaps = None
    if snapshot:
        snaps = (torch.empty((), dtype=torch.int32, device=x.device),
                 torch.empty((), dtype=torch.float32, device=x.device),
                 torch.empty((), dtype=torch.int64, device=x.device))
    if M == 0:
        s_down = torch.empty((0, R), dtype=x.dtype, device=x.device)
        if snapshot:  # no launch writes them; an empty batch's backward reads none of them
            for snap in snaps:
                snap.zero_()
        return (y, s_down, snaps) if snapshot else (y, s_down)
    block_r = rank_block(R)
    precision = dot_precision(x.dtype)
    s_down = skinny_product(x, lora_a, rank, 1.0 / (1.0 - dropout_p), dropout_p, seed, row_offset,
                            snapshot=(scale, *snaps) if snapshot else None)

    def gemm_grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    _fused_forward_kernel[gemm_grid](
        x, weight, bias if bias is not None else y, s_down, lora_b, y, rank, scale,
        M, N, K, m_bucket(M),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), s_down.stride(0), s_down.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1), bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, DOT_PRECISION=precision, BLOCK_R=block_r,
    )
    return (y, s_down, snaps) if snapshot else (y, s_down)
