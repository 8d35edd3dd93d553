"""Backward of the fused LoRA layer: dX, dA[:, :r] and dB[:r, :] (W and b are frozen).

With S = D(X) A_r saved by the forward (unscaled), Y = X W + b + s S B_r and
upstream gradient dY:
    dS = dY B_r^T                        [M, R]   ``skinny.skinny_product``
    dX = dY W^T + s D^T(dS A_r^T)        [M, K]   ``_fused_grad_x_kernel``
    dA_r = s D(X)^T dS                   [K, R]   ``_lora_grad_weight_kernel``
    dB_r = s S^T dY                      [R, N]   ``_lora_grad_weight_kernel``
(s dS is the gradient with respect to the unscaled product D(X) A_r).
dS is stored unscaled, in X's dtype, and s multiplies the fp32 accumulators
that consume it, as the forward keeps S unscaled: with fp16 X, a scale of 32,
upstream gradients of 150 and B entries of a few units, s dY B^T leaves
fp16's range (65,504) while dX and dA, the results, are well inside their
dtypes (tests/test_fp16_range.py).
S and dS are stored [M, R] with zeros in the columns past the active rank
(read, like the scale and the seed, from 0-d device tensors), so dA and dB
come out [K, R] and [R, N] with zeros past the rank, as autograd gives for the
sliced adapter, and no shape or grid depends on the rank.
where D^T(G) = G * keep / (1 - p) applies the same regenerated dropout mask.
dA and dB reduce over all M rows; they are split over row chunks into fp32
partial sums (deterministic, no atomics) so that enough programs run, and the
scale of dB goes on the fp32 sums.
"""

import torch
import triton
import triton.language as tl

from .configs import gemm_configs, limit_tile_per_thread, m_bucket, rank_block, weight_grad_configs
from .dropout import drop_threshold, keep_mask, mask_row_offset, mask_seed
from .skinny import device_scalar, dot_precision, skinny_product
from .tiling import cdiv, grouped_tile


@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": limit_tile_per_thread(
                     "BLOCK_M", "BLOCK_N", only_with_dropout=False)})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _fused_grad_x_kernel(
    # pointers
    dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, rank_ptr, scale_ptr, seed_ptr, row_offset_ptr,
    # sizes and scalars (M_BUCKET: the autotune key's m_bucket(M), not read)
    M, N, K, M_BUCKET, threshold, keep_scale,
    # strides
    stride_dym, stride_dyn, stride_wk, stride_wn, stride_dsm, stride_dsr,
    stride_ak, stride_ar, stride_dxm, stride_dxk,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX = dY W^T + scale * D^T(dS A[:, :rank]^T).

    dY: [M, N], W: [K, N], dS: [M, R] (unscaled), A: [K, R], dX: [M, K]; rank,
    scale, seed and row offset are 0-d device tensors. The output
    tile is BLOCK_M x BLOCK_N over (M, K); BLOCK_K tiles the reduction over N.
    Grid: (cdiv(M, BLOCK_M) * cdiv(K, BLOCK_N),), grouped by GROUP_M row tiles.
    """
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    k_ok = ks < K

    # The LoRA term comes first: the dropout mask multiplies only this part, so
    # masking it before the main reduction needs one accumulator, not two, and
    # the Philox registers are free again before the long loop starts.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rank = tl.load(rank_ptr).to(tl.int32)
    for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):  # short: not pipelined
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
        w_t = tl.load(w_ptr + ks[None, :] * stride_wk + ns[:, None] * stride_wn,
                      mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dy, w_t, acc, input_precision=DOT_PRECISION)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + ks[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


@triton.autotune(configs=weight_grad_configs(), key=["M_BUCKET", "C", "BLOCK_R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": limit_tile_per_thread("BLOCK_M", "BLOCK_C")})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _lora_grad_weight_kernel(
    # pointers
    u_ptr, g_ptr, out_ptr, rank_ptr, scale_ptr, seed_ptr, row_offset_ptr,
    # sizes and scalars (M_BUCKET: the autotune key's m_bucket(M), not read)
    M, C, R, M_BUCKET, rows_per_split, threshold, scale,
    # strides
    stride_um, stride_uc, stride_gm, stride_gr, stride_os, stride_oc, stride_or,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr, HAS_DEVICE_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial[split, c, j] = f * sum_{m in split} D(U)[m, c] G[m, j] for j < rank, 0 for rank <= j < R.

    One kernel serves both adapter gradients:
      dA_r = s D(X)^T dS    with U = X  [M, K] (C = K), G = dS [M, R], dropout on U, f = s / (1 - p);
      dB_r^T = s dY^T S     with U = dY [M, N] (C = N), G = S  [M, R], no dropout, f = s.
    Row split `split` covers rows [split * rows_per_split, (split + 1) * rows_per_split).
    rank, seed and row offset are 0-d device tensors; f is the number `scale`,
    times the 0-d device tensor at scale_ptr with HAS_DEVICE_SCALE.
    Output: fp32 partial sums [SPLITS, C, R] (strided), summed by the launcher.
    Grid: (cdiv(C, BLOCK_C), cdiv(R, BLOCK_R), SPLITS).
    """
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2).to(tl.int64)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c_ok = cs < C
    rank = tl.load(rank_ptr).to(tl.int32)
    rank_ok = ranks < rank
    row_start = split * rows_per_split
    # A rank tile wholly past the active rank only writes its zeros.
    row_end = tl.where(pid_r * BLOCK_R < rank, tl.minimum(row_start + rows_per_split, M), row_start)

    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        u = tl.load(u_ptr + rows[:, None] * stride_um + cs[None, :] * stride_uc,
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            u = tl.where(keep_mask(tl.load(seed_ptr), tl.load(row_offset_ptr), rows, pid_c * BLOCK_C, C, threshold,
                                   BLOCK_C), u, 0.0)
        g = tl.load(g_ptr + rows[:, None] * stride_gm + ranks[None, :] * stride_gr,
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(u.dtype)
        # The transpose is a view of the tile in shared memory, not a copy.
        acc = tl.dot(tl.trans(u), g, acc, input_precision=DOT_PRECISION)
    factor = tl.core.to_tensor(scale).to(tl.float32)
    if HAS_DEVICE_SCALE:
        factor = factor * tl.load(scale_ptr).to(tl.float32)
    tl.store(out_ptr + split * stride_os + cs[:, None] * stride_oc + ranks[None, :] * stride_or,
             acc * factor, mask=c_ok[:, None] & (ranks < R)[None, :])


def _row_splits(M: int, tiles: int, device) -> tuple[int, int]:
    """Split the M reduction of a weight gradient so that about four waves of programs run."""
    if device.type == "cuda":
        programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        programs = 4
    splits = max(1, min(cdiv(M, 256), cdiv(programs, tiles)))
    rows_per_split = cdiv(M, splits)
    return cdiv(M, rows_per_split), rows_per_split


def _weight_grad(u, g, rank, keep_scale, dropout_p, seed, row_offset, out_dtype, transpose_out, device_scale=None):
    """sum_m keep_scale * D(U)[m, :]^T G[m, :] via the split kernel, zero past the active rank.

    u: [M, C]; g: [M, R]; device_scale: a 0-d device tensor multiplying the sum, or None.
    Returns [C, R] (dA layout) or, with transpose_out, [R, C] (dB layout).
    """
    M, C = u.shape
    R = g.shape[1]
    block_r = rank_block(R)
    tiles = cdiv(C, 128) * cdiv(R, block_r)
    splits, rows_per_split = _row_splits(M, tiles, u.device)
    if transpose_out:  # partial[s] is [R, C]; the kernel writes it through [C, R] strides
        partial = torch.empty((splits, R, C), dtype=torch.float32, device=u.device)
        strides = (partial.stride(0), partial.stride(2), partial.stride(1))
    else:
        partial = torch.empty((splits, C, R), dtype=torch.float32, device=u.device)
        strides = partial.stride()

    def grid(meta):
        return (cdiv(C, meta["BLOCK_C"]), cdiv(R, block_r), splits)

    _lora_grad_weight_kernel[grid](
        u, g, partial, rank, device_scale if device_scale is not None else rank, seed, row_offset,  # rank: never read
        M, C, R, m_bucket(M), rows_per_split, drop_threshold(dropout_p), float(keep_scale),
        u.stride(0), u.stride(1), g.stride(0), g.stride(1), *strides,
        HAS_DROPOUT=dropout_p > 0.0, HAS_DEVICE_SCALE=device_scale is not None,
        DOT_PRECISION=dot_precision(u.dtype), BLOCK_R=block_r,
    )
    grad = partial.sum(0) if splits > 1 else partial[0]
    return grad.to(out_dtype)


def lora_backward(grad_y, x, s_down, weight, lora_a, lora_b, rank, scale, dropout_p, seed,
                  needs_grad_x=True, needs_grad_a=True, needs_grad_b=True, row_offset=None):
    """Launch the backward. Inputs are already validated by the caller.

    grad_y: [M, N] and x: [M, K] in the compute dtype; s_down: [M, R], the
    unscaled S from the forward (zero past the rank); weight: [K, N]; lora_a:
    [K, R]; lora_b: [R, N]; rank, scale, seed: 0-d device tensors (integer,
    fp32, int64) or numbers; row_offset: the dropout mask's first row (see
    ``dropout``), a 0-d int64 device tensor, a number or None (0).
    Returns (dX [M, K] or None, dA [K, R] or None, dB [R, N] or None); dA and dB
    have the adapters' dtypes and are zero past `rank`.
    """
    M, K = x.shape
    N = weight.shape[1]
    R = lora_a.shape[1]
    grad_x = grad_a = grad_b = None
    if M == 0:
        if needs_grad_x:
            grad_x = torch.zeros_like(x)
        if needs_grad_a:
            grad_a = torch.zeros_like(lora_a)
        if needs_grad_b:
            grad_b = torch.zeros_like(lora_b)
        return grad_x, grad_a, grad_b
    block_r = rank_block(R)
    precision = dot_precision(x.dtype)
    keep_scale = 1.0 / (1.0 - dropout_p)
    rank = device_scalar(rank, torch.int32, x.device)
    scale = device_scalar(scale, torch.float32, x.device)
    seed = mask_seed(seed, dropout_p, rank)
    row_offset = mask_row_offset(row_offset, dropout_p, seed)

    grad_s = None
    if needs_grad_x or needs_grad_a:
        # dS = dY B_r^T, unscaled: the skinny product, reading B transposed through its strides.
        grad_s = skinny_product(grad_y, lora_b.t(), rank)

    if needs_grad_x:
        grad_x = torch.empty((M, K), dtype=x.dtype, device=x.device)

        def x_grid(meta):
            return (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_N"]),)

        _fused_grad_x_kernel[x_grid](
            grad_y, weight, grad_s, lora_a, grad_x, rank, scale, seed, row_offset,
            M, N, K, m_bucket(M), drop_threshold(dropout_p), keep_scale,
            grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
            grad_s.stride(0), grad_s.stride(1), lora_a.stride(0), lora_a.stride(1),
            grad_x.stride(0), grad_x.stride(1),
            HAS_DROPOUT=dropout_p > 0.0, DOT_PRECISION=precision, BLOCK_R=block_r,
        )

    if needs_grad_a:
        grad_a = _weight_grad(x, grad_s, rank, keep_scale, dropout_p, seed, row_offset, lora_a.dtype,
                              transpose_out=False, device_scale=scale)
    if needs_grad_b:
        grad_b = _weight_grad(grad_y, s_down, rank, 1.0, 0.0, seed, row_offset, lora_b.dtype, transpose_out=True,
                              device_scale=scale)
    return grad_x, grad_a, grad_b
