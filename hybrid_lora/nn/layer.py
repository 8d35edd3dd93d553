"""LoRA layers of runtime rank over one fused op: drop-ins for ``nn.Linear`` and ``transformers``' Conv1D.

Both kinds keep the frozen ``weight`` and ``bias`` of the module they replace
under the same names (the same Parameter objects, not copies), so the base
model's state dict loads unchanged and tied weights stay tied. They differ
only in the weight's layout: Conv1D stores [in, out], ``nn.Linear`` stores
[out, in], whose transpose is a strided [in, out] view that the kernels read
as it is (no copy). The adapter is the same for both: ``lora_a`` [in, r_max]
and ``lora_b`` [r_max, out]; the active ``rank`` r <= r_max selects the
leading components and the scale follows ``scale_rule`` (see ``scaling``):
alpha / r by default, as in peft (and as DyLoRA, Valipour et al., EACL 2023,
scales a truncated rank b by alpha / b). ``scale_r_max``, the width the rule's
"fixed" form divides by, is the width the adapter was made with and survives a cut.

``inject_lora`` selects modules as ``peft``'s ``LoraConfig.target_modules``
does: a string is a regular expression that must match the whole module name
(``re.fullmatch``), or ``"all-linear"`` for every Linear and Conv1D except the
output embedding; a list names modules by their full name or by a suffix that
starts after a '.'.

The rank and the scale the op reads live in 0-d buffers on the layer's device,
written in place: ``set_rank`` changes their values, not their addresses. A
compiled model (and its CUDA graphs) therefore serves every rank with one
graph; ``rank`` and ``scale`` stay readable as Python numbers on the host.

LoRA dropout draws each call's seed on the input's device from torch's
generator there, as ``torch.nn.functional.dropout`` draws its mask: no host
read, a new mask per call, ``torch.manual_seed`` repeats them, a training
checkpoint that saves torch's generator states resumes them, and activation
checkpointing (``torch.utils.checkpoint``, reentrant or not, which
transformers' ``gradient_checkpointing_enable`` uses) restores the generator
before it recomputes a forward, which therefore draws the forward's mask.
Under ``torch.compile`` the draw is a graph op like any other random op:
Inductor draws it from its own generator (seeded from torch's), so a compiled
run drops other elements than an eager one, and in a checkpointed region its
backward recomputes the draw from the seeds its forward drew and saved, which
gives the forward's mask again.
The mask is keyed on the row of the batch (``set_dropout_row_offset``), so
the processes of a data-parallel run that each hold rows of one batch drop
what one process given the whole batch would.
"""

import math
import re

import torch
from torch import nn

from hybrid_lora.nn.scaling import DEFAULT_RULE, check_rule, lora_scale
from hybrid_lora.ops.fused_lora import fused_lora
from hybrid_lora.ops.reference import merged_weight

ALL_LINEAR = "all-linear"


def check_rank(rank, r_max, where):
    """Raise, naming `where`, unless `rank` is an integer in [1, r_max]: the one rank check of the package."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_max:
        raise ValueError(f"{where}: rank {rank!r} is outside [1, {r_max}] (r_max)")


def _scale_dtype(adapter_dtype):
    """fp32, what the kernels read, or fp64 for an fp64 adapter, whose PyTorch path is then exact.

    Not fp64 always: on a CPU, Dynamo takes a 0-d fp64 tensor for a wrapped Python float
    and restarts its first trace (tests/test_compile_restart.py).
    """
    return torch.float64 if adapter_dtype == torch.float64 else torch.float32


class LoRALayer(nn.Module):
    """The adapter, its rank and merging, over a frozen weight seen as W [in, out] by ``frozen_weight()``.

    Subclasses say only how the stored ``weight`` maps to W [in, out]; every
    other behaviour, and the one call of the op, lives here.
    """

    def __init__(self, weight, bias, in_features, out_features, r_max=64, alpha=32.0, dropout=0.0,
                 scale_rule=DEFAULT_RULE):
        super().__init__()
        kind = type(self).__name__
        if int(r_max) < 1:
            raise ValueError(f"{kind}: r_max={r_max}; expected an integer >= 1")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"{kind}: dropout={dropout}; expected a probability in [0, 1)")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"{kind}: bias has shape {tuple(bias.shape)}; expected ({out_features},)")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = _frozen(weight)
        self.bias = _frozen(bias) if bias is not None else None
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(self.in_features, int(r_max), **factory))
        self.lora_b = nn.Parameter(torch.zeros(int(r_max), self.out_features, **factory))
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.scale_rule = check_rule(scale_rule)
        self.scale_r_max = int(r_max)
        self.merged = False
        self.weight_is_shared = False  # set by inject_lora when another module holds the same weight (tied)
        # Not in the state dict: rank and scale follow from the host's rank, the row offset from the batch.
        device = weight.device
        self.register_buffer("rank_tensor", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("scale_tensor", torch.zeros((), dtype=_scale_dtype(weight.dtype), device=device),
                             persistent=False)
        # Row of the batch that the input's first row is (see set_dropout_row_offset).
        self.register_buffer("dropout_row_offset", torch.zeros((), dtype=torch.int64, device=device),
                             persistent=False)
        self.row_offset = 0
        self._write_rank(int(r_max))
        self.reset_lora_parameters()

    @classmethod
    def from_module(cls, module, r_max=64, alpha=32.0, dropout=0.0, scale_rule=DEFAULT_RULE):
        """Wrap `module` (a Conv1D for LoRAConv1D, an ``nn.Linear`` for LoRALinear), holding its weight and
        bias Parameters."""
        return cls(module.weight, module.bias, r_max=r_max, alpha=alpha, dropout=dropout, scale_rule=scale_rule)

    def frozen_weight(self):
        """W as [in, out]: the stored weight or a transposed view of it, never a copy."""
        raise NotImplementedError

    def reset_lora_parameters(self):
        """A ~ Kaiming-uniform with fan_in = in_features (peft's init of lora_A), B = 0."""
        # peft initialises lora_A.weight [r, in] with kaiming_uniform_(a=sqrt(5)),
        # whose bound is 1 / sqrt(fan_in); our A is its transpose, so fan_in is dim 0.
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.lora_a.uniform_(-bound, bound)
            self.lora_b.zero_()

    @property
    def r_max(self):
        return self.lora_a.shape[1]

    def compute_scale(self, rank):
        """The LoRA scale at `rank` by the layer's rule (``scaling``). The one place the layer's scale is defined."""
        return lora_scale(self.scale_rule, self.alpha, rank, self.scale_r_max)

    @property
    def scale(self):
        return self.compute_scale(self.rank)

    @torch.no_grad()
    def _write_rank(self, r):
        """Make r the active rank: on the host, and in place in the buffers the op reads (no host sync)."""
        self.rank = r
        self.rank_tensor.fill_(r)
        self.scale_tensor.fill_(self.compute_scale(r))

    def _apply(self, fn, recurse=True):
        # module.half() would round the scale and module.double() widen a rounded one: recompute it.
        super()._apply(fn, recurse)
        dtype = _scale_dtype(self.lora_a.dtype)
        if self.scale_tensor.dtype != dtype:
            self.scale_tensor = torch.full((), self.compute_scale(self.rank), dtype=dtype,
                                           device=self.scale_tensor.device)
        return self


    def _check_rank(self, r, what):
        check_rank(r, self.r_max, f"{type(self).__name__}.{what}")
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.{what}: the adapter is merged into the weight; "
                               "call unmerge() first")

    def set_rank(self, r):
        """Use the leading r components (scale by the layer's rule). Nothing is recompiled or reallocated."""
        self._check_rank(r, "set_rank")
        self._write_rank(r)

    @torch.no_grad()
    def set_dropout_row_offset(self, rows):
        """Draw dropout masks for inputs that are rows [rows, rows + M) of a larger batch (x flattened to [M, in]).

        A process of a data-parallel group that holds examples [s, e) of a
        batch of sequences of length T passes s * T: its masks are then the
        rows of the batch's masks. Written in place, like the rank (no recompile).
        """
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"{type(self).__name__}.set_dropout_row_offset: rows {rows!r}; expected an integer >= 0")
        if rows != self.row_offset:
            self.row_offset = rows
            self.dropout_row_offset.fill_(rows)

    @torch.no_grad()
    def truncate_(self, r):
        """Keep only the leading r components: r_max and rank become r. Returns {old Parameter: new Parameter}.

        ``lora_a`` and ``lora_b`` become new Parameters (without gradients), so
        anything holding the old ones (an optimizer, DDP) must take the new ones:
        ``dynamic_rank.truncate_adapters`` carries an optimizer along. Shrinking
        ``.data`` in place instead would keep the module's parameter dict as it
        was, and Dynamo on torch 2.11 skips the tensor guards of an unchanged
        dict (pytorch#163064): a graph compiled for the old width would replay.
        """
        self._check_rank(r, "truncate_")
        replaced = {}
        for name, keep in (("lora_a", (slice(None), slice(0, r))), ("lora_b", (slice(0, r),))):
            old = getattr(self, name)
            kept = old.detach()[keep].clone(memory_format=torch.contiguous_format)  # not a view of the old storage
            replaced[old] = nn.Parameter(kept, requires_grad=old.requires_grad)
            setattr(self, name, replaced[old])
        self._write_rank(r)
        return replaced

    def delta_weight(self):
        """s A[:, :r] B[:r, :] in fp32: the adapter as a dense [in, out] update (the layout of W, for both kinds)."""
        return merged_weight(
            torch.zeros(self.in_features, self.out_features, dtype=torch.float32, device=self.weight.device),
            self.lora_a.float(), self.lora_b.float(), self.rank, self.scale,
        )

    def merged_weight(self):
        """W + s A[:, :r] B[:r, :] as [in, out], in W's dtype."""
        w = self.frozen_weight()
        return (w.float() + self.delta_weight()).to(w.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the adapter at the active rank into the frozen weight (for inference)."""
        name = type(self).__name__
        if self.merged:
            raise RuntimeError(f"{name}.merge: already merged")
        if self.weight_is_shared:
            raise RuntimeError(f"{name}.merge: the weight is tied to another module's (an embedding?); "
                               "merging would change both")
        self.frozen_weight().copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take the adapter back out of the weight."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge: not merged")
        w = self.frozen_weight()
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def forward(self, x):  # (..., in) -> (..., out)
        if self.merged:
            out = x.reshape(-1, self.in_features) @ self.frozen_weight()
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(x.shape[:-1] + (self.out_features,))
        # seed=None: the op draws it from torch's generator on x's device (see the module docstring).
        return fused_lora(
            x, self.frozen_weight(), self.bias, self.lora_a, self.lora_b, rank=self.rank_tensor,
            scale=self.scale_tensor, dropout_p=self.dropout if self.training else 0.0, seed=None,
            row_offset=self.dropout_row_offset,
        )

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, r_max={self.r_max}, "
                f"alpha={self.alpha}, scale_rule={self.scale_rule}, dropout={self.dropout}, merged={self.merged}")


def _frozen(tensor):
    """`tensor` as a frozen Parameter: the Parameter itself when it is one (shared, not copied)."""
    if isinstance(tensor, nn.Parameter):
        return tensor.requires_grad_(False)
    return nn.Parameter(tensor.detach(), requires_grad=False)


class LoRAConv1D(LoRALayer):
    """Drop-in for ``transformers.pytorch_utils.Conv1D``: weight [in, out] (nx = in, nf = out)."""

    def __init__(self, weight, bias=None, r_max=64, alpha=32.0, dropout=0.0, scale_rule=DEFAULT_RULE):
        """weight: [in, out] frozen; bias: [out] or None; r_max: adapter width; dropout: LoRA dropout on x."""
        if weight.dim() != 2:
            raise ValueError(f"LoRAConv1D: weight has shape {tuple(weight.shape)}; expected [in, out]")
        super().__init__(weight, bias, weight.shape[0], weight.shape[1], r_max, alpha, dropout, scale_rule)

    @classmethod
    def from_conv1d(cls, conv, **kwargs):
        return cls.from_module(conv, **kwargs)

    @property
    def nx(self):
        return self.in_features

    @property
    def nf(self):
        return self.out_features

    def frozen_weight(self):
        return self.weight


class LoRALinear(LoRALayer):
    """Drop-in for ``nn.Linear``: weight [out, in], read by the op through its transpose (a view)."""

    def __init__(self, weight, bias=None, r_max=64, alpha=32.0, dropout=0.0, scale_rule=DEFAULT_RULE):
        """weight: [out, in] frozen; bias: [out] or None; r_max: adapter width; dropout: LoRA dropout on x."""
        if weight.dim() != 2:
            raise ValueError(f"LoRALinear: weight has shape {tuple(weight.shape)}; expected [out, in]")
        super().__init__(weight, bias, weight.shape[1], weight.shape[0], r_max, alpha, dropout, scale_rule)

    def frozen_weight(self):
        return self.weight.t()


def lora_layers(model):
    """The LoRA layers (both kinds) of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALayer)]


def _layer_class(module):
    """The LoRA class that replaces `module`, or None when it is of no supported kind."""
    from transformers.pytorch_utils import Conv1D

    from hybrid_lora.nn.quantized import quantized_layer_class  # bitsandbytes' 4-bit Linear (a subclass of nn.Linear)

    quantized = quantized_layer_class(module)
    if quantized is not None:
        return quantized
    if isinstance(module, Conv1D):
        return LoRAConv1D
    if isinstance(module, nn.Linear):
        return LoRALinear
    return None


def _describe(target_modules):
    return repr(target_modules) if isinstance(target_modules, str) else str(tuple(target_modules))


def matches_target(target_modules, name):
    """Whether module `name` is selected by `target_modules`, with peft's rule (see the module docstring)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{suffix}") for suffix in target_modules)


def _output_embedding_names(model):
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def target_names(model, target_modules):
    """Names of the modules of `model` that `target_modules` selects, in module order."""
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        excluded = _output_embedding_names(model)
        return [name for name, module in model.named_modules()
                if (_layer_class(module) is not None or isinstance(module, LoRALayer)) and name not in excluded]
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"inject_lora: target_modules {target_modules!r} is not a regular expression "
                             f"({err})") from None
    elif not target_modules or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(f"inject_lora: target_modules {target_modules!r}; expected a regular expression or a "
                         "non-empty list of module names")
    return [name for name, _ in model.named_modules() if name and matches_target(target_modules, name)]


def _shared_weights(model):
    """ids of Parameters that more than one module of `model` holds (tied weights)."""
    count = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        count[id(param)] = count.get(id(param), 0) + 1
    return {key for key, n in count.items() if n > 1}


def inject_lora(model, target_modules=("c_attn",), r_max=64, alpha=32.0, dropout=0.0, scale_rule=DEFAULT_RULE):
    """Replace the ``nn.Linear`` and Conv1D modules selected by `target_modules` by LoRA layers; freeze the rest.

    target_modules: a regular expression matched against whole module names,
    ``"all-linear"``, or a list of module names or name suffixes (peft's rule).
    Only the selected module instances are replaced; no class is patched.
    Returns the new layers in module order.
    """
    names = target_names(model, target_modules)
    if not names:
        raise ValueError(f"inject_lora: no module of {type(model).__name__} matches target_modules "
                         f"{_describe(target_modules)}")
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        if isinstance(module, LoRALayer):
            raise ValueError(f"inject_lora: {name} already holds a LoRA adapter")
        if _layer_class(module) is None:
            raise TypeError(f"inject_lora: {name} is a {type(module).__name__}; expected nn.Linear or "
                            "transformers' Conv1D")
    shared = _shared_weights(model)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = []
    for name in names:
        module = modules[name]
        layer = _layer_class(module).from_module(module, r_max=r_max, alpha=alpha, dropout=dropout,
                                                 scale_rule=scale_rule)
        layer.weight_is_shared = id(module.weight) in shared
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers.append(layer)
    return layers


def set_rank(model, r):
    """Set the active rank of every LoRA layer in `model`. Returns how many layers changed."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("set_rank: the model holds no LoRA layer (call inject_lora first)")
    for layer in layers:
        layer.set_rank(r)
    return len(layers)
