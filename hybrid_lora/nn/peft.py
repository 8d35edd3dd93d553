"""peft's LoRA layers on the fused op: ``accelerate(model)`` patches a peft model in place, ``restore`` undoes it.

For each active adapter a, peft's ``lora.Linear.forward`` (peft/tuners/lora/layer.py) computes

    y = base_layer(x) + lora_B[a](lora_A[a](lora_dropout[a](x))) * scaling[a]

with ``lora_A[a].weight`` [r, K], ``lora_B[a].weight`` [N, r] and ``scaling[a]`` = lora_alpha / r
(lora_alpha / sqrt(r) with ``use_rslora``). With one adapter, W the base weight as [K, N] and
p the dropout probability, that is the fused op at rank r:

    y = fused_lora(x, W, b, lora_A.weight.T, lora_B.weight.T, rank=r, scale=scaling[a], dropout_p=p)

The transposes are views (strides (1, K) and (1, r)) that the kernels read as they are, and
autograd hands the gradients back to peft's own Parameters in their layout. W is the base
layer's weight for ``transformers``' Conv1D (peft's ``fan_in_fan_out=True``: stored [K, N]) and
the transposed view of ``nn.Linear``'s [N, K] otherwise: the layout follows the base layer,
whose forward is what peft calls. Dropout runs as the op's Philox mask with the same p, in
training mode only, as ``nn.Dropout``; its seed is drawn from torch's generator on x's device
(``seed=None``), which ``torch.utils.checkpoint`` restores, so a recomputed forward draws the
same mask.

Every call follows the layer's state: which adapter is active and whether it runs as the op runs
(``merged``, ``disable_adapters``, DoRA, the modules' classes) is decided once per change of
peft's ``disable_adapters``, ``merged`` and ``active_adapters`` (what ``set_adapter``,
``disable_adapter()``, ``merge``/``unmerge`` and ``delete_adapter`` change), or of the modules in
the adapter's slots (``add_adapter``/``update_layer`` make new ones); the rest (its rank, its scale,
its dropout's p and mode, hooks, dtypes) is read at every call. Any call the op would not compute
exactly as peft does runs peft's own forward instead (``unsupported``).

A patched layer's class becomes a subclass of peft's ``lora.Linear`` that overrides
``forward`` only (named ``Linear`` too, so it prints as peft's does), and the layer holds a
cache of the rank and the scale as 0-d device tensors (a host number would be copied to the
device on every call) and of the structure decided for its state. No Parameter, buffer or hook
is added, so state dicts, ``save_pretrained``, ``merge_and_unload``, ``disable_adapter()`` and
``set_adapter`` are peft's; ``restore`` puts the class back and drops the caches. The class,
not an instance attribute ``forward``, carries the patch so that what copies a module carries it too:
``copy.deepcopy``, pickling, and ``nn.DataParallel``'s replicas, which share their original's
instance attributes and would run the original's parameters.
"""

import functools
import warnings

import torch
from torch import nn

from hybrid_lora.ops.fused_lora import _FLOAT_DTYPES, fused_lora  # the dtypes the op takes, and the op

_CACHE = "_hybrid_lora_constants"  # {device: (rank, scale, rank tensor, scale tensor, zero row offset)}
_STRUCTURE = "_hybrid_lora_structure"  # (_state_key, _structure): what was decided for the layer's state
_LISTED = 6  # layer names shown per reason in accelerate's message
_LINEAR, _DROPOUTS = (nn.Linear,), (nn.Dropout, nn.Identity)


def _lora_module():
    try:
        from peft.tuners.lora import layer
    except ImportError as error:
        raise ImportError("hybrid_lora.accelerate needs peft, which is not installed (pip install peft)") from error
    return layer


@functools.cache
def _base_classes():
    """The base layers the op stands in for: ``nn.Linear`` (W stored [N, K]) and ``transformers``' Conv1D ([K, N])."""
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, Conv1D


def _hooked(module):
    """Whether `module` runs anything besides its class's forward: hooks, or a forward of its own.

    Read from the instance's __dict__ (where nn.Module keeps its hooks): every call asks it four times.
    """
    state = module.__dict__
    return "forward" in state or bool(state["_forward_hooks"] or state["_forward_pre_hooks"]
                                      or state["_backward_hooks"] or state["_backward_pre_hooks"])


def _plain(module, classes):
    """Whether `module` is of one of `classes` exactly and runs that class's forward: no hook, no forward of its own."""
    return type(module) in classes and not _hooked(module)


def _structure(layer):
    """(adapter name, lora_A, lora_B, dropout module, base layer, None), or (None, ..., why): the part of the plan
    that depends on the layer's adapters and modules only, not on the call.

    The modules are those of the active adapter, whose class is checked here; their hooks and their
    parameters' dtypes are checked at every call (``_plan``).
    """
    unsupported = (None,) * 5
    if layer.disable_adapters:
        return (*unsupported, "adapters disabled")
    if layer.merged:
        return (*unsupported, "merged")
    modules = layer._modules
    lora_as = modules["lora_A"]._modules
    names = [name for name in layer.active_adapters if name in lora_as]
    if len(names) != 1:
        return (*unsupported, f"{len(names)} active adapters")
    name = names[0]
    if layer.use_dora.get(name, False):
        return (*unsupported, "DoRA")
    variant = getattr(layer, "lora_variant", {}).get(name)  # peft >= 0.15: DoRA and the other variants
    if variant is not None:
        return (*unsupported, f"lora_variant {type(variant).__name__}")
    lora_a, lora_b, dropout = lora_as[name], modules["lora_B"]._modules[name], modules["lora_dropout"]._modules[name]
    if getattr(layer, "lora_bias", {}).get(name, False) or lora_b._parameters.get("bias") is not None:
        return (*unsupported, "lora_bias")
    if not (type(lora_a) in _LINEAR and type(lora_b) in _LINEAR and lora_a._parameters.get("bias") is None):
        return (*unsupported, "lora_A or lora_B is not a plain nn.Linear")
    if type(dropout) not in _DROPOUTS:
        return (*unsupported, f"lora_dropout is {type(dropout).__name__}")
    base = modules["base_layer"]
    if type(base) not in _base_classes():
        return (*unsupported, f"base layer {type(base).__name__} (or a hook on it)")
    return name, lora_a, lora_b, dropout, base, None


def _state_key(layer):
    """What peft changes when the layer's structure changes: set_adapter, enable_adapters (``disable_adapter()``),
    merge and unmerge, delete_adapter; add_adapter and update_layer make new modules, compared at each call."""
    return layer.disable_adapters, layer.merged, layer.active_adapters


def _held_structure(layer, keep):
    """``_structure`` of the layer, decided again only when ``_state_key`` changes; with `keep` False, or in a
    trace (Dynamo guards on what it reads), decided now and the layer's __dict__ left alone."""
    if not keep or torch.compiler.is_compiling():
        return _structure(layer)
    key = _state_key(layer)
    held = layer.__dict__.get(_STRUCTURE)
    if held is None or held[0] != key:
        held = (key, _structure(layer))
        layer.__dict__[_STRUCTURE] = held
    return held[1]


def _plan(layer, x, args, kwargs):
    """(arguments of the op, None) when it computes what peft's forward computes for this call, else (None, why).

    The arguments: W [K, N], b, A [K, r], B [r, N] (views of peft's tensors), the dropout
    probability in effect, the rank and the scale. With x None only the layer's state is
    checked (what ``accelerate`` reports), and the arguments are left out. Every call runs
    this: the layer's structure is decided once per state (``_held_structure``); what peft or
    its user may change without a call peft makes (the modules in the adapter's slots, hooks,
    dtypes, the scale, the dropout's p and mode) is read at every call, once.
    """
    if args or (kwargs and any(value is not None for value in kwargs.values())):
        # adapter_names (a mixed batch), a variant's arguments, or arguments for the base layer
        return None, "adapter_names or other forward arguments"
    keep = x is not None  # accelerate's report of a layer it may not patch stores nothing in it
    name, lora_a, lora_b, dropout, base, why = _held_structure(layer, keep)
    if why is not None:
        return None, why
    # Modules through _modules: nn.Module.__getattr__, the way `layer.lora_A` finds them, costs
    # about a microsecond each, and this runs for every layer at every call.
    modules = layer._modules
    if not (modules["lora_A"]._modules.get(name) is lora_a and modules["lora_B"]._modules.get(name) is lora_b
            and modules["lora_dropout"]._modules.get(name) is dropout and modules["base_layer"] is base):
        # Modules replaced (update_layer, a replica's own copies): decide again for the new ones.
        layer.__dict__.pop(_STRUCTURE, None)
        name, lora_a, lora_b, dropout, base, why = _held_structure(layer, keep)
        if why is not None:
            return None, why
    if _hooked(lora_a) or _hooked(lora_b):
        return None, "lora_A or lora_B is not a plain nn.Linear"
    if _hooked(dropout):
        return None, f"lora_dropout is {type(dropout).__name__}"
    if _hooked(base):
        return None, f"base layer {type(base).__name__} (or a hook on it)"
    drops = type(dropout) is nn.Dropout
    if drops and dropout.p >= 1.0:
        return None, "lora_dropout is Dropout"
    weight, bias = base._parameters["weight"], base._parameters.get("bias")
    a, b = lora_a._parameters["weight"], lora_b._parameters["weight"]
    if weight.dtype not in _FLOAT_DTYPES or (bias is not None and bias.dtype != weight.dtype):
        return None, f"base weight dtype {weight.dtype}"
    if a.dtype not in _FLOAT_DTYPES or b.dtype != a.dtype:
        return None, f"adapter dtypes {a.dtype}, {b.dtype}"
    if x is None:
        return (), None
    # Devices are not compared: where they differ, peft's forward fails as the op does.
    # Under autocast the op casts x, W and b to the autocast dtype, as the base layer's autocast does;
    # where every dtype is x's there is nothing to cast, and autocast need not be asked.
    if (x.dtype != weight.dtype or a.dtype != x.dtype) and not torch.is_autocast_enabled(x.device.type):
        if x.dtype != weight.dtype:
            return None, f"input dtype {x.dtype} with weight dtype {weight.dtype}"
        # peft runs the adapter in its own dtype; the kernels read the adapter in x's dtype, or fp32
        # adapters with fp16/bf16 inputs (what get_peft_model's autocast_adapter_dtype makes).
        if not (a.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
            return None, f"adapter dtype {a.dtype} with input dtype {x.dtype}"
        if not getattr(layer, "cast_input_dtype_enabled", True):
            return None, "input dtype casting disabled"
    dropout_p = dropout.p if drops and dropout.training else 0.0
    weight = weight.t() if type(base) is nn.Linear else weight  # W as [K, N]: Conv1D's, or a view
    return (weight, bias, a.t(), b.t(), dropout_p, a.shape[0], layer.scaling[name]), None


def unsupported(layer, x=None, *args, **kwargs):
    """Why the fused op would not compute what peft's forward(x, *args, **kwargs) computes, or None when it would.

    With x None only the layer's state is checked.
    """
    return _plan(layer, x, args, kwargs)[1]


def _constants(layer, device, rank, scale):
    """(rank, scale, row offset 0) for the op: 0-d tensors on `device`, made once per value, or numbers in a graph."""
    if torch.compiler.is_compiling():
        return rank, scale, 0  # constants of the graph; a compiled graph copies nothing per call
    cache = layer.__dict__.setdefault(_CACHE, {})
    held = cache.get(device)
    if held is None or held[0] != rank or held[1] != scale:
        held = (rank, scale, torch.tensor(rank, dtype=torch.int64, device=device),
                torch.tensor(scale, dtype=torch.float64, device=device),
                torch.zeros((), dtype=torch.int64, device=device))
        cache[device] = held
    return held[2:]


def _fused_call(layer, x, weight, bias, lora_a, lora_b, dropout_p, rank, scale):
    rank, scale, row_offset = _constants(layer, x.device, rank, scale)
    return fused_lora(x, weight, bias, lora_a, lora_b, rank=rank, scale=scale, dropout_p=dropout_p,
                      row_offset=row_offset)


@functools.cache
def _fused_class():
    """The class of a patched layer: peft's ``lora.Linear`` with a forward that runs the fused op."""
    lora = _lora_module()

    class Linear(lora.Linear):
        """peft's ``lora.Linear`` on ``fused_lora`` where that computes what peft does (``hybrid_lora.accelerate``)."""

        def forward(self, x, *args, **kwargs):
            call, _ = _plan(self, x, args, kwargs)
            if call is None:
                return super().forward(x, *args, **kwargs)
            return _fused_call(self, x, *call)

    Linear.__qualname__ = "_FusedLinear"  # where pickle finds it: this module's __getattr__
    return Linear


def __getattr__(name):
    # A pickled patched layer names its class hybrid_lora.nn.peft._FusedLinear, made on first use.
    if name == "_FusedLinear":
        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_patched(module):
    cls = type(module)
    return (cls.__module__ == __name__ and cls.__qualname__ == "_FusedLinear") or peft_4bit.is_patched(module)


def _summary(left, total):
    by_reason = {}
    for name, reason in left.items():
        by_reason.setdefault(reason, []).append(name or "<model>")
    parts = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
        parts.append(f"{reason}: {shown}")
    return f"{len(left)} of {total} peft LoRA layers run peft's forward ({'; '.join(parts)})"


from hybrid_lora.nn import peft_4bit  # noqa: E402  (it imports this module's helpers)


def accelerate(model, strict=False):
    """Run the peft LoRA layers of `model` on ``fused_lora``, in place; returns `model`.

    Every ``lora.Linear`` over ``nn.Linear`` or ``transformers``' Conv1D is patched; each call
    then runs the op when it computes what peft computes (one active adapter, not merged, no
    DoRA or other variant, no lora_bias, no ``adapter_names``, a dtype the op takes), and
    peft's forward otherwise. The layers left to peft's forward, now, are named with their
    reason in one warning, or with `strict` in a ValueError (and nothing is patched).
    Calling it again is harmless; ``restore`` undoes it.
    """
    lora = _lora_module()
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, lora.LoraLayer)]
    if not layers:
        raise ValueError(f"hybrid_lora.accelerate: {type(model).__name__} holds no peft LoRA layer; expected a "
                         "model from peft.get_peft_model or peft.inject_adapter_in_model")
    patch, left = [], {}
    patch_4bit = []
    for name, module in layers:
        if peft_4bit.is_peft_4bit(module):  # peft's QLoRA layers: hybrid_lora/nn/peft_4bit.py
            patch_4bit.append(module)
            if peft_4bit.unsupported(module) is not None:
                left[name] = peft_4bit.unsupported(module)
            continue
        if type(module) is not lora.Linear and not _is_patched(module):
            left[name] = f"a {type(module).__name__} layer"
        elif "forward" in module.__dict__:
            left[name] = "forward replaced by another library"
        elif not _plain(module.base_layer, _base_classes()):
            left[name] = f"base layer {type(module.base_layer).__name__} (or a hook on it)"
        else:
            # Patched even when its state is not supported now: merged, or several adapters active,
            # may change (unmerge, set_adapter), and each call checks again.
            patch.append(module)
            reason = unsupported(module)
            if reason is not None:
                left[name] = reason
    if left:
        message = f"hybrid_lora.accelerate: {_summary(left, len(layers))}"
        if strict:
            raise ValueError(message + "; strict=True")
        warnings.warn(message, stacklevel=2)
    for module in patch:
        module.__class__ = _fused_class()
    for module in patch_4bit:
        module.__class__ = peft_4bit.fused_class()
    return model


def restore(model):
    """Undo ``accelerate``: each patched layer runs peft's forward again, with nothing of ours left. Returns `model`."""
    for module in model.modules():
        if _is_patched(module):
            module.__class__ = type(module).__bases__[0]
        module.__dict__.pop(_CACHE, None)
        module.__dict__.pop(_STRUCTURE, None)
    return model


def accelerated_layers(model):
    """The layers of `model` that ``accelerate`` patched, in module order."""
    return [module for module in model.modules() if _is_patched(module)]
