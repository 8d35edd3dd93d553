"""LoRA dropout as a counter-based Philox mask that is regenerated, never stored.

Element (m, k) of the [M, K] input is kept when ``rand(seed, m * K + k) >= p``,
and kept elements are scaled by ``1 / (1 - p)`` (inverted dropout, as
``torch.nn.functional.dropout``). Every kernel that needs the mask computes it
from the seed and the element's flat index, so forward and backward agree and
the mask costs no activation memory. The flat index is taken modulo 2**32
(Philox's 32-bit counter): masks repeat only past 4.29e9 elements per call.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def keep_mask(seed, rows, cols, n_cols, dropout_p):
    """Bernoulli(1 - p) keep mask of the elements (rows[i], cols[j]) of a row-major [*, n_cols] input.

    rows: [BLOCK_ROWS] int, cols: [BLOCK_COLS] int -> [BLOCK_ROWS, BLOCK_COLS] bool.
    """
    flat = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    return tl.rand(seed, flat.to(tl.uint32)) >= dropout_p


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(
    out_ptr,
    M, K, seed, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, k] = keep_mask(seed, m, k, K, p) for a contiguous [M, K] bool output."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed, rows, cols, K, dropout_p)
    in_bounds = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep, mask=in_bounds)


def dropout_keep_mask(M: int, K: int, seed: int, dropout_p: float, device) -> torch.Tensor:
    """The [M, K] bool keep mask the kernels use for ``seed`` and ``dropout_p`` (for tests and inspection)."""
    out = torch.empty((M, K), dtype=torch.bool, device=device)
    if M == 0 or K == 0:
        return out
    block_m, block_k = 16, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    _keep_mask_kernel[grid](out, M, K, seed, dropout_p, BLOCK_M=block_m, BLOCK_K=block_k)
    return out
