"""Saving and loading the LoRA adapters of a model as one safetensors file.

The file holds, for every ``LoRAConv1D`` at module path P, the tensors
``P.lora_a`` [in, r_max] and ``P.lora_b`` [r_max, out] (the full current width,
so every rank up to r_max stays available), and string metadata: the active
rank, alpha, the target module names, the base model and the LoRA dropout.
The frozen weights are not stored: the base model supplies them.
"""

import json

import torch

from .files import atomic_write
from .layer import LoRAConv1D, inject_lora

FORMAT = "hybrid-lora-adapter/1"


def named_adapters(model):
    """[(module path, LoRAConv1D)] in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRAConv1D)]


def save_adapter(model, path, base_model, extra=None):
    """Write the adapters of `model` to `path` (safetensors, atomically). Returns the metadata written."""
    from safetensors.torch import save_file

    adapters = named_adapters(model)
    if not adapters:
        raise ValueError("save_adapter: the model holds no LoRAConv1D; nothing to save")
    ranks = {m.rank for _, m in adapters}
    alphas = {m.alpha for _, m in adapters}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"save_adapter: layers disagree on rank {sorted(ranks)} or alpha {sorted(alphas)}")
    tensors = {}
    for name, module in adapters:
        tensors[f"{name}.lora_a"] = module.lora_a.detach().float().cpu().contiguous()
        tensors[f"{name}.lora_b"] = module.lora_b.detach().float().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "rank": str(adapters[0][1].rank),
        "r_max": str(adapters[0][1].r_max),
        "alpha": repr(adapters[0][1].alpha),
        "lora_dropout": repr(adapters[0][1].dropout),
        "target_modules": json.dumps(sorted({name.rsplit(".", 1)[-1] for name, _ in adapters})),
        "base_model": str(base_model),
        "extra": json.dumps(extra or {}),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return metadata


def read_adapter(path):
    """(tensors, metadata) of an adapter file; metadata values are parsed back to numbers and lists."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist") from None
    if raw.get("format") != FORMAT:
        raise ValueError(f"adapter file {str(path)!r} has format {raw.get('format')!r}; expected {FORMAT!r}")
    metadata = {
        "rank": int(raw["rank"]), "r_max": int(raw["r_max"]), "alpha": float(raw["alpha"]),
        "lora_dropout": float(raw["lora_dropout"]), "target_modules": json.loads(raw["target_modules"]),
        "base_model": raw["base_model"], "extra": json.loads(raw.get("extra", "{}")),
    }
    return tensors, metadata


def attach_adapter(model, path, dropout=None):
    """Inject adapters shaped like the file's into a plain GPT-2 `model` and load them. Returns the metadata.

    The adapters are set to the file's active rank; `dropout` overrides the stored LoRA dropout.
    """
    tensors, metadata = read_adapter(path)
    inject_lora(model, tuple(metadata["target_modules"]), r_max=metadata["r_max"], alpha=metadata["alpha"],
                dropout=metadata["lora_dropout"] if dropout is None else dropout)
    adapters = named_adapters(model)
    expected = {f"{name}.{part}" for name, _ in adapters for part in ("lora_a", "lora_b")}
    if expected != set(tensors):
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"adapter file {str(path)!r} does not fit the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        for name, module in adapters:
            for part in ("lora_a", "lora_b"):
                param, stored = getattr(module, part), tensors[f"{name}.{part}"]
                if param.shape != stored.shape:
                    raise ValueError(f"adapter file {str(path)!r}: {name}.{part} has shape {tuple(stored.shape)}; "
                                     f"the model expects {tuple(param.shape)}")
                param.copy_(stored.to(param.dtype))
            module.set_rank(metadata["rank"])
    return metadata
