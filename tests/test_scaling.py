"""Scale rules: the layer's scale at each rank, a truncated adapter keeping its rule through its file, and
peft reproducing every rule from the exported config."""

import math

import pytest
import torch
from conftest import TOLERANCES

from hybrid_lora import LoRAConv1D, inject_lora, lora_layers
from hybrid_lora.io.adapter_files import attach_adapter, read_adapter, save_adapter
from hybrid_lora.io.export import export_peft, peft_state
from hybrid_lora.io.models import load_model_and_tokenizer
from hybrid_lora.nn.scaling import SCALE_RULES, lora_scale, peft_scale_fields
from hybrid_lora.train.dynamic_rank import truncate_adapters

R_MAX = 8


@pytest.fixture(autouse=True)
def offline_torch_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_each_rule_gives_its_formula(rank):
    assert lora_scale("alpha/r", 32.0, rank, R_MAX) == 32.0 / rank
    assert lora_scale("rslora", 32.0, rank, R_MAX) == 32.0 / math.sqrt(rank)
    assert lora_scale("fixed", 32.0, rank, R_MAX) == 32.0 / R_MAX
    with pytest.raises(ValueError, match=r"scale rule 'alpha/sqrt\(r\)'; expected one of"):
        lora_scale("alpha/sqrt(r)", 32.0, rank, R_MAX)


@pytest.mark.parametrize("rule", SCALE_RULES)
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_peft_fields_give_the_same_scale_as_peft_computes_it(rule, rank):
    fields = peft_scale_fields(rule, 32.0, rank, R_MAX)
    # peft's LoraLayer.update_layer: lora_alpha / sqrt(r) with use_rslora, else lora_alpha / r
    peft_scale = fields["lora_alpha"] / (math.sqrt(rank) if fields["use_rslora"] else rank)
    assert peft_scale == pytest.approx(lora_scale(rule, 32.0, rank, R_MAX), rel=1e-12)


def test_layer_default_is_alpha_over_r_as_in_peft_and_a_cut_keeps_the_rule():
    weight = torch.zeros(4, 3)
    assert LoRAConv1D(weight, r_max=R_MAX, alpha=16.0).scale == 2.0
    fixed = LoRAConv1D(weight, r_max=R_MAX, alpha=16.0, scale_rule="fixed")
    fixed.set_rank(2)
    assert fixed.scale == 2.0  # alpha / r_max, not alpha / 2
    truncate_adapters([fixed], 4)
    assert fixed.r_max == 4 and fixed.scale == 2.0  # still divided by the width it was trained at
    with pytest.raises(ValueError, match="scale rule 'sqrt'"):
        LoRAConv1D(weight, r_max=R_MAX, scale_rule="sqrt")


def _trained(rule):
    model, tokenizer = load_model_and_tokenizer("embedded", device="cpu")
    torch.manual_seed(0)
    inject_lora(model, r_max=R_MAX, alpha=32.0, dropout=0.0, scale_rule=rule)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_b.normal_(0.0, 0.02)
    return model.eval(), tokenizer


def _logits(model, tokenizer):
    enc = tokenizer(["Anna lives in Dunmore. She works as a"], return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


@pytest.mark.parametrize("rule", SCALE_RULES)
def test_truncated_adapter_keeps_its_rule_through_its_file_and_through_peft(tmp_path, rule):
    from peft import PeftModel

    model, tokenizer = _trained(rule)
    truncate_adapters(lora_layers(model), 6)  # as the rank schedule leaves it
    for layer in lora_layers(model):
        layer.set_rank(3)
    ours = _logits(model, tokenizer)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, "embedded")
    _, metadata = read_adapter(path)
    assert (metadata["scale_rule"], metadata["scale_r_max"], metadata["r_max"]) == (rule, R_MAX, 6)

    fresh, _ = load_model_and_tokenizer("embedded", device="cpu")
    attach_adapter(fresh, path)
    assert all(layer.scale == lora_scale(rule, 32.0, 3, R_MAX) for layer in lora_layers(fresh))
    torch.testing.assert_close(_logits(fresh.eval(), tokenizer), ours, atol=0, rtol=0)

    _, config = peft_state(fresh, 3)
    assert config["use_rslora"] == (rule == "rslora")
    export_peft(fresh, tmp_path / "peft", 3, base_model_name_or_path="embedded")
    base, _ = load_model_and_tokenizer("embedded", device="cpu")
    with_peft = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(with_peft, tokenizer), ours, **TOLERANCES[torch.float32])
