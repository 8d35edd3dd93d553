"""``LoRALinear4bit`` and ``inject_lora`` over a model loaded in 4 bits (bitsandbytes on the CPU)."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (extra qlora)")

from conftest import TOLERANCES  # noqa: E402
from qlora_models import load_4bit, save_tiny_llama, token_batch  # noqa: E402

from hybrid_lora import inject_lora, set_rank  # noqa: E402
from hybrid_lora.nn.layer import lora_layers  # noqa: E402
from hybrid_lora.nn.quantized import LoRALinear4bit  # noqa: E402


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_inject_wraps_linear4bit_and_starts_equal_to_the_base(llama_folder, quant_type, double_quant):
    model = load_4bit(llama_folder, quant_type, double_quant)
    tokens = token_batch()
    with torch.no_grad():
        want = model(tokens).logits
    layers = inject_lora(model, target_modules=["q_proj", "v_proj", "down_proj"], r_max=12, alpha=8.0)
    assert len(layers) == 3 and all(isinstance(layer, LoRALinear4bit) for layer in layers)
    assert all(layer.weight.dtype == torch.uint8 for layer in layers)  # the packed Parameter, not a dense copy
    with torch.no_grad():
        got = model(tokens).logits  # B = 0: the adapter adds nothing yet
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_layer_matches_dequantized_reference(llama_folder):
    from bitsandbytes.functional import dequantize_4bit

    model = load_4bit(llama_folder)
    base = model.model.layers[0].mlp.down_proj
    dense = dequantize_4bit(base.weight.data, base.weight.quant_state).double()  # [out, in]
    layer = LoRALinear4bit(base, r_max=10, alpha=6.0)
    torch.nn.init.normal_(layer.lora_b)
    layer.set_rank(7)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    y = layer(x)
    xd = x.detach().double()
    a, b = layer.lora_a.detach().double()[:, :7], layer.lora_b.detach().double()[:7]
    want = xd @ dense.t() + layer.scale * (xd @ a) @ b
    torch.testing.assert_close(y.double(), want, **TOLERANCES[torch.float32])
    y.sum().backward()
    assert layer.lora_a.grad is not None and (layer.lora_a.grad[:, 7:] == 0).all()


def test_training_truncate_and_rank(llama_folder):
    model = load_4bit(llama_folder)
    layers = inject_lora(model, target_modules=["q_proj", "down_proj"], r_max=8, alpha=16.0, dropout=0.1)
    packed = [layer.weight.detach().clone() for layer in layers]
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * len(layers)  # only the adapters train
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    tokens = token_batch(seed=1)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(layer.weight, old) for layer, old in zip(layers, packed))
    model.eval()
    set_rank(model, 3)
    with torch.no_grad():
        at_rank_3 = model(tokens).logits
    for layer in lora_layers(model):
        layer.truncate_(3)
    assert layers[0].r_max == 3
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, at_rank_3)


def test_merge_refuses_and_merged_weight_is_dense(llama_folder):
    model = load_4bit(llama_folder)
    layers = inject_lora(model, target_modules="all-linear", r_max=4)
    assert len(layers) == 7 and all(isinstance(layer, LoRALinear4bit) for layer in layers)  # not the fp32 head
    layer = layers[0]
    with pytest.raises(RuntimeError, match="cannot be folded into a 4-bit weight") as info:
        layer.merge()
    assert "\n" not in str(info.value)
    assert layer.merged_weight().shape == (layer.in_features, layer.out_features)


def test_state_dict_keeps_the_quantization_state(llama_folder):
    model = load_4bit(llama_folder)
    before = set(model.state_dict())
    inject_lora(model, target_modules=["q_proj"], r_max=4)
    after = set(model.state_dict())
    assert before <= after
    assert after - before == {"model.layers.0.self_attn.q_proj.lora_a", "model.layers.0.self_attn.q_proj.lora_b"}


def test_8bit_layers_are_refused_in_one_line():
    model = torch.nn.Sequential(bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False))
    with pytest.raises(TypeError, match="Linear8bitLt is not supported") as info:
        inject_lora(model, target_modules=["0"])
    assert "\n" not in str(info.value)
