"""``AdapterBank``: many adapters over one base model, each request at the adapter and rank it asks for.

    bank = AdapterBank(model, target_modules=("c_attn",), r_max=64, slots=8)  # patches the target layers once
    bank.load("support", "runs/x/seed-42/adapters/stage2-embedded-b.safetensors")  # our adapter file
    bank.load("legal", "exported/peft")                                         # or a peft adapter folder
    with bank.route(adapters=["support", None, "legal"], ranks=[8, None, 64]):  # one entry per batch row
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
    bank.unload("legal")

The target module instances (``nn.Linear`` or Conv1D, selected as
``inject_lora`` selects them) are replaced by ``BankedLayer``s holding the same
weights; no class is patched. A route holds for every forward inside it
(``generate`` with its KV cache, left padding, greedy or sampling): batch row i
runs adapter ``adapters[i]`` at rank ``ranks[i]`` (None: the base model; a rank
None: the adapter's full width), each adapter scaled by its own rule at that
rank (``adapter_sources``). The slots, ranks and scales are written to device
tensors when the route is entered (the scales computed there, on the device,
from each slot's rule), and every forward reads them: nothing inside reads a
value back to the host, so one compiled graph serves every route of a batch size.
"""

import contextlib

import torch
from torch import nn

from hybrid_lora.errors import BadValue
from hybrid_lora.nn.layer import check_rank, target_names
from hybrid_lora.nn.scaling import SCALE_RULES
from hybrid_lora.serve.adapter_sources import read_adapter_source
from hybrid_lora.serve.layer import BankedLayer, Route


def _kind(module):
    """True for nn.Linear (weight [out, in]), False for Conv1D ([in, out]), None for anything else."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return False
    if isinstance(module, nn.Linear):
        return True
    return None


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadValue(f"AdapterBank: {what}={value!r}; expected an integer >= 1")
    return value


class AdapterBank:
    """Up to `slots` adapters of width up to `r_max` over the `target_modules` of `model` (see the module docstring)."""

    def __init__(self, model, target_modules=("c_attn",), r_max=64, slots=8):
        self.model = model
        self.r_max = _positive_int(r_max, "r_max")
        self.slots = _positive_int(slots, "slots")
        try:
            names = target_names(model, target_modules)
        except ValueError as err:
            raise BadValue(f"AdapterBank: {err}") from None
        if not names:
            raise BadValue(f"AdapterBank: no module of {type(model).__name__} matches target_modules "
                           f"{target_modules!r}")
        modules = dict(model.named_modules())
        for name in names:
            if _kind(modules[name]) is None:
                raise BadValue(f"AdapterBank: {name} is a {type(modules[name]).__name__}; expected nn.Linear or "
                               "transformers' Conv1D (a model already patched by another bank?)")
        for param in model.parameters():  # inference only: the op refuses inputs that require grad
            param.requires_grad_(False)
        self._route = Route()
        self.layers = {}
        for name in names:
            module = modules[name]
            layer = BankedLayer(module, self._route, self.r_max, self.slots, transposed=_kind(module))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            self.layers[name] = layer
        first = next(iter(self.layers.values())).lora_a
        self.device = first.device
        # Per-slot scale rule, on the device: the route's scales are computed there.
        self._scale_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self._alpha = torch.zeros(self.slots, dtype=self._scale_dtype, device=self.device)
        self._rule = torch.zeros(self.slots, dtype=torch.int64, device=self.device)
        self._scale_r_max = torch.ones(self.slots, dtype=self._scale_dtype, device=self.device)
        self._adapters = {}  # name -> (slot, width)

    @property
    def adapters(self):
        """{name: (slot, width)} of the loaded adapters."""
        return dict(self._adapters)

    def load(self, name, path):
        """Put the adapter at `path` (our adapter file, or a peft adapter folder) into a free slot as `name`."""
        if not isinstance(name, str) or not name:
            raise BadValue(f"AdapterBank.load: name {name!r}; expected a non-empty string")
        if name in self._adapters:
            raise BadValue(f"AdapterBank.load: an adapter named {name!r} is already loaded; unload it first")
        used = {slot for slot, _ in self._adapters.values()}
        free = [slot for slot in range(self.slots) if slot not in used]
        if not free:
            raise BadValue(f"AdapterBank.load: {name!r} would be adapter {len(self._adapters) + 1} but the bank has "
                           f"{self.slots} slots ({', '.join(sorted(self._adapters))}); unload one or make a bank "
                           "with more slots")
        adapter = read_adapter_source(path)
        self._check_fits(adapter)
        slot = free[0]
        with torch.no_grad():
            for module, layer in self.layers.items():
                lora_a, lora_b = adapter.tensors[module]
                layer.lora_a[slot].zero_()
                layer.lora_b[slot].zero_()
                layer.lora_a[slot, :, : adapter.width].copy_(lora_a)
                layer.lora_b[slot, : adapter.width].copy_(lora_b)
            self._alpha[slot] = adapter.alpha
            self._rule[slot] = SCALE_RULES.index(adapter.rule)
            self._scale_r_max[slot] = adapter.scale_r_max
        self._adapters[name] = (slot, adapter.width)

    def _check_fits(self, adapter):
        where = f"AdapterBank.load: adapter {adapter.source!r}"
        if set(adapter.tensors) != set(self.layers):
            missing, extra = sorted(set(self.layers) - set(adapter.tensors)), sorted(set(adapter.tensors) -
                                                                                     set(self.layers))
            raise BadValue(f"{where} adapts other modules than the bank's (missing {missing[:3]}, not in the bank "
                           f"{extra[:3]}); expected an adapter for this base model and these target modules")
        if adapter.width > self.r_max:
            raise BadValue(f"{where} has width {adapter.width}; expected at most the bank's r_max {self.r_max}")
        for module, (lora_a, lora_b) in adapter.tensors.items():
            layer = self.layers[module]
            if lora_a.shape[0] != layer.in_features or lora_b.shape[1] != layer.out_features:
                raise BadValue(f"{where}: {module} is {lora_a.shape[0]} -> {lora_b.shape[1]}; the model's is "
                               f"{layer.in_features} -> {layer.out_features} (an adapter of another base model?)")

    def unload(self, name):
        """Free the slot of adapter `name`."""
        if name not in self._adapters:
            raise BadValue(f"AdapterBank.unload: no adapter named {name!r}; loaded: {sorted(self._adapters)}")
        if self._route.active:
            raise BadValue(f"AdapterBank.unload: {name!r} while a route is active; leave the route first")
        slot, _ = self._adapters.pop(name)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.lora_a[slot].zero_()
                layer.lora_b[slot].zero_()

    def request_rank(self, name, rank=None):
        """The rank a request for adapter `name` at `rank` runs at (None: the adapter's width), checked."""
        if name not in self._adapters:
            raise BadValue(f"AdapterBank.route: unknown adapter {name!r}; loaded: {sorted(self._adapters)}")
        width = self._adapters[name][1]
        rank = width if rank is None else rank
        try:
            check_rank(rank, width, f"AdapterBank.route: adapter {name!r}")
        except ValueError as err:
            raise BadValue(str(err)) from None
        return rank

    def _resolve(self, adapters, ranks):
        """(slots, ranks) of a route as lists, each entry checked: one line naming a bad one."""
        if isinstance(adapters, (str, bytes)) or not hasattr(adapters, "__len__"):
            raise BadValue(f"AdapterBank.route: adapters={adapters!r}; expected a list, one entry per batch row")
        ranks = [None] * len(adapters) if ranks is None else ranks
        if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__len__") or len(ranks) != len(adapters):
            raise BadValue(f"AdapterBank.route: ranks={ranks!r}; expected a list of {len(adapters)} (one per "
                           "adapter entry) or None")
        slots, row_ranks = [], []
        for name, rank in zip(adapters, ranks):
            if name is None:
                if rank is not None:
                    raise BadValue(f"AdapterBank.route: rank {rank!r} for a row of no adapter; expected None")
                slots.append(-1)
                row_ranks.append(0)
                continue
            rank = self.request_rank(name, rank)
            slots.append(self._adapters[name][0])
            row_ranks.append(rank)
        return slots, row_ranks

    @contextlib.contextmanager
    def route(self, adapters, ranks=None):
        """Run batch row i on adapter ``adapters[i]`` (None: none) at rank ``ranks[i]`` (None: its width) inside."""
        if self._route.active:
            raise BadValue("AdapterBank.route: a route is already active; leave it before entering another")
        slots, row_ranks = self._resolve(adapters, ranks)
        route = self._route
        slots = torch.tensor(slots, dtype=torch.int32).to(self.device, non_blocking=True)
        row_ranks = torch.tensor(row_ranks, dtype=torch.int32).to(self.device, non_blocking=True)
        scales = self._scales(slots, row_ranks)
        if route.slots is not None and route.slots.shape == slots.shape:
            # In place: the tensors a compiled graph reads keep their addresses.
            route.slots.copy_(slots)
            route.ranks.copy_(row_ranks)
            route.scales.copy_(scales)
        else:
            route.slots, route.ranks, route.scales = slots, row_ranks, scales
        route.active = True
        try:
            yield self
        finally:
            route.active = False

    def _scales(self, slots, ranks):
        """Each row's scale from its slot's rule at its rank, computed on the device (0 for rows of no adapter)."""
        index = slots.clamp(min=0).long()
        alpha, rule, width = self._alpha[index], self._rule[index], self._scale_r_max[index]
        rank = ranks.to(self._scale_dtype).clamp(min=1)
        by_rule = torch.stack((alpha / rank, alpha / rank.sqrt(), alpha / width))  # SCALE_RULES' order
        scale = by_rule.gather(0, rule.unsqueeze(0)).squeeze(0)
        return torch.where(slots >= 0, scale, torch.zeros_like(scale))
