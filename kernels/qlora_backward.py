"""Backward of the fused LoRA layer over a 4-bit frozen weight: dX, dA[:, :r], dB[:r, :].

As ``lora_backward`` (same formulas, same S saved by the forward):
    dS = dY B_r^T                        [M, R]   ``skinny.skinny_product``, unscaled
    dX = dY W4 + s D^T(dS A_r^T)         [M, K]   ``_qlora_grad_x_kernel``
    dA_r = s D(X)^T dS, dB_r = s S^T dY           ``lora_backward``'s weight-gradient kernel
(s on the fp32 accumulators, not on dS: s dY B^T can leave fp16's range
where dX and dA do not; see ``lora_backward``)
with W4 the 4-bit [N, K] weight (``nf4``), decoded tile by tile in the dX
kernel's reduction loop over N, so the backward writes no full-size W either.
"""

import torch
import triton
import triton.language as tl

from .configs import gemm_configs, limit_tile_per_thread, m_bucket, rank_block
from .dropout import drop_threshold, keep_mask, mask_row_offset, mask_seed
from .lora_backward import _weight_grad
from .nf4 import block_scale, decode_codes, dequant_tile, quant_args
from .skinny import device_scalar, dot_precision, skinny_product
from .tiling import cdiv, grouped_tile


@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_DROPOUT", "BLOCKSIZE", "NESTED"],
                 prune_configs_by={"early_config_prune": limit_tile_per_thread(
                     "BLOCK_M", "BLOCK_N", only_with_dropout=False)})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _qlora_grad_x_kernel(
    # pointers
    dy_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    ds_ptr, a_ptr, dx_ptr, rank_ptr, scale_ptr, seed_ptr, row_offset_ptr,
    # sizes and scalars (M_BUCKET: the autotune key's m_bucket(M), not read)
    M, N, K, M_BUCKET, threshold, keep_scale,
    # strides
    stride_dym, stride_dyn, stride_dsm, stride_dsr, stride_ak, stride_ar, stride_dxm, stride_dxk,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ROWS_IN_BLOCKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX = dY W + scale * D^T(dS A[:, :rank]^T).

    dY: [M, N], W: the 4-bit [N, K] weight (element (n, k) at flat index
    n * K + k), dS: [M, R] (unscaled), A: [K, R], dX: [M, K]; rank, scale, seed
    and row offset are 0-d device tensors; ROWS_IN_BLOCKS: K is a multiple of BLOCKSIZE. The output tile is
    BLOCK_M x BLOCK_N over (M, K); BLOCK_K tiles the reduction over N.
    Grid: (cdiv(M, BLOCK_M) * cdiv(K, BLOCK_N),).
    """
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    k_ok = ks < K

    # The LoRA term first, so that the dropout mask multiplies it alone (see lora_backward).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rank = tl.load(rank_ptr).to(tl.int32)
    for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < rank
        ds = tl.load(ds_ptr + rows[:, None] * stride_dsm + ranks[None, :] * stride_dsr,
                     mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        a_t = tl.load(a_ptr + ks[None, :] * stride_ak + ranks[:, None] * stride_ar,
                      mask=rank_ok[:, None] & k_ok[None, :], other=0.0).to(ds.dtype)
        acc = tl.dot(ds, a_t, acc, input_precision=DOT_PRECISION)
    # The scale goes on the fp32 accumulator: dS is unscaled (see the module docstring).
    lora_scale = tl.load(scale_ptr).to(tl.float32)
    if HAS_DROPOUT:
        # tl.core.to_tensor: Triton 3.6's triton.language does not export it.
        lora_scale = lora_scale * tl.core.to_tensor(keep_scale).to(tl.float32)
        acc = tl.where(keep_mask(tl.load(seed_ptr), tl.load(row_offset_ptr), rows, pid_k * BLOCK_N, K, threshold,
                                 BLOCK_N),
                       acc * lora_scale, 0.0)
    else:
        acc = acc * lora_scale

    for n0 in range(0, N, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        n_ok = ns < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn,
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        # int64: N * K passes 2**31 for the widest layers of large models.
        row_start = ns.to(tl.int64) * K
        idx = row_start[:, None] + ks[None, :]
        w_ok = n_ok[:, None] & k_ok[None, :]
        if ROWS_IN_BLOCKS and BLOCKSIZE % BLOCK_N == 0:
            # This program's columns of row n lie in block (n K + pid_k BLOCK_N) / BLOCKSIZE: one scale per row.
            scale_n = block_scale((row_start + pid_k * BLOCK_N) // BLOCKSIZE, n_ok, absmax_ptr, absmax2_ptr,
                                  code2_ptr, offset_ptr, NESTED)
            w = decode_codes(idx, w_ok, packed_ptr, code_ptr) * scale_n[:, None]
        else:
            w = dequant_tile(idx, w_ok, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                             BLOCKSIZE, NESTED)
        acc = tl.dot(dy, w.to(dy.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + ks[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


def qlora_backward(grad_y, x, s_down, quant, lora_a, lora_b, rank, scale, dropout_p, seed,
                   needs_grad_x=True, needs_grad_a=True, needs_grad_b=True, row_offset=None):
    """Launch the 4-bit backward. Inputs are already validated by the caller.

    As ``lora_backward`` with the frozen weight a ``Quant4bit`` of shape [N, K].
    Returns (dX [M, K] or None, dA [K, R] or None, dB [R, N] or None).
    """
    M, K = x.shape
    N = quant.shape[0]
    R = lora_a.shape[1]
    grad_x = grad_a = grad_b = None
    if M == 0:
        return (torch.zeros_like(x) if needs_grad_x else None, torch.zeros_like(lora_a) if needs_grad_a else None,
                torch.zeros_like(lora_b) if needs_grad_b else None)
    keep_scale = 1.0 / (1.0 - dropout_p)
    rank = device_scalar(rank, torch.int32, x.device)
    scale = device_scalar(scale, torch.float32, x.device)
    seed = mask_seed(seed, dropout_p, rank)
    row_offset = mask_row_offset(row_offset, dropout_p, seed)

    grad_s = None
    if needs_grad_x or needs_grad_a:
        # dS = dY B_r^T, unscaled, reading B transposed through its strides.
        grad_s = skinny_product(grad_y, lora_b.t(), rank)

    if needs_grad_x:
        grad_x = torch.empty((M, K), dtype=x.dtype, device=x.device)

        def grid(meta):
            return (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_N"]),)

        _qlora_grad_x_kernel[grid](
            grad_y, *quant_args(quant), grad_s, lora_a, grad_x, rank, scale, seed, row_offset,
            M, N, K, m_bucket(M), drop_threshold(dropout_p), keep_scale,
            grad_y.stride(0), grad_y.stride(1), grad_s.stride(0), grad_s.stride(1),
            lora_a.stride(0), lora_a.stride(1), grad_x.stride(0), grad_x.stride(1),
            BLOCKSIZE=quant.blocksize, NESTED=quant.nested, ROWS_IN_BLOCKS=K % quant.blocksize == 0,
            HAS_DROPOUT=dropout_p > 0.0, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R),
        )

    if needs_grad_a:
        grad_a = _weight_grad(x, grad_s, rank, keep_scale, dropout_p, seed, row_offset, lora_a.dtype,
                              transpose_out=False, device_scale=scale)
    if needs_grad_b:
        grad_b = _weight_grad(grad_y, s_down, rank, 1.0, 0.0, seed, row_offset, lora_b.dtype, transpose_out=True,
                              device_scale=scale)
    return grad_x, grad_a, grad_b
