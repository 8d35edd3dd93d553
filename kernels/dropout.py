"""LoRA dropout as a counter-based Philox mask that is regenerated, never stored.

Element (m, k) of the [M, K] input is dropped when word k % 4 of
Philox4x32-10 (Salmon et al., SC 2011; Triton's ``tl.randint4x``) at counter
``m * ceil(K / 4) + k // 4`` is below ``threshold = round(p * 2**32)``; kept
elements are scaled by ``1 / (1 - p)`` (inverted dropout, as
``torch.nn.functional.dropout``). One Philox call serves four neighbouring
elements. Every kernel that needs the mask computes it from the seed and the
element's position, so forward and backward agree and the mask costs no
activation memory. The 32-bit counter wraps past 2**32 groups of four, about
1.7e10 elements per call.
"""

import torch
import triton
import triton.language as tl


def drop_threshold(dropout_p: float) -> int:
    """The uint32 threshold below which a Philox word drops its element: round(p * 2**32)."""
    return min(2**32 - 1, round(dropout_p * 2**32))


@triton.jit
def keep_mask(seed, rows, col_start, n_cols, threshold, BLOCK_COLS: tl.constexpr):
    """Keep mask of the tile rows x [col_start, col_start + BLOCK_COLS) of a row-major [*, n_cols] input.

    rows: [BLOCK_ROWS] row indices -> [BLOCK_ROWS, BLOCK_COLS] bool.
    col_start must be a multiple of 4 (tiles are at least 16 wide).
    """
    quads = col_start // 4 + tl.arange(0, BLOCK_COLS // 4)
    quads_per_row = (n_cols + 3) // 4
    counter = rows[:, None].to(tl.uint32) * quads_per_row.to(tl.uint32) + quads[None, :].to(tl.uint32)
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    # join(join(r0, r2), join(r1, r3))[m, q, j, i] = r_{2j+i}: flattening the
    # last three axes puts word w of quad q at column 4q + w.
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    words = tl.reshape(words, (rows.shape[0], BLOCK_COLS))
    return words.to(tl.uint32, bitcast=True) >= threshold.to(tl.uint32)


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(
    out_ptr,
    M, K, seed, threshold,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, k] = keep_mask(...)[m, k] for a contiguous [M, K] bool output."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed, rows, pid_k * BLOCK_K, K, threshold, BLOCK_K)
    in_bounds = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep, mask=in_bounds)


def dropout_keep_mask(M: int, K: int, seed: int, dropout_p: float, device) -> torch.Tensor:
    """The [M, K] bool keep mask the kernels use for ``seed`` and ``dropout_p`` (for tests and inspection)."""
    out = torch.empty((M, K), dtype=torch.bool, device=device)
    if M == 0 or K == 0:
        return out
    block_m, block_k = 16, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    _keep_mask_kernel[grid](out, M, K, seed, drop_threshold(dropout_p), BLOCK_M=block_m, BLOCK_K=block_k)
    return out
