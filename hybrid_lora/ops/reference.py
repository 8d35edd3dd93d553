"""Plain PyTorch reference of every kernel in ``hybrid_lora.kernels``.

Written as simply as possible, in whatever dtype it is given (tests pass fp64),
with the dropout mask passed in explicitly. The backward is written out in
closed form, so that the kernels' gradients are compared with formulas and the
formulas with autograd. Tests and benchmarks import these functions; they are
the specification, never edited to make a kernel pass.

Layout: X [M, K], W [K, N] (``transformers`` Conv1D), b [N], A [K, R], B [R, N],
active rank r <= R, scale s = alpha / r (Hu et al., 2022, "LoRA", eq. 3):
    Y = X W + b + s D(X) A[:, :r] B[:r, :],   D(X) = X * keep / (1 - p).
"""

import torch


def dropout_input(x, keep_mask=None, dropout_p=0.0):
    """D(X) = X * keep / (1 - p); the identity when there is no mask."""
    if keep_mask is None:
        return x
    return x * keep_mask.to(x.dtype) / (1.0 - dropout_p)


def lora_down(x, lora_a, rank, keep_mask=None, dropout_p=0.0):
    """S = D(X) A[:, :r]  -> [M, r]."""
    return dropout_input(x, keep_mask, dropout_p) @ lora_a[:, :rank]


def lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, keep_mask=None, dropout_p=0.0):
    """Y = X W + b + s S B[:r, :] with S = D(X) A[:, :r]. Returns (Y [M, N], S [M, r])."""
    s_down = lora_down(x, lora_a, rank, keep_mask, dropout_p)
    y = x @ weight + scale * (s_down @ lora_b[:rank])
    if bias is not None:
        y = y + bias
    return y, s_down


def lora_backward(grad_y, x, weight, lora_a, lora_b, rank, scale, keep_mask=None, dropout_p=0.0):
    """Closed-form gradients of ``lora_forward`` with respect to X, A and B.

    dS = s dY B_r^T;  dX = dY W^T + D^T(dS A_r^T);  dA_r = D(X)^T dS;  dB_r = s S^T dY.
    dA and dB are zero past the active rank. Returns (dX [M, K], dA [K, R], dB [R, N]).
    """
    s_down = lora_down(x, lora_a, rank, keep_mask, dropout_p)
    grad_s = scale * grad_y @ lora_b[:rank].t()
    grad_x = grad_y @ weight.t() + dropout_input(grad_s @ lora_a[:, :rank].t(), keep_mask, dropout_p)
    grad_a = torch.zeros_like(lora_a)
    grad_a[:, :rank] = dropout_input(x, keep_mask, dropout_p).t() @ grad_s
    grad_b = torch.zeros_like(lora_b)
    grad_b[:rank] = scale * s_down.t() @ grad_y
    return grad_x, grad_a, grad_b


def merged_weight(weight, lora_a, lora_b, rank, scale):
    """W + s A[:, :r] B[:r, :]: the frozen weight with the adapter folded in."""
    return weight + scale * lora_a[:, :rank] @ lora_b[:rank]


# Philox4x32-10 (Salmon et al., SC 2011) in int64 torch ops, as Triton's
# tl.randint4x computes it: counter (q low, q high, 0, 0), key (seed low, seed high).
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo32(a, b):
    """(high, low) 32-bit halves of a * b for a uint32-valued int64 tensor and a uint32 constant b.

    b is split in 16-bit halves so that no partial product leaves int64.
    """
    low_part = a * (b & 0xFFFF)  # < 2**48
    high_part = a * (b >> 16)  # < 2**48; the product is high_part * 2**16 + low_part
    low_sum = low_part + ((high_part & 0xFFFF) << 16)
    return (high_part >> 16) + (low_sum >> 32), low_sum & _U32


def philox_keep_mask(seed, M, K, dropout_p, row_offset=0):
    """The [M, K] bool keep mask of ``kernels.dropout`` for `seed` (an int or a 0-d integer tensor).

    Element (m, k) is kept when word k % 4 of Philox4x32-10 at the 64-bit
    counter q = (row_offset + m) * ceil(K / 4) + k // 4 (mod 2**64), keyed by
    the seed, is >= round(p * 2**32). As Triton's randint4x splits a 64-bit
    offset, q enters Philox as the counter words (q mod 2**32, q // 2**32, 0, 0),
    so a counter below 2**32 gives the mask a 32-bit counter gave.
    The rows are those of a larger input from row `row_offset` on (an int or
    a 0-d integer tensor; 0: the input itself), so a shard of a batch gets the
    rows of the batch's mask.
    Seed and offset tensors are never read on the host: the mask is a function
    of the device values, so it serves a compiled graph.
    """
    seed = torch.as_tensor(seed, dtype=torch.int64)
    device = seed.device
    quads = (K + 3) // 4
    rows = torch.arange(M, dtype=torch.int64, device=device) + row_offset
    counter = rows[:, None] * quads + torch.arange(quads, dtype=torch.int64, device=device)[None, :]
    c0, c1 = counter & _U32, (counter >> 32) & _U32
    c2, c3 = torch.zeros_like(counter), torch.zeros_like(counter)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    words = torch.stack((c0, c1, c2, c3), dim=-1).reshape(M, 4 * quads)[:, :K]
    threshold = min(2**32 - 1, round(dropout_p * 2**32))
    return words >= threshold
