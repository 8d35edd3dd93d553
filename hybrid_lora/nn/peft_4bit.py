"""peft's QLoRA layers (``peft.tuners.lora.bnb.Linear4bit``) on ``fused_lora_4bit``, for ``accelerate``.

peft's 4-bit LoRA forward (peft/tuners/lora/bnb.py) is, for one active adapter a,

    y = base_layer(x) + (lora_B[a](lora_A[a](lora_dropout[a](x))) * scaling[a]).to(y.dtype)

where ``base_layer`` is bitsandbytes' ``Linear4bit``: x cast to its compute dtype, times the
dequantized 4-bit weight, plus the bias, cast back to x's dtype. That is

    y = fused_lora_4bit(x_c, W4, b_c, lora_A.weight.T, lora_B.weight.T, rank=r, scale=scaling[a],
                        dropout_p=p).to(x.dtype)

with x_c and b_c in the compute dtype. The adapter runs in the compute dtype with fp32
accumulation where peft runs it in the adapter's (fp32 by default): equal in fp32, the
rounding of a bf16 product otherwise, as for 16-bit layers. Everything else follows
``hybrid_lora.nn.peft``: the plan is read at every call and any call the op would not
compute as peft does (several adapters, merged, DoRA or another variant, lora_bias,
``adapter_names``, a hooked base, a storage or quant type the op refuses) runs peft's
forward; the patch is a subclass of peft's class that overrides ``forward`` only.
8-bit layers (``Linear8bitLt``) and other quantizers are left to peft, named in
``accelerate``'s warning.
"""

import functools

import torch
from torch import nn

from hybrid_lora.nn.peft import _constants, _plain
from hybrid_lora.ops.fused_lora import _FLOAT_DTYPES
from hybrid_lora.ops.fused_lora_4bit import fused_lora_4bit
from hybrid_lora.ops.nf4_reference import QUANT_TYPES, Quant4bit

_LINEAR, _DROPOUTS = (nn.Linear,), (nn.Dropout, nn.Identity)


def _peft_4bit_class():
    """peft's ``lora.bnb.Linear4bit``, or None when peft or bitsandbytes is missing."""
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return None
    return getattr(peft_bnb, "Linear4bit", None)


@functools.cache
def _bnb_linear4bit():
    import bitsandbytes

    return (bitsandbytes.nn.Linear4bit,)


def is_peft_4bit(module) -> bool:
    """Whether `module` is exactly peft's 4-bit LoRA layer, or one ``accelerate`` patched."""
    cls = _peft_4bit_class()
    return cls is not None and (type(module) is cls or is_patched(module))


def is_patched(module) -> bool:
    cls = type(module)
    return cls.__module__ == __name__ and cls.__qualname__ == "_FusedLinear4bit"


def _plan(layer, x, args, kwargs):
    """(arguments of the op, None) when it computes peft's forward for this call, else (None, why)."""
    if layer.disable_adapters:
        return None, "adapters disabled"
    if layer.merged:
        return None, "merged"
    if args or any(value is not None for value in kwargs.values()):
        return None, "adapter_names or other forward arguments"
    modules = layer._modules
    lora_as = modules["lora_A"]._modules
    names = [name for name in layer.active_adapters if name in lora_as]
    if len(names) != 1:
        return None, f"{len(names)} active adapters"
    name = names[0]
    if layer.use_dora.get(name, False) or getattr(layer, "lora_variant", {}).get(name) is not None:
        return None, "DoRA or another lora_variant"
    lora_a, lora_b, dropout = lora_as[name], modules["lora_B"]._modules[name], modules["lora_dropout"]._modules[name]
    if getattr(layer, "lora_bias", {}).get(name, False) or lora_b._parameters.get("bias") is not None:
        return None, "lora_bias"
    if not (_plain(lora_a, _LINEAR) and _plain(lora_b, _LINEAR) and lora_a._parameters.get("bias") is None):
        return None, "lora_A or lora_B is not a plain nn.Linear"
    if not _plain(dropout, _DROPOUTS) or (type(dropout) is nn.Dropout and dropout.p >= 1.0):
        return None, f"lora_dropout is {type(dropout).__name__}"
    base = modules["base_layer"]
    if not _plain(base, _bnb_linear4bit()):
        return None, f"base layer {type(base).__name__} (or a hook on it)"
    weight = base._parameters["weight"]
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return None, "4-bit weight not quantized, or repacked for bitsandbytes' CPU inference"
    if state.quant_type not in QUANT_TYPES or weight.dtype != torch.uint8:
        return None, f"4-bit weight {state.quant_type} stored as {weight.dtype}"
    a, b = lora_a._parameters["weight"], lora_b._parameters["weight"]
    if a.dtype not in _FLOAT_DTYPES or b.dtype != a.dtype:
        return None, f"adapter dtypes {a.dtype}, {b.dtype}"
    if x is None:
        return (), None
    compute_dtype = base.compute_dtype if base.compute_type_is_set else None
    if (compute_dtype or x.dtype) not in _FLOAT_DTYPES:
        return None, f"input dtype {x.dtype}"
    dropout_p = dropout.p if type(dropout) is nn.Dropout and dropout.training else 0.0
    quant = Quant4bit.from_bnb(weight.data, state)
    return (quant, base._parameters.get("bias"), a.t(), b.t(), dropout_p, a.shape[0], layer.scaling[name],
            compute_dtype), None


def unsupported(layer, x=None, *args, **kwargs):
    """Why the op would not compute what peft's 4-bit forward(x, ...) computes, or None when it would."""
    return _plan(layer, x, args, kwargs)[1]


def _fused_call(layer, x, quant, bias, lora_a, lora_b, dropout_p, rank, scale, compute_dtype):
    rank, scale, row_offset = _constants(layer, x.device, rank, scale)
    dtype = compute_dtype or x.dtype
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    y = fused_lora_4bit(x.to(dtype), quant, bias, lora_a, lora_b, rank=rank, scale=scale, dropout_p=dropout_p,
                        row_offset=row_offset)
    return y.to(x.dtype)


@functools.cache
def fused_class():
    """The class of a patched 4-bit layer: peft's ``lora.bnb.Linear4bit`` with a forward on the fused op."""

    class Linear4bit(_peft_4bit_class()):
        """peft's QLoRA layer on ``fused_lora_4bit`` where that computes what peft does (``hybrid_lora.accelerate``)."""

        def forward(self, x, *args, **kwargs):
            call, _ = _plan(self, x, args, kwargs)
            if call is None:
                return super().forward(x, *args, **kwargs)
            return _fused_call(self, x, *call)

    Linear4bit.__qualname__ = "_FusedLinear4bit"
    Linear4bit.__module__ = __name__
    return Linear4bit


def __getattr__(name):
    # A pickled patched layer names its class hybrid_lora.nn.peft_4bit._FusedLinear4bit, made on first use.
    if name == "_FusedLinear4bit":
        return fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
