"""Loading a base model in 4 bits (bitsandbytes NF4/FP4, QLoRA): the settings; one line when bitsandbytes is missing.

``load_causal_lm(..., quantization=Quantization(...))`` passes transformers a
``BitsAndBytesConfig(load_in_4bit=True, ...)``: every linear layer of the base
(GPT-2's Conv1D too) becomes a bitsandbytes ``Linear4bit``, which ``inject_lora``
wraps with ``LoRALinear4bit``. The adapter is the same as over a 16-bit base:
``lora_a`` [in, r_max] and ``lora_b`` [r_max, out] in fp32.
"""

import importlib.util
from dataclasses import dataclass

import torch

from hybrid_lora.errors import BadValue, Unavailable
from hybrid_lora.ops.nf4_reference import QUANT_TYPES

QLORA_EXTRA = 'pip install -e ".[qlora]"'


@dataclass(frozen=True)
class Quantization:
    quant_type: str = "nf4"  # the 4-bit codebook: "nf4" (QLoRA's NormalFloat) or "fp4"
    double_quant: bool = False  # bitsandbytes' compress_statistics: the block absmax stored in 8 bits too
    compute_dtype: torch.dtype = torch.float32  # the dtype the weight is decoded to and multiplied in

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise BadValue(f"4-bit quant type {self.quant_type!r}; expected one of {QUANT_TYPES}")


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def require_bitsandbytes(what="--load-in-4bit"):
    """Raise Unavailable, one line naming the extra, when bitsandbytes is not installed."""
    if not bitsandbytes_installed():
        raise Unavailable(f"{what} needs bitsandbytes, which is not installed: {QLORA_EXTRA}")


def from_pretrained_kwargs(quantization, device):
    """The from_pretrained arguments that load the base in 4 bits onto `device` (quantized as it loads)."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type,
                                bnb_4bit_use_double_quant=quantization.double_quant,
                                bnb_4bit_compute_dtype=quantization.compute_dtype)
    return {"quantization_config": config, "device_map": {"": str(device)}}
