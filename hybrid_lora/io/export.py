"""Exporting a trained adapter at rank r: in ``peft``'s LoRA format, or merged into the base model's weights.

peft's LoRA (Hu et al., 2022) computes y = base(x) + (lora_alpha / r) * x lora_A^T lora_B^T
with lora_A.weight [r, in] and lora_B.weight [out, r], for an ``nn.Linear`` and
for a Conv1D alike. Ours is y = x W + b + (alpha / r) x A[:, :r] B[:r, :] with
A [in, r_max], B [r_max, out], so at rank r

    lora_A.weight = A[:, :r]^T,  lora_B.weight = B[:r, :]^T,  lora_alpha = alpha,

and ``peft.PeftModel.from_pretrained(base, folder)`` computes the same logits.
Other scale rules (``scaling``) set ``use_rslora`` (alpha / sqrt(r)) or a
``lora_alpha`` of alpha * r / r_max (alpha / r_max at every rank).
``fan_in_fan_out`` tells peft the base weight's layout: True for Conv1D
([in, out]), False for ``nn.Linear`` ([out, in]). It is one value per config;
when an adapter covers both kinds (GPT-2's Conv1D projections and its
``lm_head`` Linear), peft sets each layer's own value from the module's type
as it builds it (warning once per mismatch), so the config holds the value of
the majority.

The merged export folds s A[:, :r] B[:r, :] into each weight and saves a plain
checkpoint that ``from_pretrained`` loads with no LoRA code at all.
"""

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from hybrid_lora.io.adapter_files import named_adapters
from hybrid_lora.io.atomic import atomic_write, write_json
from hybrid_lora.nn.layer import LoRAConv1D, LoRALinear, matches_target
from hybrid_lora.nn.scaling import peft_scale_fields

PEFT_PREFIX = "base_model.model."


def _check_rank(model, rank):
    adapters = named_adapters(model)
    if not adapters:
        raise ValueError("export: the model holds no LoRA adapter")
    r_max = min(module.r_max for _, module in adapters)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_max:
        raise ValueError(f"export: rank {rank!r} is outside [1, {r_max}] (the adapter's r_max)")
    return adapters


def peft_state(model, rank):
    """(state dict, adapter_config dict) of the adapters of `model` at `rank`, in peft's LoRA layout."""
    adapters = _check_rank(model, rank)
    state = {}
    for name, module in adapters:
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_a[:, :rank].detach().float().t().contiguous().cpu()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_b[:rank].detach().float().t().contiguous().cpu()
    first = adapters[0][1]
    scale = peft_scale_fields(first.scale_rule, first.alpha, rank, first.scale_r_max)
    conv1d = sum(isinstance(module, LoRAConv1D) for _, module in adapters)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": scale["lora_alpha"],  # peft's scale from these two fields equals ours at `rank`
        "lora_dropout": first.dropout,
        "target_modules": peft_target_modules(model, [name for name, _ in adapters]),
        "fan_in_fan_out": conv1d * 2 > len(adapters),  # Conv1D stores [in, out]; peft fixes the minority
        "bias": "none",
        "use_rslora": scale["use_rslora"],
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return state, config


def peft_target_modules(model, names):
    """What peft's target_modules must say to adapt exactly the modules `names` of `model`.

    The name suffixes (``["c_attn"]``, ``["q_proj", "v_proj"]``) when they
    select exactly those modules, else the full module names.
    """
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    selected = [name for name, _ in model.named_modules() if name and matches_target(suffixes, name)]
    return suffixes if selected == list(names) else list(names)


def _replace_dir(staging, out_dir):
    """Move the finished `staging` folder onto `out_dir` (replacing an older export)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(staging, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(staging, out_dir)
    return out_dir


def export_peft(model, out_dir, rank, base_model_name_or_path=None):
    """Write adapter_config.json and adapter_model.safetensors for `peft.PeftModel.from_pretrained`."""
    from safetensors.torch import save_file

    state, config = peft_state(model, rank)
    config["base_model_name_or_path"] = base_model_name_or_path
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "adapter_model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_json(out_dir / "adapter_config.json", config)
    return out_dir


def check_mergeable(model):
    """Raise ValueError if an adapted weight is tied to another module's: merging it would change both."""
    for name, module in named_adapters(model):
        if module.weight_is_shared:
            raise ValueError(f"export: {name}'s weight is tied to another module's (an embedding?); a merged "
                             "export would have to untie them: export to peft instead")


def merged_model(model, rank):
    """A copy of `model` whose LoRA layers become plain modules of their kind holding W + s A[:, :r] B[:r, :].

    LoRAConv1D becomes a Conv1D, LoRALinear an ``nn.Linear`` (with a bias only
    if it had one).
    """
    from transformers.pytorch_utils import Conv1D

    _check_rank(model, rank)
    check_mergeable(model)
    merged = copy.deepcopy(model)
    for name, module in named_adapters(merged):
        module.set_rank(rank)
        factory = {"device": module.weight.device, "dtype": module.weight.dtype}
        if isinstance(module, LoRALinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, **factory)
            weight = module.merged_weight().t()
        else:
            plain = Conv1D(module.out_features, module.in_features).to(**factory)
            weight = module.merged_weight()
        with torch.no_grad():
            plain.weight.copy_(weight)
            if module.bias is not None:
                plain.bias.copy_(module.bias)
            elif plain.bias is not None:
                plain.bias.zero_()
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name) if parent_name else merged, child, plain)
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged


def export_merged(model, tokenizer, out_dir, rank):
    """Save a plain checkpoint (safetensors, config, tokenizer) of the base model, the adapter at `rank` merged in."""
    merged = merged_model(model, rank)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        return _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
