"""The skinny product of the LoRA path: [M, K] x [K, R] with the active rank read from the device.

Memory bound (it reads the [M, K] operand once), so it is computed once per
layer call instead of once per output tile of the GEMM.
"""

import torch
import triton
import triton.language as tl

from .configs import down_configs, limit_tile_per_thread, m_bucket, rank_block
from .dropout import drop_threshold, keep_mask, mask_row_offset, mask_seed
from .tiling import cdiv


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: tf32 for fp32 inputs only where torch allows it, as torch's own matmul."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def device_scalar(value, dtype, device) -> torch.Tensor:
    """`value` as a 0-d tensor on `device`: a tensor already there passes through, a number becomes `dtype`.

    The per-step values (rank, scale, seed) reach the kernels as pointers, so a
    launch never depends on their values; the kernels convert what they load
    (rank to int32, scale to fp32, seed to uint64), and plain numbers are
    accepted for eager callers.
    """
    if isinstance(value, torch.Tensor) and value.device == device:
        return value if value.ndim == 0 else value.reshape(())  # a reshape that changes nothing still dispatches
    return torch.as_tensor(value, dtype=dtype, device=device).reshape(())


@triton.autotune(configs=down_configs(), key=["M_BUCKET", "K", "BLOCK_R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": limit_tile_per_thread("BLOCK_M", "BLOCK_K")})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _skinny_product_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr, rank_ptr, scale_ptr, seed_ptr, row_offset_ptr,
    snap_rank_ptr, snap_scale_ptr, snap_row_offset_ptr,
    # sizes and scalars (M_BUCKET: the autotune key's m_bucket(M), not read)
    M, K, R, M_BUCKET, threshold, out_factor,
    # strides
    stride_xm, stride_xk, stride_ak, stride_ar, stride_sm, stride_sr,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, SNAPSHOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S[m, j] = out_factor * sum_k D(X)[m, k] A[k, j] for j < rank, and S[m, j] = 0 for rank <= j < R.

    X: [M, K], A: [K, R] (any strides), S: [M, R]; rank (int) is read from a
    0-d device tensor, the dropout seed and row offset (int64) too. D(X) = X * keep / (1 - p) with
    HAS_DROPOUT, else X. It serves the forward's S = D(X) A_r (out_factor =
    1 / (1 - p), no scale: see lora_forward) and the backward's dS = dY B_r^T
    (X = dY, A = B^T through its strides, no dropout).
    With SNAPSHOT, program (0, 0) also copies the rank (int32), the scale at
    scale_ptr (fp32) and the row offset (int64; 0 without dropout) to the 0-d
    tensors at snap_*: the values this forward used, for its backward, however
    the caller's tensors are written in between.
    Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    rank = tl.load(rank_ptr).to(tl.int32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    rank_ok = ranks < rank
    # A column tile wholly past the active rank only writes its zeros: the
    # work of a launch follows the rank while its grid follows R.
    k_end = tl.where(pid_r * BLOCK_R < rank, K, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(tl.load(seed_ptr), tl.load(row_offset_ptr), rows, k0, K, threshold, BLOCK_K),
                         x, 0.0)
        # Adapters may be fp32 while X is bf16 (autocast): compute in X's dtype.
        a = tl.load(a_ptr + cols[:, None] * stride_ak + ranks[None, :] * stride_ar,
                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0).to(x.dtype)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
    # fp32 whatever the caller passed (a float64 scale would halve the epilogue's
    # throughput); the scales go once on the accumulator, not on every element.
    # tl.core.to_tensor: Triton 3.6's triton.language does not export it.
    acc = acc * tl.core.to_tensor(out_factor).to(tl.float32)
    tl.store(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
             acc.to(s_ptr.dtype.element_ty), mask=row_ok[:, None] & (ranks < R)[None, :])
    if SNAPSHOT:
        if (pid_m == 0) & (pid_r == 0):
            tl.store(snap_rank_ptr, rank)
            tl.store(snap_scale_ptr, tl.load(scale_ptr).to(tl.float32))
            if HAS_DROPOUT:
                tl.store(snap_row_offset_ptr, tl.load(row_offset_ptr).to(tl.int64))
            else:
                tl.store(snap_row_offset_ptr, tl.full((), 0, tl.int64))


def skinny_product(x, a, rank, out_factor=1.0, dropout_p=0.0, seed=0, row_offset=None, snapshot=None):
    """out_factor * D(x) a[:, :rank], zero-padded to [M, R], in x's dtype.

    x: [M, K]; a: [K, R], any strides; rank, seed, row_offset: 0-d device
    tensors (int, int64, int64) or numbers; row_offset None is 0.
    snapshot: None, or (scale, rank_out, scale_out, row_offset_out): the
    kernel copies rank, scale and the row offset to the three 0-d tensors
    (int32, fp32, int64) as it reads them (see the kernel).
    """
    M, K = x.shape
    R = a.shape[1]
    out = torch.empty((M, R), dtype=x.dtype, device=x.device)
    block_r = rank_block(R)
    rank = device_scalar(rank, torch.int32, x.device)
    seed = mask_seed(seed, dropout_p, rank)
    row_offset = mask_row_offset(row_offset, dropout_p, seed)
    scale, *snaps = snapshot if snapshot is not None else (rank, rank, rank, rank)  # rank: pointers never read

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]), cdiv(R, block_r))

    _skinny_product_kernel[grid](
        x, a, out, rank, scale, seed, row_offset, *snaps,
        M, K, R, m_bucket(M), drop_threshold(dropout_p), float(out_factor),
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        HAS_DROPOUT=dropout_p > 0.0, SNAPSHOT=snapshot is not None, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_R=block_r,
    )
    return out
