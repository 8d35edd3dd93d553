"""Forward of the fused LoRA layer over a 4-bit frozen weight (QLoRA): Y = X W4^T + b + s * D(X) A[:, :r] B[:r, :].

W4 is bitsandbytes' 4-bit [N, K] weight (nn.Linear's layout, NF4 or FP4,
nested absmax or not; see ``nf4``). As ``lora_forward`` but for the frozen
operand: the GEMM's reduction loop loads the packed codes of a BLOCK_K x
BLOCK_N tile of W^T (half a byte per element), decodes them in registers
(``nf4.dequant_tile``) and feeds the tile to ``tl.dot`` in X's dtype. No
full-size W is ever written: the weight is read once per output tile, at a
quarter of a bf16 weight's bytes. This is the fusion that a dequantize-then-matmul
design (QLoRA under peft; unsloth's ``fast_lora``) does not make: it writes
the dequantized weight to memory and reads it back.

Launches: ``skinny.skinny_product`` (S = D(X) A_r, kept for the backward),
then ``_qlora_forward_kernel``, whose reduction continues over the rank with
S and s B as ``lora_forward``'s does. Rank, scale and seed are 0-d device
tensors, so one compiled kernel serves every rank; with ``snapshot`` the
skinny kernel also copies the rank, scale and row offset it reads for the
backward (see ``lora_forward``).
"""

import torch
import triton
import triton.language as tl

from .configs import gemm_configs, m_bucket, rank_block
from .nf4 import block_scale, decode_codes, dequant_tile, quant_args
from .skinny import device_scalar, dot_precision, skinny_product
from .tiling import cdiv, grouped_tile


@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "N", "K", "BLOCK_R", "BLOCKSIZE", "NESTED"])
@triton.jit(do_not_specialize=["M_BUCKET"])
def _qlora_forward_kernel(
    # pointers
    x_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    bias_ptr, s_ptr, b_ptr, y_ptr, rank_ptr, scale_ptr,
    # sizes (M_BUCKET: the autotune key's m_bucket(M), not read)
    M, N, K, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_sm, stride_sr, stride_br, stride_bn, stride_ym, stride_yn, stride_bias,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ROWS_IN_BLOCKS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y = X W^T + bias + S (scale B[:rank, :]).

    X: [M, K], W: the 4-bit [N, K] weight (element (n, k) at flat index
    n * K + k), bias: [N], S: [M, R] (unscaled), B: [R, N], Y: [M, N];
    rank and scale: 0-d device tensors. ROWS_IN_BLOCKS: K is a multiple of BLOCKSIZE (no block spans
    two rows of W). Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),).
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    # int64: N * K passes 2**31 for the widest layers of large models.
    col_start = cols.to(tl.int64) * K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        idx = col_start[None, :] + ks[:, None]
        w_ok = k_ok[:, None] & col_ok[None, :]
        if ROWS_IN_BLOCKS and BLOCKSIZE % BLOCK_K == 0:
            # k0 .. k0 + BLOCK_K of row n lie in block (n K + k0) / BLOCKSIZE: one scale per row of W.
            scale_n = block_scale((col_start + k0) // BLOCKSIZE, col_ok, absmax_ptr, absmax2_ptr, code2_ptr,
                                  offset_ptr, NESTED)
            w = decode_codes(idx, w_ok, packed_ptr, code_ptr) * scale_n[None, :]
        else:
            w = dequant_tile(idx, w_ok, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                             BLOCKSIZE, NESTED)
        # Rounded once to X's dtype, as bitsandbytes' dequantize_4bit rounds to the compute dtype.
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)

    rank = tl.load(rank_ptr).to(tl.int32)
    scale = tl.load(scale_ptr).to(tl.float32)
    for r0 in tl.range(0, rank, BLOCK_R, num_stages=1):  # one or two steps: not pipelined
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


def qlora_forward(x, quant, bias, lora_a, lora_b, rank, scale, dropout_p, seed, row_offset=None, snapshot=False):
    """Launch the fused 4-bit forward. Inputs are already validated by the caller.

    x: [M, K] in the compute dtype; quant: a ``Quant4bit`` of shape [N, K];
    bias: [N] in x's dtype (any stride) or None; lora_a: [K, R], lora_b: [R, N];
    rank, scale, seed, row_offset, snapshot: as ``lora_forward``.
    Returns (Y [M, N], S [M, R]) in x's dtype, S unscaled and zero past the rank;
    with `snapshot`, (Y, S, (rank, scale, row_offset)), the 0-d copies
    ``lora_forward`` returns, for the backward.
    """
    M, K = x.shape
    N = quant.shape[0]
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
    s_down = skinny_product(x, lora_a, rank, 1.0 / (1.0 - dropout_p), dropout_p, seed, row_offset,
                            snapshot=(scale, *snaps) if snapshot else None)

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    _qlora_forward_kernel[grid](
        x, *quant_args(quant), bias if bias is not None else y, s_down, lora_b, y, rank, scale,
        M, N, K, m_bucket(M),
        x.stride(0), x.stride(1), s_down.stride(0), s_down.stride(1), lora_b.stride(0), lora_b.stride(1),
        y.stride(0), y.stride(1), bias.stride(0) if bias is not None else 0,
        BLOCKSIZE=quant.blocksize, NESTED=quant.nested, ROWS_IN_BLOCKS=K % quant.blocksize == 0,
        HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R),
    )
    return (y, s_down, snaps) if snapshot else (y, s_down)
