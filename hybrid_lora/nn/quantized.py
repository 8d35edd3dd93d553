"""``LoRALinear4bit``: the LoRA layer of runtime rank over a bitsandbytes 4-bit ``Linear4bit`` (QLoRA).

``inject_lora`` builds one for every selected ``bnb.nn.Linear4bit`` (a model
loaded with ``BitsAndBytesConfig(load_in_4bit=True, ...)``): it keeps the
module's packed 4-bit ``weight`` Parameter (``Params4bit``, with its
``quant_state``) and its ``bias``, not copies, and runs ``fused_lora_4bit``,
which decodes the weight tile by tile inside the GEMMs. Rank, scale, dropout,
``set_rank`` and ``truncate_`` are ``LoRALayer``'s. As bitsandbytes' layer,
the input is cast to the module's ``compute_dtype`` (the input's own dtype
when it has none) and the output back to the input's dtype.

What differs from ``LoRALinear``: ``merge`` refuses (the adapter cannot be
folded into 4-bit codes without requantizing the base), and
``frozen_weight()`` is a dequantized dense copy of W [in, out] in the compute
dtype, so ``merged_weight()`` (the merged export) gives W + s A B densely.
8-bit layers (``Linear8bitLt``) are refused by ``quantized_layer_class`` in one line.

bitsandbytes is imported only when a model already holds its modules:
without it no module can be a ``Linear4bit``.
"""

import sys

import torch

from hybrid_lora.nn.layer import LoRALayer
from hybrid_lora.nn.scaling import DEFAULT_RULE
from hybrid_lora.ops.fused_lora_4bit import fused_lora_4bit
from hybrid_lora.ops.nf4_reference import Quant4bit, dequantize


def bnb_modules():
    """bitsandbytes' ``nn`` module if bitsandbytes is imported already, else None (nothing is imported)."""
    if "bitsandbytes" not in sys.modules:
        return None
    import bitsandbytes

    return bitsandbytes.nn


def quantized_layer_class(module):
    """``LoRALinear4bit`` for a bitsandbytes ``Linear4bit``, None for any other module; 8-bit layers raise."""
    bnb_nn = bnb_modules()
    if bnb_nn is None:
        return None
    if isinstance(module, bnb_nn.Linear4bit):
        return LoRALinear4bit
    if isinstance(module, bnb_nn.Linear8bitLt):
        raise TypeError("inject_lora: bitsandbytes' 8-bit Linear8bitLt is not supported; load the base in 4 bits "
                        "(load_in_4bit=True) or in 16 bits")
    return None


def quant_of(weight) -> Quant4bit:
    """The ``Quant4bit`` view of a ``Params4bit`` (nothing is copied); one line if it holds no quantized state."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError("LoRALinear4bit: the weight holds no quant_state; quantize the model (move it to the "
                         "device, or load it with load_in_4bit=True) before the layer runs")
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a CPU weight for its own inference kernel (AVX512-BF16 machines); undo it.
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        state = weight.quant_state
    return Quant4bit.from_bnb(weight.data, state)


class LoRALinear4bit(LoRALayer):
    """Drop-in for ``bnb.nn.Linear4bit``: a 4-bit weight [out, in] (packed) plus an adapter of runtime rank.

    The adapter (``lora_a`` [in, r_max], ``lora_b`` [r_max, out]) is fp32 by
    default (``adapter_dtype``), as peft keeps QLoRA adapters; the kernels
    compute its products in the compute dtype with fp32 accumulation.
    """

    def __init__(self, base, r_max=64, alpha=32.0, dropout=0.0, scale_rule=DEFAULT_RULE,
                 adapter_dtype=torch.float32):
        if getattr(base.weight, "quant_state", None) is None:
            raise ValueError("LoRALinear4bit: the Linear4bit holds no quant_state (not quantized yet); load the "
                             "model with load_in_4bit=True or move it to its device first")
        device = base.weight.device
        # LoRALayer sizes the adapter and the scale from the weight it is given: a one-element stand-in of the
        # adapter's dtype, replaced by the 4-bit Parameter itself right after.
        super().__init__(torch.empty(0, dtype=adapter_dtype, device=device), base.bias, base.in_features,
                         base.out_features, r_max, alpha, dropout, scale_rule)
        self.weight = base.weight.requires_grad_(False)
        self.compute_dtype = base.compute_dtype if getattr(base, "compute_type_is_set", True) else None
        self.quant_type = base.weight.quant_state.quant_type

    @classmethod
    def from_module(cls, module, r_max=64, alpha=32.0, dropout=0.0, scale_rule=DEFAULT_RULE):
        return cls(module, r_max=r_max, alpha=alpha, dropout=dropout, scale_rule=scale_rule)

    def quant(self) -> Quant4bit:
        return quant_of(self.weight)

    def frozen_weight(self):
        """W as [in, out], dequantized: a dense copy in the compute dtype (the 4-bit weight has no view of it)."""
        return dequantize(self.quant(), self.compute_dtype or torch.float32).t()

    def merge(self):
        raise RuntimeError("LoRALinear4bit.merge: the adapter cannot be folded into a 4-bit weight; "
                           "merged_weight() gives the dense merged weight instead")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # As bitsandbytes' Linear4bit: the quantization state goes next to the packed weight, so the base keeps
        # its checkpoint keys.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = getattr(self.weight, "quant_state", None)
        if state is not None:
            for key, value in state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def forward(self, x):  # (..., in) -> (..., out)
        dtype = self.compute_dtype or x.dtype
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        y = fused_lora_4bit(
            x.to(dtype), self.quant(), bias, self.lora_a, self.lora_b, rank=self.rank_tensor,
            scale=self.scale_tensor, dropout_p=self.dropout if self.training else 0.0, seed=None,
            row_offset=self.dropout_row_offset,
        )
        return y.to(x.dtype)

    def extra_repr(self):
        return f"{super().extra_repr()}, quant_type={self.quant_type}, compute_dtype={self.compute_dtype}"
