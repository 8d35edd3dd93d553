"""``LoRAConv1D``: a drop-in for ``transformers``' Conv1D with a fused LoRA adapter of runtime rank.

The frozen ``weight`` [in, out] and ``bias`` [out] keep Conv1D's names, so a
GPT-2 state dict loads unchanged. The adapter is ``lora_a`` [in, r_max] and
``lora_b`` [r_max, out]; the active ``rank`` r <= r_max selects the leading
components and the scale is alpha / r (as DyLoRA, Valipour et al., EACL 2023,
scales a truncated rank b by alpha / b).
"""

import math

import torch
from torch import nn

from .function import fused_lora
from .reference import merged_weight


class LoRAConv1D(nn.Module):
    def __init__(self, weight, bias=None, r_max=64, alpha=32.0, dropout=0.0):
        """weight: [in, out] frozen; bias: [out] or None; r_max: adapter width; dropout: LoRA dropout on x."""
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"LoRAConv1D: weight has shape {tuple(weight.shape)}; expected [in, out]")
        if int(r_max) < 1:
            raise ValueError(f"LoRAConv1D: r_max={r_max}; expected an integer >= 1")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"LoRAConv1D: dropout={dropout}; expected a probability in [0, 1)")
        in_features, out_features = weight.shape
        self.nx, self.nf = in_features, out_features  # Conv1D's attribute names
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(in_features, int(r_max), **factory))
        self.lora_b = nn.Parameter(torch.zeros(int(r_max), out_features, **factory))
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.rank = int(r_max)
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_conv1d(cls, conv, r_max=64, alpha=32.0, dropout=0.0):
        """Wrap a ``transformers.pytorch_utils.Conv1D``, copying its weight and bias."""
        return cls(conv.weight, conv.bias, r_max=r_max, alpha=alpha, dropout=dropout)

    def reset_lora_parameters(self):
        """A ~ Kaiming-uniform with fan_in = in_features (peft's init of lora_A), B = 0."""
        # peft initialises lora_A.weight [r, in] with kaiming_uniform_(a=sqrt(5)),
        # whose bound is 1 / sqrt(fan_in); our A is its transpose, so fan_in is dim 0.
        bound = 1.0 / math.sqrt(self.nx)
        with torch.no_grad():
            self.lora_a.uniform_(-bound, bound)
            self.lora_b.zero_()

    @property
    def in_features(self):
        return self.nx

    @property
    def out_features(self):
        return self.nf

    @property
    def r_max(self):
        return self.lora_a.shape[1]

    @property
    def scale(self):
        return self.alpha / self.rank

    def _check_rank(self, r, what):
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= self.r_max:
            raise ValueError(f"LoRAConv1D.{what}: rank {r!r} is outside [1, {self.r_max}] (r_max)")
        if self.merged:
            raise RuntimeError(f"LoRAConv1D.{what}: the adapter is merged into the weight; call unmerge() first")

    def set_rank(self, r):
        """Use the leading r components (scale alpha / r). Nothing is recompiled or reallocated."""
        self._check_rank(r, "set_rank")
        self.rank = r

    @torch.no_grad()
    def truncate_(self, r):
        """Keep only the leading r components: r_max and rank become r.

        The Parameter objects stay the same (an optimizer keeps referring to
        them); their storage shrinks and their gradients are dropped.
        """
        self._check_rank(r, "truncate_")
        self.lora_a.data = self.lora_a.data[:, :r].contiguous()
        self.lora_b.data = self.lora_b.data[:r].contiguous()
        self.lora_a.grad = None
        self.lora_b.grad = None
        self.rank = r

    def delta_weight(self):
        """s A[:, :r] B[:r, :] in fp32: the adapter as a dense [in, out] update."""
        return merged_weight(
            torch.zeros_like(self.weight, dtype=torch.float32),
            self.lora_a.float(), self.lora_b.float(), self.rank, self.scale,
        )

    @torch.no_grad()
    def merge(self):
        """Fold the adapter at the active rank into the frozen weight (for inference)."""
        if self.merged:
            raise RuntimeError("LoRAConv1D.merge: already merged")
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take the adapter back out of the weight."""
        if not self.merged:
            raise RuntimeError("LoRAConv1D.unmerge: not merged")
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def forward(self, x):  # (..., in) -> (..., out)
        if self.merged:
            out = x.reshape(-1, self.nx) @ self.weight
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(x.shape[:-1] + (self.nf,))
        return fused_lora(
            x, self.weight, self.bias, self.lora_a, self.lora_b,
            rank=self.rank, scale=self.scale, dropout_p=self.dropout if self.training else 0.0,
        )

    def extra_repr(self):
        return (f"in={self.nx}, out={self.nf}, rank={self.rank}, r_max={self.r_max}, "
                f"alpha={self.alpha}, dropout={self.dropout}, merged={self.merged}")


def lora_layers(model):
    """The LoRAConv1D modules of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRAConv1D)]


def inject_lora(model, target_modules=("c_attn",), r_max=64, alpha=32.0, dropout=0.0):
    """Replace the Conv1D modules named in `target_modules` by LoRAConv1D and freeze everything else.

    Only the named module instances are replaced; no class is patched.
    Returns the new layers in module order.
    """
    from transformers.pytorch_utils import Conv1D

    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in target_modules]
    if not targets:
        raise ValueError(f"inject_lora: no module named any of {tuple(target_modules)} in {type(model).__name__}")
    layers = []
    for name, module in targets:
        if isinstance(module, LoRAConv1D):
            raise ValueError(f"inject_lora: {name} already holds a LoRA adapter")
        if not isinstance(module, Conv1D):
            raise TypeError(f"inject_lora: {name} is a {type(module).__name__}; expected transformers' Conv1D")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRAConv1D.from_conv1d(module, r_max=r_max, alpha=alpha, dropout=dropout)
        setattr(parent, child, layer)
        layers.append(layer)
    return layers


def set_rank(model, r):
    """Set the active rank of every LoRAConv1D in `model`. Returns how many layers changed."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("set_rank: the model holds no LoRAConv1D (call inject_lora first)")
    for layer in layers:
        layer.set_rank(r)
    return len(layers)
