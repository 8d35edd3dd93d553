"""Saving and loading the LoRA adapters of a model as one safetensors file.

The file holds, for every LoRA layer (``nn.Linear`` or Conv1D) at module path
P, the tensors ``P.lora_a`` [in, r_max] and ``P.lora_b`` [r_max, out] (the full
current width, so every rank up to r_max stays available), and string
metadata: the active rank, alpha, the scale rule and the width it was made
with (so a truncated adapter keeps its scale), the adapted module paths and
their name suffixes, the base model and the LoRA dropout. The frozen weights are not
stored: the base model supplies them.

Since format 2 the metadata holds a content digest (``tensor_files``): a file
altered or damaged after writing is refused. Format 1 files (no digest) still load.
"""

import json
import math

import torch

from hybrid_lora.errors import BadValue
from hybrid_lora.io.atomic import atomic_write
from hybrid_lora.io.tensor_files import decode, encode, non_finite, read_bytes
from hybrid_lora.nn.layer import LoRALayer, inject_lora
from hybrid_lora.nn.scaling import SCALE_RULES

FORMAT = "hybrid-lora-adapter/2"
FORMATS_WITHOUT_DIGEST = ("hybrid-lora-adapter/1",)


class AdapterFileError(BadValue):
    """An adapter file that is damaged, not an adapter file, or does not fit the model."""


def named_adapters(model):
    """[(module path, LoRA layer)] in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALayer)]


def save_adapter(model, path, base_model, extra=None):
    """Write the adapters of `model` to `path` (safetensors, atomically). Returns the metadata written.

    Adapters with NaN or infinity raise NonFiniteTensor and leave the file at `path` as it was.
    """
    adapters = named_adapters(model)
    if not adapters:
        raise ValueError("save_adapter: the model holds no LoRA layer; nothing to save")
    for what in ("rank", "alpha", "scale_rule", "scale_r_max"):
        values = {getattr(m, what) for _, m in adapters}
        if len(values) != 1:
            raise ValueError(f"save_adapter: layers disagree on {what}: {sorted(values)}; expected one value")
    tensors = {}
    for name, module in adapters:
        tensors[f"{name}.lora_a"] = module.lora_a.detach().float().cpu().contiguous()
        tensors[f"{name}.lora_b"] = module.lora_b.detach().float().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "rank": str(adapters[0][1].rank),
        "r_max": str(adapters[0][1].r_max),
        "alpha": repr(adapters[0][1].alpha),
        "scale_rule": adapters[0][1].scale_rule,
        "scale_r_max": str(adapters[0][1].scale_r_max),
        "lora_dropout": repr(adapters[0][1].dropout),
        "target_modules": json.dumps(sorted({name.rsplit(".", 1)[-1] for name, _ in adapters})),
        "modules": json.dumps([name for name, _ in adapters]),
        "base_model": str(base_model),
        "extra": json.dumps(extra or {}),
    }
    data = encode(tensors, metadata, path)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
    return metadata


def _parse_metadata(raw, path):
    """The metadata strings of an adapter file as numbers and lists, each checked; AdapterFileError if not."""
    try:
        metadata = {
            "rank": int(raw["rank"]), "r_max": int(raw["r_max"]), "alpha": float(raw["alpha"]),
            "lora_dropout": float(raw["lora_dropout"]), "target_modules": json.loads(raw["target_modules"]),
            "base_model": raw["base_model"], "extra": json.loads(raw.get("extra", "{}")),
            # files written before scale rules existed used alpha / r at their full width
            "scale_rule": raw.get("scale_rule", "alpha/r"), "scale_r_max": int(raw.get("scale_r_max", raw["r_max"])),
        }
    except KeyError as err:
        raise AdapterFileError(f"adapter file {str(path)!r} has no {err.args[0]!r} in its metadata") from None
    except ValueError as err:
        raise AdapterFileError(f"adapter file {str(path)!r} has unreadable metadata ({err})") from None
    if not 1 <= metadata["rank"] <= metadata["r_max"]:
        raise AdapterFileError(f"adapter file {str(path)!r}: rank {metadata['rank']} outside [1, r_max "
                               f"{metadata['r_max']}]")
    if metadata["scale_rule"] not in SCALE_RULES or metadata["scale_r_max"] < metadata["r_max"]:
        raise AdapterFileError(f"adapter file {str(path)!r}: scale rule {metadata['scale_rule']!r} at width "
                               f"{metadata['scale_r_max']}; expected one of {SCALE_RULES} at a width >= r_max")
    if not (math.isfinite(metadata["alpha"]) and metadata["alpha"] > 0):
        raise AdapterFileError(f"adapter file {str(path)!r}: alpha {metadata['alpha']!r}; expected a number > 0")
    if not 0.0 <= metadata["lora_dropout"] < 1.0:
        raise AdapterFileError(f"adapter file {str(path)!r}: lora_dropout {metadata['lora_dropout']!r}; "
                               "expected a probability in [0, 1)")
    targets = metadata["target_modules"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterFileError(f"adapter file {str(path)!r}: target_modules {targets!r}; expected module names")
    # Files written before the paths were stored name suffixes only; those select the same modules.
    try:
        modules = json.loads(raw["modules"]) if "modules" in raw else None
    except ValueError as err:
        raise AdapterFileError(f"adapter file {str(path)!r} has unreadable metadata ({err})") from None
    if modules is not None and (not isinstance(modules, list) or not modules
                                or not all(isinstance(m, str) and m for m in modules)):
        raise AdapterFileError(f"adapter file {str(path)!r}: modules {modules!r}; expected module paths")
    metadata["modules"] = modules
    return metadata


def read_adapter(path):
    """(tensors, metadata) of an adapter file; metadata values are parsed back to numbers and lists.

    Raises MissingFile for no such file and AdapterFileError, naming the file, for
    one that is damaged, altered, not an adapter file, or holds NaN or infinity.
    """
    tensors, raw = decode(read_bytes(path, "adapter file"), path, "adapter file", error=AdapterFileError,
                          require_digest=lambda raw: raw.get("format") not in FORMATS_WITHOUT_DIGEST)
    if raw.get("format") != FORMAT and raw.get("format") not in FORMATS_WITHOUT_DIGEST:
        raise AdapterFileError(f"adapter file {str(path)!r} has format {raw.get('format')!r}; expected {FORMAT!r}")
    metadata = _parse_metadata(raw, path)
    r_max = metadata["r_max"]
    for name, t in tensors.items():
        part = name.rsplit(".", 1)[-1]
        expected_dim = {"lora_a": 1, "lora_b": 0}.get(part)
        if expected_dim is None or t.dim() != 2 or t.shape[expected_dim] != r_max or not t.is_floating_point():
            raise AdapterFileError(f"adapter file {str(path)!r}: tensor {name!r} {t.dtype} {tuple(t.shape)}; "
                                   f"expected .lora_a [in, {r_max}] and .lora_b [{r_max}, out] float tensors")
    bad = non_finite(tensors)
    if bad:
        raise AdapterFileError(f"adapter file {str(path)!r}: {len(bad)} tensor(s) hold NaN or infinity "
                               f"({', '.join(sorted(bad)[:3])}); expected finite adapters (a diverged run?)")
    return tensors, metadata


def attach_adapter(model, path, dropout=None):
    """Inject adapters shaped like the file's into the plain base `model` and load them. Returns the metadata.

    The adapters are set to the file's active rank and keep its scale rule; `dropout` overrides the stored
    LoRA dropout.
    """
    tensors, metadata = read_adapter(path)
    targets = metadata["modules"] or metadata["target_modules"]
    try:
        inject_lora(model, list(targets), r_max=metadata["r_max"], alpha=metadata["alpha"],
                    dropout=metadata["lora_dropout"] if dropout is None else dropout, scale_rule=metadata["scale_rule"])
    except (ValueError, TypeError) as err:
        raise AdapterFileError(f"adapter file {str(path)!r} does not fit the model: {err}") from None
    adapters = named_adapters(model)
    expected = {f"{name}.{part}" for name, _ in adapters for part in ("lora_a", "lora_b")}
    if expected != set(tensors):
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterFileError(f"adapter file {str(path)!r} does not fit the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        for name, module in adapters:
            for part in ("lora_a", "lora_b"):
                param, stored = getattr(module, part), tensors[f"{name}.{part}"]
                if param.shape != stored.shape:
                    raise AdapterFileError(f"adapter file {str(path)!r}: {name}.{part} has shape "
                                           f"{tuple(stored.shape)}; the model expects {tuple(param.shape)}")
                param.copy_(stored.to(param.dtype))
            module.scale_r_max = metadata["scale_r_max"]
            module.set_rank(metadata["rank"])
    return metadata
