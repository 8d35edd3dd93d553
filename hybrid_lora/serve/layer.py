"""The layer the bank puts in place of each target module: its frozen weight, the stacked adapters, one op call.

A ``BankedLayer`` holds the module's own ``weight`` and ``bias`` Parameters
under the same names (so the model's state dict is unchanged) and, as
non-persistent buffers, every slot's adapter stacked as ``lora_a``
[slots, in, r_max] and ``lora_b`` [slots, r_max, out], zero past each
adapter's width. Inside a route (``Route``) a forward makes one
``multi_lora`` call whatever the mix of adapters; outside one it is the base
module. The route names one adapter slot, rank and scale per batch row (the
first dimension of x); each batch row's entries are repeated over its tokens on
the device.
"""

import torch
from torch import nn

from hybrid_lora.errors import BadValue
from hybrid_lora.ops.multi_lora import multi_lora


class Route:
    """The per-row slot, rank and scale ([B] device tensors) the bank's layers read; shared by all of them.

    ``AdapterBank.route`` writes them in place when a route of the same length
    follows another, so a compiled model keeps its graph.
    """

    def __init__(self):
        self.active = False
        self.slots = self.ranks = self.scales = None


class BankedLayer(nn.Module):
    """An ``nn.Linear`` or Conv1D serving the bank's adapters: y = x W + b + s_i x A[a_i][:, :r_i] B[a_i][:r_i, :]."""

    def __init__(self, module, route: Route, r_max: int, slots: int, transposed: bool):
        super().__init__()
        self.weight, self.bias = module.weight, module.bias
        self.transposed = transposed  # nn.Linear stores [out, in]: read through a transposed view
        in_features, out_features = (self.weight.shape[1], self.weight.shape[0]) if transposed else self.weight.shape
        self.in_features, self.out_features = int(in_features), int(out_features)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.register_buffer("lora_a", torch.zeros(slots, self.in_features, r_max, **factory), persistent=False)
        self.register_buffer("lora_b", torch.zeros(slots, r_max, self.out_features, **factory), persistent=False)
        self.route = route

    def frozen_weight(self):
        return self.weight.t() if self.transposed else self.weight

    def forward(self, x):  # (B, ..., in) -> (B, ..., out)
        route = self.route
        weight = self.frozen_weight()
        if not route.active:
            out = x.reshape(-1, self.in_features) @ weight
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(x.shape[:-1] + (self.out_features,))
        batch = route.slots.shape[0]
        if x.dim() < 2 or x.shape[0] != batch:
            raise BadValue(f"AdapterBank.route: {batch} entries for a batch of {x.shape[0] if x.dim() else 0} rows; "
                           "expected one adapter (or None) per batch row")
        tokens = x.numel() // (batch * self.in_features) if batch else 0

        def per_token(values):  # (B,) -> (B * tokens,): each batch row's entry over its tokens
            return values.unsqueeze(1).expand(batch, tokens).reshape(-1)

        return multi_lora(x, weight, self.bias, self.lora_a, self.lora_b, slots=per_token(route.slots),
                          ranks=per_token(route.ranks), scales=per_token(route.scales))

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, slots={self.lora_a.shape[0]}, "
                f"r_max={self.lora_a.shape[2]}")
