"""The LoRA term of a mixed batch: every row its own adapter slot and its own rank, in one pair of launches.

    Y[i] = X[i] W + b + s_i X[i] A[a_i][:, :r_i] B[a_i][:r_i, :]      (a_i = -1: no adapter, Y[i] = X[i] W + b)

X [M, K], adapters stacked as A [slots, K, R] and B [slots, R, N]; a_i, r_i
(0 <= r_i <= R) and the scale s_i are per-row device tensors. The frozen
product X W + b is the caller's (``torch.addmm``): it is the same for every
row, so cuBLAS runs it at its roofline, and fusing the LoRA term into its
epilogue would force its row tiles to follow the adapters' segments (gathered
rows, no contiguous tile loads) for a term that costs about r / K of it. The
extra pass over Y that the add kernel makes is M N elements, small next to the
GEMM's K N weight reads at decode and its 2 M K N FLOPs at prefill.

Rows are grouped by adapter on the device, with no host sync (``segments``):
a stable argsort of the slots, rows per slot by ``scatter_add``, and tiles of
BLOCK_M rows that never straddle two adapters. The tile count is bounded on
the host by cdiv(M, BLOCK_M) + slots (each of the slots + 1 segments wastes at
most one partial tile), so the grid depends on M and the slot count only:
one compiled graph, and one CUDA graph, serves every mix of adapters and
ranks. Tiles past the last segment have no rows and touch no memory.

Two launches, as ``lora_forward``'s, so that the down-projection is computed
once per row and not once per output tile:
1. ``_segment_shrink_kernel``: S[p] = X[order[p]] A[a][:, :r] for the rows p of
   a tile (sorted order), zero past each row's rank; a rank block past the
   tile's largest rank does no arithmetic, so a tile's work follows the ranks
   its rows asked for, not R.
2. ``_segment_expand_add_kernel``: Y[order[p]] += s S[p] B[a][:r] in place,
   the reduction running to the tile's largest rank only.
This is the segmented shrink/expand pair of Punica (Chen et al., 2023,
"Punica: Multi-Tenant LoRA Serving", SGMV) and S-LoRA (Sheng et al., 2023),
with the rank read per row instead of one padded width per batch.
"""

import torch
import triton
import triton.language as tl

from .configs import m_bucket, rank_block
from .interpreter import interpreter_enabled
from .skinny import dot_precision
from .tiling import cdiv, next_power_of_2

MIN_SEGMENT_BLOCK = 16  # tl.dot needs every dimension >= 16
MAX_SEGMENT_BLOCK = 64


def segment_block(M: int, slots: int) -> int:
    """Rows per tile: the mean rows per segment (slots + 1 of them), as a power of two in [16, 64].

    Decode batches (a few rows per adapter) take 16-row tiles, so that a
    segment of 3 rows wastes 13 rows of one tile, not 125; prefill takes 64.
    A compile-time constant: 3 values at most.
    """
    if interpreter_enabled():
        return MIN_SEGMENT_BLOCK
    return min(MAX_SEGMENT_BLOCK, max(MIN_SEGMENT_BLOCK, next_power_of_2(cdiv(M, slots + 1))))


def max_tiles(M: int, slots: int, block_m: int) -> int:
    """The most tiles any mix of slots can need: the grid's size, known on the host."""
    return cdiv(M, block_m) + slots


def segments(slot_of_row: torch.Tensor, slots: int, block_m: int):
    """Group the rows by adapter on the device: (order [M], tile_slot [T], tile_begin [T], tile_end [T]).

    slot_of_row: [M] integers in [-1, slots) (not checked: reading them would
    stop the host). order lists the rows sorted by slot (stable); tile t covers
    sorted positions [tile_begin[t], tile_end[t]) (empty past the last
    segment), all of slot tile_slot[t]. T = ``max_tiles(M, slots, block_m)``.
    """
    M = slot_of_row.shape[0]
    device = slot_of_row.device
    key = slot_of_row.to(torch.int64) + 1  # segment 0 holds the rows with no adapter
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(slots + 1, dtype=torch.int64, device=device).scatter_add_(
        0, key, torch.ones(M, dtype=torch.int64, device=device))
    seg_start = torch.cumsum(counts, 0) - counts
    tiles = (counts + (block_m - 1)) // block_m
    tiles_end = torch.cumsum(tiles, 0)
    t = torch.arange(max_tiles(M, slots, block_m), dtype=torch.int64, device=device)
    seg = torch.searchsorted(tiles_end, t, right=True)
    valid = seg <= slots
    seg = seg.clamp(max=slots)
    begin = seg_start[seg] + (t - (tiles_end[seg] - tiles[seg])) * block_m
    end = torch.minimum(begin + block_m, seg_start[seg] + counts[seg])
    end = torch.where(valid, end, begin)
    return order, (seg - 1).to(torch.int32), begin, end


def _interpreter_or(configs, **blocks):
    # The interpreter's cost is per program: wider tiles than the GEMMs' 16 keep a model's forward in seconds.
    if interpreter_enabled():
        return [triton.Config(blocks, num_warps=1, num_stages=1)]
    return configs


def shrink_configs():
    """Tiles of the segmented shrink: BLOCK_K of the reduction (BLOCK_M is fixed by the segments)."""
    return _interpreter_or([triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
                            for bk, w, s in ((64, 4, 3), (128, 4, 4), (256, 8, 3))], BLOCK_K=32)


def expand_configs():
    """Tiles of the segmented expand: BLOCK_N output columns."""
    return _interpreter_or([triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
                            for bn, w, s in ((64, 4, 2), (128, 4, 2), (256, 8, 2))], BLOCK_N=64)


@triton.jit
def _tile_rows(order_ptr, tile_slot_ptr, tile_begin_ptr, tile_end_ptr, rank_ptr, R, BLOCK_M: tl.constexpr):
    """(sorted positions, token rows, row mask, slot, per-row ranks, the tile's largest rank) of this program's tile.

    A tile without an adapter gets ranks 0 whatever was asked: no work, no memory touched by the add.
    Ranks are clamped to R: a rank past the width would read the next slot's adapter.
    """
    tile = tl.program_id(0)
    slot = tl.load(tile_slot_ptr + tile)
    begin = tl.load(tile_begin_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    positions = begin + tl.arange(0, BLOCK_M)
    in_tile = positions < end
    rows = tl.load(order_ptr + positions, mask=in_tile, other=0).to(tl.int64)
    ranks = tl.load(rank_ptr + rows, mask=in_tile, other=0).to(tl.int32)
    ranks = tl.minimum(tl.where(slot >= 0, ranks, 0), R)
    return positions, rows, in_tile, tl.maximum(slot, 0).to(tl.int64), ranks, tl.max(ranks, axis=0)


@triton.autotune(configs=shrink_configs(), key=["M_BUCKET", "K", "BLOCK_R", "BLOCK_M"])
@triton.jit(do_not_specialize=["M_BUCKET"])
def _segment_shrink_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr, rank_ptr, order_ptr, tile_slot_ptr, tile_begin_ptr, tile_end_ptr,
    # sizes (M_BUCKET: the autotune key's m_bucket(M), not read)
    K, R, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_as, stride_ak, stride_ar, stride_sm, stride_sr,
    # meta-parameters
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S[p, j] = sum_k X[order[p], k] A[a, k, j] for j < r_order[p], else 0, for the sorted rows p of one tile.

    X: [M, K], A: [slots, K, R], S: [M, R] in sorted order; a is the tile's
    slot, r the per-row rank [M] (read; rows of no adapter count as rank 0).
    Grid: (T tiles, cdiv(R, BLOCK_R)).
    """
    positions, rows, in_tile, slot, ranks, tile_rank = _tile_rows(
        order_ptr, tile_slot_ptr, tile_begin_ptr, tile_end_ptr, rank_ptr, R, BLOCK_M)
    pid_r = tl.program_id(1)
    cols_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    # A rank block past every rank of the tile only writes its zeros.
    k_end = tl.where(pid_r * BLOCK_R < tile_rank, K, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    a_base = a_ptr + slot * stride_as
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=in_tile[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_base + ks[:, None] * stride_ak + cols_r[None, :] * stride_ar,
                    mask=k_ok[:, None] & (cols_r < tile_rank)[None, :], other=0.0).to(x.dtype)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
    acc = tl.where(cols_r[None, :] < ranks[:, None], acc, 0.0)
    tl.store(s_ptr + positions[:, None] * stride_sm + cols_r[None, :] * stride_sr,
             acc.to(s_ptr.dtype.element_ty), mask=in_tile[:, None] & (cols_r < R)[None, :])


@triton.autotune(configs=expand_configs(), key=["M_BUCKET", "N", "BLOCK_R", "BLOCK_M"])
@triton.jit(do_not_specialize=["M_BUCKET"])
def _segment_expand_add_kernel(
    # pointers
    s_ptr, b_ptr, y_ptr, rank_ptr, scale_ptr, order_ptr, tile_slot_ptr, tile_begin_ptr, tile_end_ptr,
    # sizes (M_BUCKET: the autotune key's m_bucket(M), not read)
    N, R, M_BUCKET,
    # strides
    stride_sm, stride_sr, stride_bs, stride_br, stride_bn, stride_ym, stride_yn,
    # meta-parameters
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Y[order[p], n] += scale[order[p]] * sum_{j < rank_tile} S[p, j] B[a, j, n], in place, for one tile.

    S: [M, R] sorted (zero past each row's rank, from the shrink), B: [slots,
    R, N], Y: [M, N]; scale: [M] float, read as fp32. Rows of no adapter are
    masked out: their Y is neither read nor written. The product accumulates
    in fp32 and the scale multiplies the fp32 result (a per-row scale cannot
    go on the shared B tile). Grid: (T tiles, cdiv(N, BLOCK_N)).
    """
    positions, rows, in_tile, slot, ranks, tile_rank = _tile_rows(
        order_ptr, tile_slot_ptr, tile_begin_ptr, tile_end_ptr, rank_ptr, R, BLOCK_M)
    row_ok = in_tile & (ranks > 0)  # the ranks of a tile of no adapter are 0
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_base = b_ptr + slot * stride_bs
    # One or two steps: not software-pipelined (that would only cost shared memory).
    for r0 in tl.range(0, tile_rank, BLOCK_R, num_stages=1):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < tile_rank
        s = tl.load(s_ptr + positions[:, None] * stride_sm + rs[None, :] * stride_sr,
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_base + rs[:, None] * stride_br + cols[None, :] * stride_bn,
                    mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(s.dtype)
        acc = tl.dot(s, b, acc, input_precision=DOT_PRECISION)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    mask = row_ok[:, None] & col_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + acc * scale[:, None]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def segment_shrink(x, lora_a, ranks, order, tile_slot, tile_begin, tile_end, block_m):
    """S [M, R] in x's dtype, rows in sorted order: S[p, :r] = x[order[p]] A[a][:, :r], zeros past r."""
    M, K = x.shape
    R = lora_a.shape[2]
    out = torch.empty((M, R), dtype=x.dtype, device=x.device)
    block_r = rank_block(R)
    _segment_shrink_kernel[(tile_slot.shape[0], cdiv(R, block_r))](
        x, lora_a, out, ranks, order, tile_slot, tile_begin, tile_end,
        K, R, m_bucket(M),
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), out.stride(0), out.stride(1),
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r, BLOCK_M=block_m,
    )
    return out


def multi_lora_add_(y, x, lora_a, lora_b, slot_of_row, ranks, scales):
    """y += s_i x_i A[a_i][:, :r_i] B[a_i][:r_i, :] for every row i with a_i >= 0, in place; returns y.

    y: [M, N] (x W + b, the caller's); x: [M, K]; lora_a: [slots, K, R];
    lora_b: [slots, R, N] (any float dtype, cast to x's per tile); slot_of_row,
    ranks: [M] integer device tensors (a_i in [-1, slots), r_i in [0, R]);
    scales: [M] float device tensor. Inputs are validated by the caller.
    """
    M, N = y.shape
    if M == 0:
        return y
    slots, R = lora_a.shape[0], lora_a.shape[2]
    block_m = segment_block(M, slots)
    order, tile_slot, tile_begin, tile_end = segments(slot_of_row, slots, block_m)
    s_down = segment_shrink(x, lora_a, ranks, order, tile_slot, tile_begin, tile_end, block_m)

    def grid(meta):
        return (tile_slot.shape[0], cdiv(N, meta["BLOCK_N"]))

    _segment_expand_add_kernel[grid](
        s_down, lora_b, y, ranks, scales, order, tile_slot, tile_begin, tile_end,
        N, R, m_bucket(M),
        s_down.stride(0), s_down.stride(1), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y.stride(0), y.stride(1),
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R), BLOCK_M=block_m,
    )
    return y
