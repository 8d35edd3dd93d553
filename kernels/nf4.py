"""Dequantization of bitsandbytes' 4-bit weights (NF4, FP4) inside a kernel, one tile at a time.

The format is that of ``hybrid_lora.ops.nf4_reference`` (bitsandbytes'
``quantize_4bit``): the [N, K] weight flattened row-major, two 4-bit codebook
indices per byte (element 2i in the high nibble), one absmax per block of
BLOCKSIZE elements, and with double quantization (NESTED) the absmax as 8-bit
indices into a 256-entry code with one absmax2 per 256 of them plus an offset:

    absmax[b] = code2[qabsmax[b]] * absmax2[b // 256] + offset
    w[i]      = code[nibble(i)] * absmax[i // BLOCKSIZE]

``dequant_tile`` decodes the elements at any tile of flat indices, so a GEMM
reads W's 4-bit codes in its reduction loop and never writes a full-size W.
Where a tile's stretch of every weight row lies inside one block (rows whose
length K is a multiple of BLOCKSIZE, tiles no wider than a block), the GEMMs
load one scale per row (``block_scale``) instead of one per element.
The 16-entry codebook and the 256-entry nested code are gathers from global
memory: both stay in L1 for the whole launch.
"""

import torch
import triton
import triton.language as tl

from .tiling import cdiv


@triton.jit
def decode_codes(idx, mask, packed_ptr, code_ptr):
    """fp32 codebook values of the elements at the flat indices `idx` (int64 tile); 0 where `mask` is False."""
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    # Element 2i is the high nibble of byte i, element 2i + 1 the low one.
    nibble = (byte >> ((1 - (idx % 2)) * 4).to(tl.int32)) & 0xF
    return tl.load(code_ptr + nibble, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def block_scale(block, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, NESTED: tl.constexpr):
    """fp32 absmax of the blocks `block` (int64, any shape); 0 where `mask` is False."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        # Two roundings, as bitsandbytes: the product, then the sum with the offset.
        scaled = tl.load(code2_ptr + q, mask=mask, other=0.0).to(tl.float32) \
            * tl.load(absmax2_ptr + block // 256, mask=mask, other=0.0).to(tl.float32)
        return scaled + tl.load(offset_ptr).to(tl.float32)
    return tl.load(absmax_ptr + block, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def dequant_tile(idx, mask, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                 BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """fp32 values of the weight elements at the flat indices `idx` (int64 tile); 0 where `mask` is False.

    BLOCKSIZE is constexpr on purpose: bitsandbytes offers eight block sizes,
    and a constant power of two turns the block index into a shift.
    """
    return decode_codes(idx, mask, packed_ptr, code_ptr) \
        * block_scale(idx // BLOCKSIZE, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, NESTED)


def quant_args(quant):
    """(packed, code, absmax, absmax2, code2, offset) pointers of a ``Quant4bit``; unused ones stand in with absmax."""
    if quant.nested:
        return quant.packed, quant.code, quant.absmax, quant.absmax2, quant.code2, quant.offset
    return quant.packed, quant.code, quant.absmax, quant.absmax, quant.absmax, quant.absmax


@triton.jit
def _dequantize_kernel(
    # pointers
    out_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    # sizes
    numel,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[i] = w[i] for i < numel, in out's dtype (rounded once from fp32). Grid: (cdiv(numel, BLOCK),)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    w = dequant_tile(idx, mask, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                     BLOCKSIZE, NESTED)
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(quant, dtype=torch.float32):
    """The full weight [N, K] in `dtype` from a ``Quant4bit`` (for tests and for the unfused baseline)."""
    out = torch.empty(quant.shape, dtype=dtype, device=quant.packed.device)
    numel = out.numel()
    if numel == 0:
        return out
    block = 1024
    _dequantize_kernel[(cdiv(numel, block),)](out, *quant_args(quant), numel,
                                               BLOCKSIZE=quant.blocksize, NESTED=quant.nested, BLOCK=block)
    return out
