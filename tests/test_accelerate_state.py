"""``accelerate``'s layers decide how to run once per state of the layer: every change peft (or its user) makes
after the first call is followed at the next call, on the PyTorch path.

Each step changes the state of the peft model and of its accelerated copy alike, then compares their logits
(in evaluation, where the two draw no dropout mask) and counts the layers that ran the fused op.
"""

import copy

import pytest
import torch
from test_accelerate import add_second_adapter, input_ids, peft_model
from test_peft_parity import assert_close_relative

import hybrid_lora
from hybrid_lora.nn import peft as peft_integration

peft = pytest.importorskip("peft")

LAYERS = 7  # Llama's adapted projections

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def models(monkeypatch):
    """(plain peft model, its accelerated copy) after a first call of both: the layers' state is decided."""
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    plain = peft_model("llama", dropout=0.1).eval()
    fast = hybrid_lora.accelerate(copy.deepcopy(plain))
    assert_close_relative(fast(input_ids=input_ids()).logits, plain(input_ids=input_ids()).logits)
    return plain, fast


def same_logits(plain, fast):
    assert_close_relative(fast(input_ids=input_ids()).logits, plain(input_ids=input_ids()).logits)


def both(models, change):
    for model in models:
        change(model)


def projections(model):
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def test_disabling_merging_and_switching_adapters_after_the_first_call_are_followed(models, fused_calls):
    plain, fast = models
    fused_calls.clear()  # the first call's, when the fixture made the counter first
    with plain.disable_adapter(), fast.disable_adapter():
        same_logits(plain, fast)
        assert fused_calls == []  # peft's forward: the base model alone
    same_logits(plain, fast)
    assert len(fused_calls) == LAYERS
    both(models, lambda model: model.merge_adapter())
    same_logits(plain, fast)
    assert len(fused_calls) == LAYERS  # merged: peft's forward
    both(models, lambda model: model.unmerge_adapter())
    same_logits(plain, fast)
    assert len(fused_calls) == 2 * LAYERS
    both(models, lambda model: add_second_adapter(model, r=2))
    both(models, lambda model: model.set_adapter("other"))  # rank 2, scaling 3
    same_logits(plain, fast)
    assert len(fused_calls) == 3 * LAYERS
    both(models, lambda model: model.base_model.set_adapter(["default", "other"]))
    same_logits(plain, fast)
    assert len(fused_calls) == 3 * LAYERS  # two active adapters: peft's forward
    both(models, lambda model: model.base_model.set_adapter("default"))
    both(models, lambda model: model.delete_adapter("other"))
    same_logits(plain, fast)
    assert len(fused_calls) == 4 * LAYERS


def test_scale_dropout_modules_and_hooks_changed_after_the_first_call_are_followed(models, fused_calls):
    plain, fast = models
    fused_calls.clear()
    for model in models:
        for layer in projections(model):
            layer.set_scale("default", 0.5)
    same_logits(plain, fast)
    for model in models:  # new B modules in the adapter's slots, with other weights
        for layer in projections(model):
            out_features, rank = layer.lora_B["default"].weight.shape
            layer.lora_B["default"] = torch.nn.Linear(rank, out_features, bias=False)
            torch.nn.init.normal_(layer.lora_B["default"].weight, generator=torch.Generator().manual_seed(5))
    same_logits(plain, fast)
    assert len(fused_calls) == 2 * LAYERS
    for layer in projections(fast):
        layer.lora_dropout["default"].p = 0.25
    fast.train()(input_ids=input_ids())
    assert fused_calls[-LAYERS:] == [0.25] * LAYERS
    fast.eval()
    both(models, lambda model: projections(model)[0].lora_A["default"].register_forward_pre_hook(
        lambda module, inputs: (inputs[0] * 2.0,)))
    same_logits(plain, fast)
    assert len(fused_calls) == 4 * LAYERS - 1  # the hooked layer runs peft's forward, and its hook


def test_the_decision_is_kept_in_the_layer_and_restore_drops_it(models):
    _, fast = models
    layer = peft_integration.accelerated_layers(fast)[0]
    assert peft_integration._STRUCTURE in layer.__dict__
    hybrid_lora.restore(fast)
    assert peft_integration._STRUCTURE not in layer.__dict__
