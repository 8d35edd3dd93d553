"""Our 4-bit dequantization (the PyTorch reference and the Triton kernel) against bitsandbytes' own."""

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed (extra qlora)")

from hybrid_lora.kernels import nf4  # noqa: E402
from hybrid_lora.ops.nf4_reference import Quant4bit, codes, dequantize  # noqa: E402

SHAPES = [(7, 33), (5, 130), (64, 96), (3, 1)]  # odd element counts, not multiples of a row times a block
BLOCKSIZES = [64, 128, 32, 256]


def quantized(shape, quant_type, nested, blocksize, dtype=torch.float32, seed=0):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3
    packed, state = bnb_functional.quantize_4bit(weight.to(dtype), blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested)
    return packed, state


def assert_bitwise(got, want):
    """Bit for bit, except the sign of zero: bitsandbytes' native kernels decode FP4's index 8 as -0, its
    PyTorch fallback (odd last dimensions) and the QuantState's codebook as +0."""
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = got + 0.0, want + 0.0  # -0 + 0 = +0; every other value unchanged
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[got.dtype]
    differ = got.view(bits) != want.view(bits)
    assert not differ.any(), f"{int(differ.sum())} elements differ, first {got[differ][:4]} vs {want[differ][:4]}"


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_equals_bitsandbytes(quant_type, nested, blocksize):
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            packed, state = quantized(shape, quant_type, nested, blocksize, dtype)
            want = bnb_functional.dequantize_4bit(packed, state)
            assert_bitwise(dequantize(Quant4bit.from_bnb(packed, state), dtype), want)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_kernel_equals_bitsandbytes(quant_type, nested, nan_outputs):
    for shape, blocksize in zip(SHAPES, BLOCKSIZES):
        for dtype in (torch.float32, torch.float16):
            packed, state = quantized(shape, quant_type, nested, blocksize, dtype, seed=1)
            want = bnb_functional.dequantize_4bit(packed, state)
            assert_bitwise(nf4.dequantize(Quant4bit.from_bnb(packed, state), dtype), want)


def test_codes_are_high_nibble_first():
    quant = Quant4bit(packed=torch.tensor([[0x1F], [0xA0]], dtype=torch.uint8), shape=(1, 3), quant_type="nf4",
                      blocksize=64, code=torch.arange(16.0), absmax=torch.ones(1))
    assert codes(quant).tolist() == [1, 15, 10]
    assert dequantize(quant).tolist() == [[1.0, 15.0, 10.0]]


def test_nested_absmax_uses_the_offset_and_second_level_blocks():
    # 300 blocks of 64: the second level has two blocks of 256, so block 299 reads absmax2[1].
    packed, state = quantized((300, 64), "nf4", True, 64)
    quant = Quant4bit.from_bnb(packed, state)
    assert quant.absmax2.numel() == 2
    want = bnb_functional.dequantize_4bit(packed, state)
    assert_bitwise(dequantize(quant), want)
