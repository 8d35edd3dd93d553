"""The LoRA layers as drop-ins for Conv1D and nn.Linear: rank, truncation, merging, and which modules get one.

Parity of logits and gradients with peft on whole models: tests/test_peft_parity.py.
"""

import copy

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama
from transformers.pytorch_utils import Conv1D

from hybrid_lora import LoRAConv1D, LoRALinear, inject_lora, lora_layers, set_rank

R_MAX, ALPHA = 8, 16.0


def gpt2(seed=0):
    return tiny_gpt2(seed, layers=2, vocab=64).eval()


def token_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (2, 9), generator=g)


def randomize_adapters(layers, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=g) * 0.3)
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.3)


def test_zero_b_gives_the_untouched_logits():
    base = gpt2()
    model = copy.deepcopy(base)
    layers = inject_lora(model, r_max=R_MAX, alpha=ALPHA)
    assert len(layers) == 2 and all(isinstance(m, LoRAConv1D) for m in layers)
    ids = token_batch()
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_only_the_adapters_train_and_state_dict_keeps_base_keys():
    model = gpt2()
    base_keys = set(model.state_dict())
    inject_lora(model, r_max=R_MAX, alpha=ALPHA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.c_attn.{p}" for i in range(2) for p in ("lora_a", "lora_b")}
    keys = set(model.state_dict())
    assert base_keys <= keys and keys - base_keys == trainable
    # A plain GPT-2 checkpoint loads into the injected model (adapters keep their values).
    missing, unexpected = model.load_state_dict(gpt2(seed=5).state_dict(), strict=False)
    assert set(missing) == trainable and not unexpected


KINDS = ["conv1d", "linear", "linear-no-bias"]
IN, OUT = 12, 20


def make_layer(kind="conv1d", seed=0, r_max=R_MAX):
    """(the plain module, its LoRA layer with random adapters)."""
    torch.manual_seed(seed)
    if kind == "conv1d":
        module = Conv1D(OUT, IN)
        with torch.no_grad():
            module.bias.normal_()
    else:
        module = torch.nn.Linear(IN, OUT, bias=kind == "linear")
    cls = LoRAConv1D if kind == "conv1d" else LoRALinear
    layer = cls.from_module(module, r_max=r_max, alpha=ALPHA)
    randomize_adapters([layer], seed)
    return module, layer


def expected_output(module, layer, x, rank):
    """The plain module's output plus the adapter, written out: x W + b + (alpha / r) x A_r B_r."""
    return module(x) + (ALPHA / rank) * x @ layer.lora_a[:, :rank] @ layer.lora_b[:rank]


@pytest.mark.parametrize("kind", KINDS)
def test_both_kinds_hold_the_same_adapter_and_the_module_weight(kind):
    module, layer = make_layer(kind)
    assert layer.lora_a.shape == (IN, R_MAX) and layer.lora_b.shape == (R_MAX, OUT)
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    # The frozen weight is the module's Parameter, and the op reads W [in, out] without a copy.
    assert layer.weight is module.weight and not layer.weight.requires_grad
    w = layer.frozen_weight()
    assert w.shape == (IN, OUT) and w.data_ptr() == module.weight.data_ptr()
    # The state dict keys are the module's, plus the adapter.
    assert set(layer.state_dict()) == set(module.state_dict()) | {"lora_a", "lora_b"}


@pytest.mark.parametrize("kind", KINDS)
def test_set_rank_changes_scale_and_output(kind):
    module, layer = make_layer(kind)
    x = torch.randn(5, IN)
    layer.set_rank(4)
    assert layer.rank == 4 and layer.scale == ALPHA / 4
    torch.testing.assert_close(layer(x), expected_output(module, layer, x, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_truncate_keeps_the_leading_components_and_parameters(kind):
    _, layer = make_layer(kind)
    x = torch.randn(5, IN)
    layer.set_rank(3)
    before = layer(x).detach()
    lora_a, lora_b = layer.lora_a, layer.lora_b
    names = [name for name, _ in layer.named_parameters()]
    replaced = layer.truncate_(3)
    # New Parameters (a compiled graph's guards see a changed module), owning their storage, still trainable.
    assert replaced == {lora_a: layer.lora_a, lora_b: layer.lora_b}
    assert layer.lora_a is not lora_a and layer.lora_b is not lora_b
    assert isinstance(layer.lora_a, torch.nn.Parameter) and layer.lora_a.requires_grad and layer.lora_b.requires_grad
    assert layer.lora_a.is_contiguous() and layer.lora_a.untyped_storage().nbytes() == IN * 3 * 4
    assert [name for name, _ in layer.named_parameters()] == names  # the state dict's names and order
    assert layer.r_max == 3 and layer.lora_a.shape == (IN, 3) and layer.lora_b.shape == (3, OUT)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank 4 is outside"):
        layer.set_rank(4)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unmerge_round_trip(kind):
    module, layer = make_layer(kind)
    original = module.weight.detach().clone()
    x = torch.randn(5, IN)
    layer.set_rank(5)
    unmerged = layer(x).detach()
    layer.merge()
    # The merged weight is W + delta in the module's own layout ([out, in] for nn.Linear).
    delta = layer.delta_weight() if kind == "conv1d" else layer.delta_weight().t()
    torch.testing.assert_close(module.weight, original + delta, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        layer.set_rank(2)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_is_off_in_eval_mode(kind):
    _, layer = make_layer(kind)
    layer.dropout = 0.5
    x = torch.randn(5, IN)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("bad", [0, R_MAX + 1, 2.0, True])
@pytest.mark.parametrize("kind", ["conv1d", "linear"])
def test_bad_ranks_are_refused(bad, kind):
    _, layer = make_layer(kind)
    with pytest.raises(ValueError, match="outside"):
        layer.set_rank(bad)


def test_inject_errors():
    model = gpt2()
    with pytest.raises(ValueError, match=r"no module of GPT2LMHeadModel matches target_modules \('q_proj',\)"):
        inject_lora(model, target_modules=("q_proj",))
    with pytest.raises(TypeError, match="ln_f is a LayerNorm"):
        inject_lora(model, target_modules=("ln_f",))
    with pytest.raises(TypeError, match="transformer.h.0.attn is a GPT2Attention"):
        inject_lora(model, target_modules=r".*\.attn")
    with pytest.raises(ValueError, match="not a regular expression"):
        inject_lora(model, target_modules="(c_attn")
    with pytest.raises(ValueError, match="non-empty list"):
        inject_lora(model, target_modules=[])
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # nothing changed
    injected = gpt2()
    inject_lora(injected, r_max=4)
    with pytest.raises(ValueError, match="already holds"):
        inject_lora(injected, r_max=4)
    with pytest.raises(ValueError, match="no LoRA layer"):
        set_rank(gpt2(), 2)
    assert len(lora_layers(injected)) == 2


def test_peft_style_initialisation():
    _, layer = make_layer("linear")
    layer.reset_lora_parameters()
    assert (layer.lora_b == 0).all()
    bound = 1 / IN ** 0.5
    assert layer.lora_a.abs().max() <= bound and layer.lora_a.std() > bound / 4


TARGET_CASES = [
    ("gpt2", ["c_attn", "c_proj", "c_fc"]),
    ("gpt2", ["attn"]),  # a suffix starts after a '.': c_attn is not selected, h.N.attn is
    ("gpt2", ["transformer.h.0.mlp.c_fc"]),  # a full name
    ("gpt2", r"transformer\.h\.1\..*c_(attn|proj)"),  # a regular expression over whole names
    ("gpt2", "c_attn"),  # a string is a full match: no module is named just c_attn
    ("gpt2", ["lm_head"]),
    ("gpt2", "all-linear"),
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("llama", r".*\.(q|v)_proj"),
    ("llama", ["proj"]),
    ("llama", "all-linear"),
]


@pytest.mark.parametrize("arch, targets", TARGET_CASES)
def test_module_selection_is_peft_s(arch, targets):
    """inject_lora adapts exactly the modules peft adapts for the same target_modules, or refuses when peft does."""
    peft = pytest.importorskip("peft")
    model = gpt2() if arch == "gpt2" else tiny_llama(layers=2, vocab=64).eval()
    try:
        peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=targets))
    except ValueError:  # no module matched, or a matched module is no layer peft can adapt
        with pytest.raises((ValueError, TypeError)):
            inject_lora(model, targets, r_max=2)
        return
    theirs = [name for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")]
    layers = inject_lora(model, targets, r_max=2)
    assert [name for name, m in model.named_modules() if any(m is layer for layer in layers)] == theirs
    if targets == "all-linear":
        assert "lm_head" not in theirs and len(theirs) == (8 if arch == "gpt2" else 14)


def test_lm_head_is_adapted_only_when_named_and_stays_tied():
    model = gpt2()
    layers = inject_lora(model, target_modules=["c_attn", "lm_head"], r_max=R_MAX)
    assert isinstance(model.lm_head, LoRALinear) and model.lm_head.weight is model.transformer.wte.weight
    assert sum(isinstance(layer, LoRAConv1D) for layer in layers) == 2
    with pytest.raises(RuntimeError, match="tied to another module"):
        model.lm_head.merge()
    model.transformer.h[0].attn.c_attn.merge()  # an untied weight merges
