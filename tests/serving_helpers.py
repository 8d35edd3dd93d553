"""What the serving tests share: the tiny GPT-2, adapters of every kind on disk, and the merged reference.

Adapters come from our files (two scale rules) and from peft folders (alpha / r
and rslora). The reference for a request is the base model alone, in fp64, with
its adapter truncated to its rank and merged into the weights, from the files'
tensors: our files with their own rule through ``nn.scaling``, peft folders
with peft's.
"""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hybrid_lora import AdapterBank
from hybrid_lora.io.adapter_files import read_adapter, save_adapter
from hybrid_lora.io.models import EMBEDDED_MODEL_DIR, load_causal_lm
from hybrid_lora.nn.layer import inject_lora, lora_layers
from hybrid_lora.nn.scaling import lora_scale

TARGETS = ("c_attn",)
# name -> (kind, width, rule or use_rslora)
ADAPTERS = {"ours": ("file", 8, "alpha/r"), "fixed": ("file", 5, "fixed"), "peft": ("peft", 6, False),
            "peft_rs": ("peft", 7, True)}
# one entry per batch row: "ours" at three ranks, the base model, each other adapter (None: full width)
ROUTE = (["ours", "ours", None, "fixed", "ours", "peft", "peft_rs"], [2, 5, None, 3, None, 4, None])


@pytest.fixture(scope="module")
def base():
    model = load_causal_lm(str(EMBEDDED_MODEL_DIR)).eval()
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    return model


def make_adapters(base, folder, names=ADAPTERS):
    """{name: path}: random adapters of each kind written to `folder` (B non-zero, so every rank matters)."""
    from peft import LoraConfig, get_peft_model

    paths = {}
    for i, name in enumerate(names):
        kind, width, rule = ADAPTERS[name]
        torch.manual_seed(100 + i)
        model = copy.deepcopy(base)
        if kind == "file":
            inject_lora(model, list(TARGETS), r_max=width, alpha=4.0 + i, scale_rule=rule)
            with torch.no_grad():
                for layer in lora_layers(model):
                    layer.lora_b.normal_(0, 0.3)
            paths[name] = folder / f"{name}.safetensors"
            save_adapter(model, paths[name], base_model="embedded")
        else:
            config = LoraConfig(r=width, lora_alpha=3.0 + i, use_rslora=rule, target_modules=list(TARGETS),
                                fan_in_fan_out=True, init_lora_weights=False)
            peft_model = get_peft_model(model, config)
            paths[name] = folder / name
            peft_model.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def adapter_paths(base, tmp_path_factory):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out notices
        return make_adapters(base, tmp_path_factory.mktemp("adapters"))


def merged_alone(base, path, rank):
    """The fp64 base model with the adapter at `path` truncated to `rank` and merged (rank None: its width)."""
    model = copy.deepcopy(base).double()
    if path is None:
        return model
    if path.is_dir():
        config = json.loads((path / "adapter_config.json").read_text())
        state = load_file(str(path / "adapter_model.safetensors"))
        rank = rank or config["r"]
        scale = config["lora_alpha"] / (math.sqrt(rank) if config["use_rslora"] else rank)
        with torch.no_grad():
            for key, lora_a in state.items():
                if key.endswith("lora_A.weight"):
                    module = model.get_submodule(key[len("base_model.model."):-len(".lora_A.weight")])
                    lora_b = state[key.replace("lora_A", "lora_B")]
                    module.weight += scale * (lora_a[:rank].double().t() @ lora_b[:, :rank].double().t())
        return model
    tensors, metadata = read_adapter(path)  # Conv1D: W is [in, out] like A B
    rank = rank or metadata["r_max"]
    scale = lora_scale(metadata["scale_rule"], metadata["alpha"], rank, metadata["scale_r_max"])
    with torch.no_grad():
        for key, lora_a in tensors.items():
            if key.endswith(".lora_a"):
                lora_b = tensors[key[:-len("lora_a")] + "lora_b"]
                model.get_submodule(key[:-len(".lora_a")]).weight += scale * (
                    lora_a[:, :rank].double() @ lora_b[:rank].double())
    return model

def bank_for(base, adapter_paths, dtype, slots=4, r_max=8):
    model = copy.deepcopy(base).to(dtype)
    bank = AdapterBank(model, target_modules=TARGETS, r_max=r_max, slots=slots)
    for name, path in adapter_paths.items():
        bank.load(name, path)
    return model, bank
