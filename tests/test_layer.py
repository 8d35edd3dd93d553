"""LoRAConv1D as a drop-in for GPT-2's c_attn: against the untouched model and against peft."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from hybrid_lora import LoRAConv1D, inject_lora, lora_layers, set_rank

R_MAX, ALPHA = 8, 16.0


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def token_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (2, 9), generator=g)


def randomize_adapters(layers, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=g) * 0.3)
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.3)


def assert_close_relative(got, want, rel=1e-4):
    """max |got - want| <= rel * max |want|: two fp32 backward passes that sum in different orders."""
    err, size = (got - want).abs().max().item(), want.abs().max().item()
    assert size > 0 and err <= rel * size, f"max |diff| {err:.3e} > {rel} * {size:.3e}"


def test_zero_b_gives_the_untouched_logits():
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    layers = inject_lora(model, r_max=R_MAX, alpha=ALPHA)
    assert len(layers) == 2 and all(isinstance(m, LoRAConv1D) for m in layers)
    ids = token_batch()
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_only_the_adapters_train_and_state_dict_keeps_base_keys():
    model = tiny_gpt2()
    base_keys = set(model.state_dict())
    inject_lora(model, r_max=R_MAX, alpha=ALPHA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.c_attn.{p}" for i in range(2) for p in ("lora_a", "lora_b")}
    keys = set(model.state_dict())
    assert base_keys <= keys and keys - base_keys == trainable
    # A plain GPT-2 checkpoint loads into the injected model (adapters keep their values).
    missing, unexpected = model.load_state_dict(tiny_gpt2(seed=5).state_dict(), strict=False)
    assert set(missing) == trainable and not unexpected


@pytest.mark.parametrize("rank", [R_MAX, 3])
def test_logits_and_gradients_match_peft(rank):
    peft = pytest.importorskip("peft")
    base = tiny_gpt2()
    ours = copy.deepcopy(base)
    layers = inject_lora(ours, r_max=R_MAX, alpha=ALPHA)
    randomize_adapters(layers)
    set_rank(ours, rank)

    config = peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=["c_attn"],
                             lora_dropout=0.0, fan_in_fan_out=True, bias="none")
    # Our scale is alpha / active rank; peft's is lora_alpha / r with r = the active rank.
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    peft_layers = [m for m in theirs.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(peft_layers) == 2
    with torch.no_grad():
        for ours_layer, peft_layer in zip(layers, peft_layers):
            peft_layer.lora_A["default"].weight.copy_(ours_layer.lora_a[:, :rank].t())
            peft_layer.lora_B["default"].weight.copy_(ours_layer.lora_b[:rank].t())
            assert peft_layer.scaling["default"] == pytest.approx(ours_layer.scale)

    ids = token_batch()
    our_logits, peft_logits = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(our_logits, peft_logits, rtol=1e-4, atol=1e-4)
    # Untouched logits differ: the adapters are live.
    assert (our_logits - base(ids).logits).abs().max() > 1e-2

    grad_out = torch.randn(our_logits.shape, generator=torch.Generator().manual_seed(3))
    (our_logits * grad_out).sum().backward()
    (peft_logits * grad_out).sum().backward()
    for ours_layer, peft_layer in zip(layers, peft_layers):
        assert_close_relative(ours_layer.lora_a.grad[:, :rank], peft_layer.lora_A["default"].weight.grad.t())
        assert_close_relative(ours_layer.lora_b.grad[:rank], peft_layer.lora_B["default"].weight.grad.t())
        assert (ours_layer.lora_a.grad[:, rank:] == 0).all() and (ours_layer.lora_b.grad[rank:] == 0).all()


def make_layer(seed=0, in_features=12, out_features=20, r_max=R_MAX):
    torch.manual_seed(seed)
    conv = Conv1D(out_features, in_features)
    layer = LoRAConv1D.from_conv1d(conv, r_max=r_max, alpha=ALPHA)
    randomize_adapters([layer], seed)
    return conv, layer


def test_set_rank_changes_scale_and_output():
    _, layer = make_layer()
    x = torch.randn(5, 12)
    layer.set_rank(4)
    assert layer.rank == 4 and layer.scale == ALPHA / 4
    expected = x @ layer.weight + layer.bias + (ALPHA / 4) * x @ layer.lora_a[:, :4] @ layer.lora_b[:4]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_truncate_keeps_the_leading_components_and_parameters():
    _, layer = make_layer()
    x = torch.randn(5, 12)
    layer.set_rank(3)
    before = layer(x).detach()
    lora_a, lora_b = layer.lora_a, layer.lora_b
    layer.truncate_(3)
    assert layer.lora_a is lora_a and layer.lora_b is lora_b  # an optimizer's references stay valid
    assert layer.r_max == 3 and layer.lora_a.shape == (12, 3) and layer.lora_b.shape == (3, 20)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank 4 is outside"):
        layer.set_rank(4)


def test_merge_and_unmerge_round_trip():
    conv, layer = make_layer()
    x = torch.randn(5, 12)
    layer.set_rank(5)
    unmerged = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        layer.set_rank(2)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, conv.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_dropout_is_off_in_eval_mode():
    _, layer = make_layer()
    layer.dropout = 0.5
    x = torch.randn(5, 12)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("bad", [0, R_MAX + 1, 2.0, True])
def test_bad_ranks_are_refused(bad):
    _, layer = make_layer()
    with pytest.raises(ValueError, match="outside"):
        layer.set_rank(bad)


def test_inject_errors():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="no module named"):
        inject_lora(model, target_modules=("q_proj",))
    with pytest.raises(TypeError, match="ln_f is a LayerNorm"):
        inject_lora(model, target_modules=("ln_f",))
    inject_lora(tiny_gpt2(), r_max=4)
    injected = tiny_gpt2()
    inject_lora(injected, r_max=4)
    with pytest.raises(ValueError, match="already holds"):
        inject_lora(injected, r_max=4)
    with pytest.raises(ValueError, match="no LoRAConv1D"):
        set_rank(tiny_gpt2(), 2)
    assert len(lora_layers(injected)) == 2


def test_peft_style_initialisation():
    _, layer = make_layer()
    layer.reset_lora_parameters()
    assert (layer.lora_b == 0).all()
    bound = 1 / 12 ** 0.5
    assert layer.lora_a.abs().max() <= bound and layer.lora_a.std() > bound / 4
