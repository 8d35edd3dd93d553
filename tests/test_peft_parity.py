"""Parity with peft's LoRA on small random-weight causal LMs of four architectures, every projection adapted.

GPT-2 (Conv1D: c_attn, c_proj, c_fc), Llama (nn.Linear without bias, grouped-query
attention), Qwen2 (bias on q/k/v only) and GPT-NeoX (a fused query_key_value and
every projection with a bias). Logits and every adapter's gradients are compared
with peft's at r_max and at a truncated rank, dropout 0, on the Triton kernels
(the interpreter on a CPU) and on the PyTorch path.
"""

import copy

import pytest
import torch
from helpers import assert_close_relative, tiny_gpt2, tiny_llama

from hybrid_lora import LoRAConv1D, LoRALinear, inject_lora, set_rank

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

R_MAX, ALPHA, VOCAB = 8, 16.0, 64


def qwen2():
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.Qwen2ForCausalLM(config)


def gpt_neox():
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=32, rotary_pct=0.5,
                                        hidden_dropout=0.0, attention_dropout=0.0)
    return transformers.GPTNeoXForCausalLM(config)


ARCHITECTURES = {
    # name: (builder, target_modules, layer class, adapted layers, of which with a bias)
    "gpt2": (lambda: tiny_gpt2(vocab=VOCAB), ["c_attn", "c_proj", "c_fc"], LoRAConv1D, 4, 4),
    "llama": (lambda: tiny_llama(vocab=VOCAB), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              LoRALinear, 7, 0),
    "qwen2": (qwen2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              LoRALinear, 7, 3),
    "gpt_neox": (gpt_neox, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], LoRALinear, 4, 4),
}


def base_model(arch):
    torch.manual_seed(0)
    model = ARCHITECTURES[arch][0]().eval()
    if arch == "qwen2":  # the init zeroes biases; make them matter
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("rank", [R_MAX, 3])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_logits_and_adapter_gradients_match_peft(arch, rank, backend, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", backend)
    _, targets, layer_class, n_layers, n_biased = ARCHITECTURES[arch]
    base = base_model(arch)
    ours = copy.deepcopy(base)
    layers = inject_lora(ours, targets, r_max=R_MAX, alpha=ALPHA)
    assert len(layers) == n_layers and all(type(layer) is layer_class for layer in layers)
    assert sum(layer.bias is not None for layer in layers) == n_biased
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers:
            # Live but small adapters, as training leaves them. Much larger ones (std 0.3 here) make the
            # random model so sensitive that fp32 rounding alone moves layer 0's gradients by 1e-4.
            layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=g) * 0.1)
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.1)
    set_rank(ours, rank)

    # Our scale is alpha / active rank; peft's is lora_alpha / r with r = the active rank.
    config = peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0, bias="none",
                             fan_in_fan_out=layer_class is LoRAConv1D)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    names = [name for name, module in ours.named_modules() if isinstance(module, (LoRAConv1D, LoRALinear))]
    peft_layers = [theirs.base_model.model.get_submodule(name) for name in names]
    with torch.no_grad():
        for layer, peft_layer in zip(layers, peft_layers):
            peft_layer.lora_A["default"].weight.copy_(layer.lora_a[:, :rank].t())
            peft_layer.lora_B["default"].weight.copy_(layer.lora_b[:rank].t())
            assert peft_layer.scaling["default"] == pytest.approx(layer.scale)

    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    our_logits, peft_logits = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert_close_relative(our_logits, peft_logits)
    # The adapters are live: the untouched model's logits differ.
    assert (our_logits - base(input_ids=ids).logits).abs().max() > 1e-2 * our_logits.abs().max()

    grad_out = torch.randn(our_logits.shape, generator=torch.Generator().manual_seed(3))
    (our_logits * grad_out).sum().backward()
    (peft_logits * grad_out).sum().backward()
    for name, layer, peft_layer in zip(names, layers, peft_layers):
        assert_close_relative(layer.lora_a.grad[:, :rank], peft_layer.lora_A["default"].weight.grad.t())
        assert_close_relative(layer.lora_b.grad[:rank], peft_layer.lora_B["default"].weight.grad.t())
        assert (layer.lora_a.grad[:, rank:] == 0).all() and (layer.lora_b.grad[rank:] == 0).all(), name
