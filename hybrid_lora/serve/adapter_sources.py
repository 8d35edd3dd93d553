"""Adapters for the bank, read from our adapter files or from peft adapter folders into one form.

An adapter is, for each module path P it adapts, A [in, r] and B [r, out]
(fp32), plus the rule that gives its scale at any rank k <= r:
- our files (``io.adapter_files``) carry their own rule (``nn.scaling``):
  alpha / k, alpha / sqrt(k), or alpha / r_max at every k;
- a peft LoRA folder (``adapter_config.json`` and ``adapter_model.safetensors``)
  runs its leading k components at lora_alpha / k, or lora_alpha / sqrt(k)
  with ``use_rslora``: peft's rule at the rank asked for. peft stores
  lora_A.weight [r, in] and lora_B.weight [out, r] for nn.Linear and Conv1D
  alike (``fan_in_fan_out`` concerns only the base weight), so A and B are their
  transposes.
"""

import json
from dataclasses import dataclass
from pathlib import Path


from hybrid_lora.errors import BadValue, MissingFile

PEFT_PREFIX = "base_model.model."


@dataclass
class Adapter:
    """One adapter as the bank stores it."""

    tensors: dict  # module path -> (A [in, r], B [r, out]), fp32 on the CPU
    width: int  # r: the largest rank it can run at
    rule: str  # one of nn.scaling.SCALE_RULES
    alpha: float
    scale_r_max: int  # the width the "fixed" rule divides by
    source: str  # the path, for messages


def read_adapter_source(path) -> Adapter:
    """Our adapter file, or a peft adapter folder (a directory), as an ``Adapter``."""
    path = Path(path)
    if path.is_dir():
        return _read_peft_folder(path)
    if not path.exists():
        raise MissingFile(f"adapter {str(path)!r} does not exist; expected an adapter file or a peft adapter folder")
    return _read_our_file(path)


def _read_our_file(path):
    from hybrid_lora.io.adapter_files import read_adapter

    tensors, metadata = read_adapter(path)
    modules = sorted({name.rsplit(".", 1)[0] for name in tensors})
    pairs = {m: (tensors[f"{m}.lora_a"].float(), tensors[f"{m}.lora_b"].float()) for m in modules
             if f"{m}.lora_a" in tensors and f"{m}.lora_b" in tensors}
    if len(pairs) != len(modules):
        raise BadValue(f"adapter file {str(path)!r}: a module has lora_a without lora_b or the reverse")
    return Adapter(pairs, metadata["r_max"], metadata["scale_rule"], metadata["alpha"], metadata["scale_r_max"],
                   str(path))


def _read_peft_folder(path):
    from safetensors.torch import load_file

    config_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise MissingFile(f"peft adapter folder {str(path)!r} has no {needed.name}; expected "
                              "adapter_config.json and adapter_model.safetensors (peft's save_pretrained)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadValue(f"{str(config_path)!r} is not a JSON file ({err})") from None
    if config.get("peft_type") != "LORA":
        raise BadValue(f"peft adapter {str(path)!r} has peft_type {config.get('peft_type')!r}; expected 'LORA'")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise BadValue(f"peft adapter {str(path)!r} has a {field} {config[field]!r}; expected none (the bank "
                           "serves one rank and alpha per adapter)")
    if config.get("use_dora"):
        raise BadValue(f"peft adapter {str(path)!r} uses DoRA; expected a plain LoRA adapter")
    width, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1 or not isinstance(alpha, (int, float)) \
            or isinstance(alpha, bool) or not alpha > 0:
        raise BadValue(f"peft adapter {str(path)!r}: r {width!r}, lora_alpha {alpha!r}; expected an integer >= 1 and "
                       "a number > 0")
    state = load_file(str(weights_path))
    parts = {}
    for key, tensor in state.items():
        stem = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix, part in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if stem.endswith(suffix):
                parts.setdefault(stem[: -len(suffix)], [None, None])[part] = tensor
                break
        else:
            raise BadValue(f"peft adapter {str(path)!r} holds {key!r}; expected only lora_A and lora_B weights")
    tensors = {}
    for module, (lora_a, lora_b) in sorted(parts.items()):
        if lora_a is None or lora_b is None or lora_a.dim() != 2 or lora_b.dim() != 2 \
                or lora_a.shape[0] != width or lora_b.shape[1] != width:
            raise BadValue(f"peft adapter {str(path)!r}: {module} has lora_A {_shape(lora_a)} and lora_B "
                           f"{_shape(lora_b)}; expected [{width}, in] and [out, {width}] (r = {width})")
        tensors[module] = (lora_a.float().t().contiguous(), lora_b.float().t().contiguous())
    if not tensors:
        raise BadValue(f"peft adapter {str(path)!r} holds no LoRA weights")
    rule = "rslora" if config.get("use_rslora") else "alpha/r"
    return Adapter(tensors, width, rule, float(alpha), width, str(path))


def _shape(tensor):
    return None if tensor is None else list(tensor.shape)

