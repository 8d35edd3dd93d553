"""LoRA dropout as a counter-based Philox mask that is regenerated, never stored.

Element (m, k) of the [M, K] input is dropped when word k % 4 of
Philox4x32-10 (Salmon et al., SC 2011; Triton's ``tl.randint4x``) at the 64-bit
counter ``(row_offset + m) * ceil(K / 4) + k // 4`` is below ``threshold = round(p * 2**32)``; kept
elements are scaled by ``1 / (1 - p)`` (inverted dropout, as
``torch.nn.functional.dropout``). One Philox call serves four neighbouring
elements. Every kernel that needs the mask computes it from the seed and the
element's position, so forward and backward agree and the mask costs no
activation memory. ``row_offset`` (0-d device tensor, read by the kernels)
places the input's rows in a larger batch: a process holding rows
[row_offset, row_offset + M) of a batch split over processes draws the batch's
mask for them, so the masks do not depend on how the batch is split. The
counter is 64-bit (randint4x takes it as the words (low 32 bits, high 32 bits,
0, 0)), so no run of any length repeats a mask; below 2**32 it is the 32-bit
counter the mask had before.
"""

import torch
import triton
import triton.language as tl


def drop_threshold(dropout_p: float) -> int:
    """The uint32 threshold below which a Philox word drops its element: round(p * 2**32)."""
    return min(2**32 - 1, round(dropout_p * 2**32))


@triton.jit
def keep_mask(seed, row_offset, rows, col_start, n_cols, threshold, BLOCK_COLS: tl.constexpr):
    """Keep mask of the tile rows x [col_start, col_start + BLOCK_COLS) of a row-major [*, n_cols] input.

    rows: [BLOCK_ROWS] row indices of the input, which starts at row row_offset
    of the batch -> [BLOCK_ROWS, BLOCK_COLS] bool.
    col_start must be a multiple of 4 (tiles are at least 16 wide).
    """
    quads = col_start // 4 + tl.arange(0, BLOCK_COLS // 4)
    quads_per_row = (n_cols + 3) // 4
    # int64: a 32-bit counter would repeat masks after 2**32 quads (1.56M rows at K = 11008).
    counter = (rows[:, None] + row_offset).to(tl.int64) * quads_per_row + quads[None, :].to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    # join(join(r0, r2), join(r1, r3))[m, q, j, i] = r_{2j+i}: flattening the
    # last three axes puts word w of quad q at column 4q + w.
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    words = tl.reshape(words, (rows.shape[0], BLOCK_COLS))
    return words.to(tl.uint32, bitcast=True) >= threshold.to(tl.uint32)


def mask_seed(seed, dropout_p: float, stand_in: torch.Tensor) -> torch.Tensor:
    """The 0-d int64 device tensor the kernels read the mask's seed from (None: 0).

    Without dropout the kernels never read it, and `stand_in` (any tensor on
    the device) takes its place, so that such a call copies nothing to the device.
    """
    if dropout_p == 0.0:
        return stand_in
    if isinstance(seed, torch.Tensor) and seed.device == stand_in.device:
        return seed if seed.ndim == 0 else seed.reshape(())
    return torch.as_tensor(0 if seed is None else seed, dtype=torch.int64, device=stand_in.device)


def mask_row_offset(row_offset, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """The 0-d int64 device tensor the kernels read the mask's first row from (None: 0).

    Without dropout the kernels never read it, and the seed tensor stands in,
    so that a call without dropout copies nothing to the device.
    """
    if dropout_p == 0.0:
        return seed
    if isinstance(row_offset, torch.Tensor) and row_offset.device == seed.device:
        return row_offset.reshape(())
    return torch.as_tensor(0 if row_offset is None else row_offset, dtype=torch.int64, device=seed.device)


@triton.jit(do_not_specialize=["seed", "row_offset"])
def _keep_mask_kernel(
    out_ptr,
    M, K, seed, row_offset, threshold,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, k] = keep_mask(...)[m, k] for a contiguous [M, K] bool output."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed, row_offset, rows, pid_k * BLOCK_K, K, threshold, BLOCK_K)
    in_bounds = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep, mask=in_bounds)


def dropout_keep_mask(M: int, K: int, seed: int, dropout_p: float, device, row_offset: int = 0) -> torch.Tensor:
    """The [M, K] bool keep mask the kernels use for ``seed``, ``dropout_p`` and ``row_offset`` (for tests and
    inspection)."""
    out = torch.empty((M, K), dtype=torch.bool, device=device)
    if M == 0 or K == 0:
        return out
    block_m, block_k = 16, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    _keep_mask_kernel[grid](out, M, K, seed, row_offset, drop_threshold(dropout_p), BLOCK_M=block_m, BLOCK_K=block_k)
    return out
