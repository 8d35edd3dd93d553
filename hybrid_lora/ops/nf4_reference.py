"""Plain PyTorch reference of bitsandbytes' 4-bit weight format (NF4 and FP4), and its dequantization.

The format (bitsandbytes' ``functional.quantize_4bit``; Dettmers et al., 2023,
"QLoRA", for NF4): the weight, flattened row-major (nn.Linear's [N, K], so
element (n, k) is number n * K + k), is cut into blocks of ``blocksize``
elements; block b keeps its absolute maximum absmax[b] (fp32) and each element
a 4-bit index into a 16-entry codebook ``code`` (NF4 or FP4, in [-1, 1]). Two
indices share a byte, element 2i in the high nibble and 2i + 1 in the low one:

    w[i] = code[nibble(packed[i // 2], i % 2)] * absmax[i // blocksize]   (fp32, then the compute dtype)

With double quantization (``compress_statistics``, "nested") the absmax are
themselves stored as 8-bit indices into a 256-entry code ``code2`` in blocks of
256 (``blocksize2``), with one fp32 absmax2 per block and an fp32 offset:

    absmax[b] = code2[qabsmax[b]] * absmax2[b // 256] + offset

Each product and sum is rounded to fp32 in that order, as bitsandbytes does,
so ``dequantize`` equals ``bitsandbytes.functional.dequantize_4bit`` bit for
bit (``tests/test_qlora_dequant.py``). This module imports no bitsandbytes:
``Quant4bit`` holds the tensors, and ``Quant4bit.from_bnb`` reads them from a
bitsandbytes ``QuantState``.
"""

from dataclasses import dataclass
from typing import Optional

import torch

QUANT_TYPES = ("nf4", "fp4")
# The blocksizes bitsandbytes' quantize_4bit makes.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Quant4bit:
    """A 4-bit weight of logical shape [N, K] (out_features, in_features), as bitsandbytes stores it.

    packed: uint8, (N * K + 1) // 2 bytes, any shape (bitsandbytes keeps [bytes, 1]);
    code: fp32 [16]; absmax: fp32 [blocks], or uint8 [blocks] when nested;
    nested: absmax2 fp32 [ceil(blocks / blocksize2)], code2 fp32 [256], offset fp32 0-d.
    """

    packed: torch.Tensor
    shape: tuple
    quant_type: str
    blocksize: int
    code: torch.Tensor
    absmax: torch.Tensor
    absmax2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    blocksize2: int = 256

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @classmethod
    def from_bnb(cls, packed, quant_state):
        """The tensors of a bitsandbytes (packed weight, QuantState) pair; nothing is copied."""
        state2 = quant_state.state2 if quant_state.nested else None
        return cls(packed=packed, shape=tuple(quant_state.shape), quant_type=quant_state.quant_type,
                   blocksize=int(quant_state.blocksize), code=quant_state.code, absmax=quant_state.absmax,
                   absmax2=state2.absmax if state2 is not None else None,
                   code2=state2.code if state2 is not None else None,
                   offset=quant_state.offset if state2 is not None else None,
                   blocksize2=int(state2.blocksize) if state2 is not None else 256)


def block_absmax(quant: Quant4bit) -> torch.Tensor:
    """The fp32 absmax of every block: stored, or decoded from the nested 8-bit codes."""
    if not quant.nested:
        return quant.absmax.float()
    index = torch.arange(quant.absmax.numel(), device=quant.absmax.device)
    scaled = quant.code2.float()[quant.absmax.reshape(-1).long()] * quant.absmax2.float()[index // quant.blocksize2]
    return scaled + quant.offset.float()


def codes(quant: Quant4bit) -> torch.Tensor:
    """The 4-bit index of every element, flattened: [N * K] int64 (high nibble first)."""
    packed = quant.packed.reshape(-1).view(torch.uint8).long()
    pairs = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)
    numel = quant.shape[0] * quant.shape[1] if len(quant.shape) == 2 else int(torch.Size(quant.shape).numel())
    return pairs[:numel]


def dequantize(quant: Quant4bit, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] in `dtype`: code[index] * absmax[block] in fp32, then rounded once to `dtype`."""
    index = codes(quant)
    absmax = block_absmax(quant)
    blocks = torch.arange(index.numel(), device=index.device) // quant.blocksize
    weight = quant.code.float()[index] * absmax[blocks]
    return weight.to(dtype).reshape(quant.shape)
