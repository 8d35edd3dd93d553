"""``hybrid_lora.accelerate`` on peft models: the same logits and LoRA gradients as peft, its dropout, its fallbacks.

GPT-2 (Conv1D: c_attn, c_proj, c_fc), Llama (q, k, v, o, gate, up, down) and Qwen2 (bias on q/k/v)
are tiny random models built here (``test_peft_parity``'s). The parity test runs the Triton kernels
(the interpreter on a CPU) and the PyTorch path, and so does the test of dropout under activation
checkpointing; the tests of peft's other behaviours (fallbacks, restore, save, adapters, generation) run the
PyTorch path, as what they check is the patching.
"""

import copy
import json
import sys

import pytest
import torch
from helpers import assert_close_relative
from test_peft_parity import ARCHITECTURES, VOCAB, base_model

import hybrid_lora
from hybrid_lora.nn import peft as peft_integration

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

R, ALPHA = 5, 10.0  # a rank that is no power of two; scaling 2
LLAMA_TARGETS = ARCHITECTURES["llama"][1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def live_adapters(model, seed=2):
    """Small random B (peft starts it at zero, which would hide every error in the LoRA term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return model


def peft_model(arch="llama", dropout=0.0, **config):
    config = {"target_modules": ARCHITECTURES[arch][1], **config}
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, fan_in_fan_out=arch == "gpt2", **config)
    return live_adapters(peft.get_peft_model(base_model(arch), config))


def input_ids(batch=2, length=7, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def lora_grads(model):
    return {name: param.grad for name, param in model.named_parameters() if param.requires_grad}


def logits_and_grads(model, ids, grad_seed=3):
    logits = model(input_ids=ids).logits
    grad_out = torch.randn(logits.shape, generator=torch.Generator().manual_seed(grad_seed))
    (logits * grad_out).sum().backward()
    return logits.detach(), lora_grads(model)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_logits_and_every_lora_gradient_equal_peft(arch, backend, monkeypatch, fused_calls):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", backend)
    plain = peft_model(arch)
    fast = hybrid_lora.accelerate(copy.deepcopy(plain))
    n_layers, n_biased = ARCHITECTURES[arch][3:]
    layers = peft_integration.accelerated_layers(fast)
    assert len(layers) == n_layers and sum(layer.base_layer.bias is not None for layer in layers) == n_biased
    ids = input_ids()
    want_logits, want = logits_and_grads(plain, ids)
    got_logits, got = logits_and_grads(fast, ids)
    assert fused_calls == [0.0] * n_layers  # every layer ran the op, once
    assert_close_relative(got_logits, want_logits)
    assert (want_logits - base_model(arch)(input_ids=ids).logits).abs().max() > 1e-2 * want_logits.abs().max()
    assert set(got) == set(want) and len(want) == 2 * n_layers
    params = dict(fast.named_parameters())
    for name, grad in want.items():
        assert_close_relative(got[name], grad)
        assert got[name].stride() == params[name].stride(), name  # in peft's own layout


def identity_lora_layer(kind, width, dropout):
    """One peft LoRA layer with W = 0, b = 0, A = B = I and scaling 1: its output is dropout(x) itself."""
    from transformers.pytorch_utils import Conv1D

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(width, width) if kind == "linear" else Conv1D(width, width)

    config = peft.LoraConfig(r=width, lora_alpha=width, lora_dropout=dropout, target_modules=["proj"],
                             fan_in_fan_out=kind == "conv1d")
    holder = peft.inject_adapter_in_model(config, Holder())
    layer = holder.proj
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
        layer.lora_A["default"].weight.copy_(torch.eye(width))
        layer.lora_B["default"].weight.copy_(torch.eye(width))
    return holder


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dropout_drops_about_p_of_the_elements_and_scales_the_rest(kind, backend, monkeypatch, fused_calls):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", backend)
    p, rows, width = 0.25, 128, 16
    holder = hybrid_lora.accelerate(identity_lora_layer(kind, width, p)).train()
    x = torch.ones(rows, width)
    first, second = holder.proj(x), holder.proj(x)
    assert fused_calls == [p, p]
    n = first.numel()
    for y in (first, second):
        kept = y != 0
        assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)), rtol=1e-6, atol=0)
        # binomial: 5 standard deviations of the dropped fraction
        assert abs((~kept).float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert (first != second).any()  # a new mask per call
    assert torch.equal(holder.eval().proj(x), x)  # no dropout in evaluation


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_mean_over_dropout_masks_is_peft_evaluation_output(kind, torch_path, fused_calls):
    p, rows, width = 0.3, 2048, 16
    torch.manual_seed(0)
    holder = live_adapters(identity_lora_layer(kind, width, p))
    with torch.no_grad():
        for param in holder.parameters():
            param.copy_(torch.randn(param.shape) * 0.5)
    plain = copy.deepcopy(holder)
    fast = hybrid_lora.accelerate(holder).train()
    x = torch.randn(1, width).expand(rows, width)  # one input, a mask per row
    samples = fast.proj(x).detach()
    want = plain.eval().proj(x[:1]).detach()
    mean, sem = samples.mean(0), samples.std(0) / rows ** 0.5
    assert sem.min() > 0  # the masks vary
    assert ((mean - want[0]).abs() <= 5 * sem).all(), ((mean - want[0]).abs() / sem).max()
    assert fused_calls == [p]


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_dropout_under_activation_checkpointing_gives_the_same_gradients(reentrant, path, monkeypatch, fused_calls):
    """The recomputed forward draws the forward's masks, on both paths (the Triton one: its dropout seed and row
    offset reach the kernels as device tensors that checkpointing must not change)."""
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    # Under the interpreter, two of Llama's seven projections (one of the attention's, one of the MLP's).
    targets = LLAMA_TARGETS if path == "torch" else ["v_proj", "down_proj"]
    plain = peft_model("llama", dropout=0.3, target_modules=targets)
    model = hybrid_lora.accelerate(plain).train()

    def grads(seed, checkpointing):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        else:
            model.gradient_checkpointing_disable()
        torch.manual_seed(seed)
        ids = input_ids()
        model(input_ids=ids, labels=ids).loss.backward()
        out = {name: grad.clone() for name, grad in lora_grads(model).items()}
        model.zero_grad(set_to_none=True)
        return out

    want = grads(7, checkpointing=False)
    calls = len(fused_calls)
    got = grads(7, checkpointing=True)
    assert len(fused_calls) == 3 * calls  # forward, then the recomputed forward
    for name in want:
        assert torch.equal(got[name], want[name]), name
    other = grads(8, checkpointing=True)  # the mask matters: another seed, other gradients
    assert any(not torch.equal(other[name], want[name]) for name in want)


def add_second_adapter(model, name="other", r=3, **config):
    torch.manual_seed(4)  # lora_A's initialisation
    model.add_adapter(name, peft.LoraConfig(r=r, lora_alpha=6.0, target_modules=LLAMA_TARGETS, **config))
    return live_adapters(model, seed=4)


UNSUPPORTED = {  # case: (what makes the model, the reason accelerate gives)
    "two active adapters": (lambda: _two_active(), "2 active adapters"),
    "DoRA": (lambda: peft_model(use_dora=True), "DoRA"),
    "lora_bias": (lambda: peft_model(lora_bias=True), "lora_bias"),
    "merged": (lambda: _merged(), "merged"),
    "embedding": (lambda: peft_model(target_modules=["embed_tokens"]), "a Embedding layer"),
}


def _two_active():
    model = add_second_adapter(peft_model())
    model.base_model.set_adapter(["default", "other"])
    return model


def _merged():
    model = peft_model()
    model.merge_adapter()
    return model


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_layers_keep_peft_forward_or_raise_with_strict(case, torch_path, fused_calls):
    build, reason = UNSUPPORTED[case]
    if case == "lora_bias" and "lora_bias" not in peft.LoraConfig.__dataclass_fields__:
        pytest.skip(f"peft {peft.__version__} has no lora_bias (peft >= 0.14)")
    plain = build()
    before = {name: dict(module.__dict__) for name, module in plain.named_modules()}
    with pytest.raises(ValueError, match=rf"{reason}: .*strict=True"):
        hybrid_lora.accelerate(plain, strict=True)
    assert {name: dict(module.__dict__) for name, module in plain.named_modules()} == before  # nothing patched
    fast = copy.deepcopy(plain)
    n_layers = 1 if case == "embedding" else 7
    with pytest.warns(UserWarning, match=rf"{n_layers} of {n_layers} peft LoRA layers run peft's forward \({reason}: "
                                         r"base_model\.model\.model\.\w"):
        hybrid_lora.accelerate(fast)
    ids = input_ids()
    assert torch.equal(fast(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert fused_calls == []


def test_hooked_base_layers_keep_peft_forward(torch_path, fused_calls):
    """A hook on a base layer (DeepSpeed ZeRO-3 gathers weights in one, accelerate offloads in one) must run."""
    plain = peft_model()
    hooked = [m for m in plain.modules() if type(m).__name__ == "Linear" and hasattr(m, "base_layer")][:2]
    for layer in hooked:
        layer.base_layer.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 2.0,))
    fast = copy.deepcopy(plain)
    with pytest.warns(UserWarning, match=r"2 of 7 peft LoRA layers run peft's forward \(base layer Linear \(or a "
                                         r"hook on it\): .*q_proj, .*k_proj\)"):
        hybrid_lora.accelerate(fast)
    assert len(peft_integration.accelerated_layers(fast)) == 5
    ids = input_ids()
    assert_close_relative(fast(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert len(fused_calls) == 5
    for model in (plain, fast):  # a hook that comes after accelerate is followed at the next call
        model.base_model.model.model.layers[0].mlp.down_proj.base_layer.register_forward_hook(
            lambda module, inputs, output: output + 1.0)
    assert_close_relative(fast(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert len(fused_calls) == 5 + 4


def test_a_layer_follows_its_state_at_call_time(torch_path, fused_calls):
    plain = _merged()
    with pytest.warns(UserWarning, match="merged"):
        fast = hybrid_lora.accelerate(copy.deepcopy(plain))
    ids = input_ids()
    for model in (plain, fast):
        model.unmerge_adapter()
    assert_close_relative(fast(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert fused_calls == [0.0] * 7
    for model in (plain, fast):  # two adapters active, then one of them
        add_second_adapter(model, r=2, use_rslora=True)
        model.base_model.set_adapter(["default", "other"])
    assert torch.equal(fast(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert len(fused_calls) == 7
    for model in (plain, fast):
        model.set_adapter("other")  # rank 2, scaling 6 / sqrt(2)
    assert_close_relative(fast(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert len(fused_calls) == 14
    for model in (plain, fast):
        for layer in model.modules():
            if isinstance(layer, peft.tuners.lora.LoraLayer):
                layer.set_scale("other", 0.25)  # scaling 0.25 * 6 / sqrt(2)
    assert_close_relative(fast(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert len(fused_calls) == 21


def test_adapter_names_mixed_batch_runs_peft_forward(torch_path, fused_calls):
    plain = add_second_adapter(peft_model()).eval()
    fast = hybrid_lora.accelerate(copy.deepcopy(plain))
    ids = input_ids()
    names = ["other", "__base__"]
    assert torch.equal(fast(input_ids=ids, adapter_names=names).logits,
                       plain(input_ids=ids, adapter_names=names).logits)
    assert fused_calls == []
    assert_close_relative(fast(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert len(fused_calls) == 7


def test_restore_gives_back_peft_forward_and_nothing_else(torch_path, fused_calls):
    from peft.tuners.lora import layer as lora

    model = peft_model()
    before = {name: dict(module.__dict__) for name, module in model.named_modules()}
    ids = input_ids()
    want = model(input_ids=ids).logits
    assert hybrid_lora.accelerate(model) is model
    hybrid_lora.accelerate(model)  # again: nothing more
    assert_close_relative(model(input_ids=ids).logits, want)
    assert len(fused_calls) == 7
    assert hybrid_lora.restore(model) is model
    assert {name: dict(module.__dict__) for name, module in model.named_modules()} == before
    for module in model.modules():
        if isinstance(module, lora.LoraLayer):
            assert type(module) is lora.Linear and module.forward.__func__ is lora.Linear.forward
    assert torch.equal(model(input_ids=ids).logits, want)
    assert len(fused_calls) == 7


def test_copies_and_pickles_keep_the_acceleration(tmp_path, torch_path, fused_calls):
    model = hybrid_lora.accelerate(peft_model())
    ids = input_ids()
    want = model(input_ids=ids).logits
    torch.save(model, tmp_path / "model.pt")
    for copied in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert len(peft_integration.accelerated_layers(copied)) == 7
        assert torch.equal(copied(input_ids=ids).logits, want)
    assert len(fused_calls) == 3 * 7
    assert len(peft_integration.accelerated_layers(hybrid_lora.restore(copied))) == 0


def test_a_replica_runs_its_own_parameters(torch_path, fused_calls):
    """nn.DataParallel's replicas share their original's instance attributes and hold their own parameters."""
    layer = peft_integration.accelerated_layers(hybrid_lora.accelerate(peft_model()))[0]
    replica = layer._replicate_for_data_parallel()
    replica._modules = {name: copy.deepcopy(module) for name, module in layer._modules.items()}
    with torch.no_grad():
        replica.lora_B["default"].weight.mul_(2.0)
    x = torch.randn(3, layer.in_features)
    want = layer.base_layer(x) + 2.0 * (layer(x) - layer.base_layer(x))
    assert_close_relative(replica(x), want)
    assert len(fused_calls) == 2


# bf16 keeps 8 mantissa bits; a few roundings in each of the layers
BF16_REL = 8 * 2.0 ** -8


def test_bf16_autocast_and_fp32_adapters_over_a_bf16_model(torch_path, fused_calls):
    ids = input_ids()
    plain = peft_model()
    fast = hybrid_lora.accelerate(copy.deepcopy(plain))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = plain(input_ids=ids).logits, fast(input_ids=ids).logits
    assert want.dtype == got.dtype == torch.bfloat16 and len(fused_calls) == 7
    assert_close_relative(got.float(), want.float(), rel=BF16_REL)
    # get_peft_model keeps the adapters of a bf16 model in fp32 (autocast_adapter_dtype)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=LLAMA_TARGETS)
    plain = live_adapters(peft.get_peft_model(base_model("llama").to(torch.bfloat16), config))
    assert {param.dtype for name, param in plain.named_parameters() if "lora_" in name} == {torch.float32}
    fast = hybrid_lora.accelerate(copy.deepcopy(plain))
    want, got = plain(input_ids=ids).logits, fast(input_ids=ids).logits
    assert want.dtype == got.dtype == torch.bfloat16 and len(fused_calls) == 14
    assert_close_relative(got.float(), want.float(), rel=BF16_REL)


def test_state_dict_and_saved_adapter_are_peft_own(tmp_path, torch_path):
    # Two builds, not a deep copy: a copied config's target_modules set may list its names in another order.
    plain, fast = peft_model("gpt2"), hybrid_lora.accelerate(peft_model("gpt2"))
    ids = input_ids()
    fast(input_ids=ids)  # the constants are cached now
    want, got = plain.state_dict(), fast.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[key], want[key]) for key in want)
    assert [name for name, _ in fast.named_buffers()] == [name for name, _ in plain.named_buffers()]
    plain.save_pretrained(tmp_path / "plain")
    fast.save_pretrained(tmp_path / "fast")
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "fast" / file).read_bytes() == (tmp_path / "plain" / file).read_bytes(), file
    assert json.loads((tmp_path / "fast" / "adapter_config.json").read_text())["r"] == R
    loaded = peft.PeftModel.from_pretrained(base_model("gpt2"), str(tmp_path / "fast"))
    assert not peft_integration.accelerated_layers(loaded)
    assert_close_relative(loaded(input_ids=ids).logits, fast(input_ids=ids).logits)


def test_disable_adapter_merge_and_unload_and_generation_are_peft_own(torch_path, fused_calls):
    plain = peft_model().eval()
    fast = hybrid_lora.accelerate(copy.deepcopy(plain))
    ids = input_ids()
    with fast.disable_adapter():
        assert torch.equal(fast(input_ids=ids).logits, base_model("llama")(input_ids=ids).logits)
    assert fused_calls == []
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(input_ids=ids, **kwargs), plain.generate(input_ids=ids, **kwargs))
    assert len(fused_calls) == 5 * 7  # each new token through the 7 layers
    merged = fast.merge_and_unload()
    assert not peft_integration.accelerated_layers(merged)
    assert_close_relative(merged(input_ids=ids).logits, plain.merge_and_unload()(input_ids=ids).logits)


def test_bad_models_and_a_missing_peft_say_what_was_expected(monkeypatch):
    with pytest.raises(ValueError, match=r"LlamaForCausalLM holds no peft LoRA layer; expected a model from "
                                         r"peft\.get_peft_model"):
        hybrid_lora.accelerate(base_model("llama"))
    for name in [name for name in sys.modules if name == "peft" or name.startswith("peft.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"hybrid_lora\.accelerate needs peft, which is not installed"):
        hybrid_lora.accelerate(base_model("llama"))
