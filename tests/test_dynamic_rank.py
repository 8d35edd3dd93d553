"""DyLoRA's sampled rank, its 'frozen' gradient, the rank schedule, and rank cuts that keep AdamW's state."""

import pytest
import torch

from hybrid_lora import LoRAConv1D
from hybrid_lora.ops import reference
from hybrid_lora.train.dynamic_rank import (RankSampler, active_rank, check_rank_schedule,
                                            freeze_leading_grads, scheduled_rank, truncate_adapters)


pytestmark = pytest.mark.usefixtures("torch_path")


def make_layer(r_max=6, seed=0, in_features=7, out_features=5):
    generator = torch.Generator().manual_seed(seed)
    layer = LoRAConv1D(torch.randn(in_features, out_features, generator=generator, dtype=torch.float64),
                       torch.randn(out_features, generator=generator, dtype=torch.float64), r_max=r_max, alpha=2.0)
    with torch.no_grad():
        layer.lora_a.copy_(torch.randn(in_features, r_max, generator=generator, dtype=torch.float64))
        layer.lora_b.copy_(torch.randn(r_max, out_features, generator=generator, dtype=torch.float64))
    return layer


def test_rank_schedule_is_checked():
    assert check_rank_schedule([64, 32, 16], r_max=64, epochs=3) == (64, 32, 16)
    with pytest.raises(ValueError, match="non-increasing"):
        check_rank_schedule((16, 32), r_max=64, epochs=3)
    with pytest.raises(ValueError, match=r"rank 65 is outside \[1, 64\]"):
        check_rank_schedule((65,), r_max=64, epochs=3)
    with pytest.raises(ValueError, match=r"rank 0 is outside"):
        check_rank_schedule((0,), r_max=64, epochs=3)
    with pytest.raises(ValueError, match="expected at most 2"):
        check_rank_schedule((64, 32, 16), r_max=64, epochs=2)


def test_scheduled_rank_holds_the_last_entry_and_is_none_without_a_schedule():
    assert [scheduled_rank((64, 32, 16), e) for e in range(4)] == [64, 32, 16, 16]
    assert scheduled_rank((), 0) is None


def test_rank_sampler_is_uniform_over_one_to_r_and_reproducible():
    first, second = RankSampler(seed=3), RankSampler(seed=3)
    draws = [first.sample(4) for _ in range(4000)]
    assert draws == [second.sample(4) for _ in range(4000)]
    counts = torch.bincount(torch.tensor(draws), minlength=5)
    assert counts[0] == 0 and counts[1:].sum() == 4000
    # Each of 1..4 has probability 1/4: 4000 draws give 1000 +- 27 (1 sd); 150 is over 5 sd.
    assert (counts[1:] - 1000).abs().max() < 150
    assert RankSampler(seed=0).sample(1) == 1


def test_active_rank_gives_the_ranks_back_even_after_an_error():
    layers = [make_layer(), make_layer(seed=1)]
    layers[1].set_rank(5)
    with pytest.raises(RuntimeError, match="inside"):
        with active_rank(layers, 2):
            assert [layer.rank for layer in layers] == [2, 2]
            assert layers[0].scale == 2.0 / 2
            raise RuntimeError("inside")
    assert [layer.rank for layer in layers] == [6, 5]


@pytest.mark.parametrize("sampled", [1, 3, 6])
def test_frozen_mode_gradient_equals_detaching_the_leading_components(sampled):
    layer = make_layer()
    x = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    target = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with active_rank([layer], sampled):
        ((layer(x) - target) ** 2).sum().backward()
    freeze_leading_grads([layer], sampled)

    # DyLoRA's frozen forward: components 0..b-2 detached, component b-1 live.
    a = layer.lora_a.detach().clone().requires_grad_(True)
    b = layer.lora_b.detach().clone().requires_grad_(True)
    frozen = sampled - 1
    a_used = torch.cat([a[:, :frozen].detach(), a[:, frozen:sampled]], dim=1)
    b_used = torch.cat([b[:frozen].detach(), b[frozen:sampled]], dim=0)
    y, _ = reference.lora_forward(x, layer.weight, layer.bias, a_used, b_used, sampled, layer.alpha / sampled)
    ((y - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.lora_a.grad, a.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(layer.lora_b.grad, b.grad, atol=1e-10, rtol=1e-10)
    assert b.grad[frozen].abs().max() > 0


def adamw_after_steps(layer, steps=3):
    optimizer = torch.optim.AdamW([layer.lora_a, layer.lora_b], lr=1e-2, weight_decay=0.01)
    generator = torch.Generator().manual_seed(9)
    for _ in range(steps):
        layer.lora_a.grad = torch.randn(layer.lora_a.shape, generator=generator, dtype=layer.lora_a.dtype)
        layer.lora_b.grad = torch.randn(layer.lora_b.shape, generator=generator, dtype=layer.lora_b.dtype)
        optimizer.step()
    return optimizer


def test_rank_cut_keeps_adamw_state_so_the_next_step_equals_the_uncut_one():
    # AdamW works element by element, so cutting the state and then stepping
    # must give the leading columns / rows of stepping uncut.
    cut, whole = make_layer(), make_layer()
    cut_optimizer, whole_optimizer = adamw_after_steps(cut), adamw_after_steps(whole)
    params_left = truncate_adapters([cut], 2, cut_optimizer)
    assert params_left == 2 * (7 + 5)
    assert cut.lora_a.shape == (7, 2) and cut.lora_b.shape == (2, 5) and cut.rank == 2
    assert cut_optimizer.state[cut.lora_a]["exp_avg"].shape == (7, 2)
    # The optimizer holds the layer's new Parameters, and the state of no other.
    assert cut_optimizer.param_groups[0]["params"] == [cut.lora_a, cut.lora_b]
    assert set(cut_optimizer.state) == {cut.lora_a, cut.lora_b}

    grad_a = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    grad_b = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    whole.lora_a.grad, whole.lora_b.grad = grad_a, grad_b
    cut.lora_a.grad, cut.lora_b.grad = grad_a[:, :2].clone(), grad_b[:2].clone()
    whole_optimizer.step()
    cut_optimizer.step()
    torch.testing.assert_close(cut.lora_a.detach(), whole.lora_a.detach()[:, :2], atol=0, rtol=0)
    torch.testing.assert_close(cut.lora_b.detach(), whole.lora_b.detach()[:2], atol=0, rtol=0)


def test_rank_cut_can_reset_the_state_and_refuses_to_grow():
    layer = make_layer()
    optimizer = adamw_after_steps(layer)
    truncate_adapters([layer], 3, optimizer, reset_state=True)
    assert layer.lora_a not in optimizer.state and layer.lora_b not in optimizer.state
    # A cut that one layer cannot take leaves every layer as it was.
    wide = make_layer(seed=1)
    with pytest.raises(ValueError, match=r"truncate_adapters: rank 4 is outside \[1, 3\]"):
        truncate_adapters([wide, layer], 4)
    assert wide.r_max == 6 and layer.r_max == 3


def test_nested_ranks_are_r_r_half_r_quarter_and_drawn_evenly():
    from hybrid_lora.train.dynamic_rank import nested_ranks, step_rank

    assert nested_ranks(64) == (16, 32, 64) and nested_ranks(6) == (1, 3, 6) and nested_ranks(2) == (1, 2)
    assert nested_ranks(1) == (1,)
    with pytest.raises(ValueError, match="rank 0"):
        nested_ranks(0)
    sampler = RankSampler(seed=5)
    draws = [step_rank("nested", sampler, 64) for _ in range(3000)]
    counts = {r: draws.count(r) for r in set(draws)}
    # each of the three with probability 1/3: 1000 +- 26 (1 sd); 150 is over 5 sd
    assert set(counts) == {16, 32, 64} and all(abs(c - 1000) < 150 for c in counts.values())
    assert step_rank("off", sampler, 64) == 64


def test_nested_step_trains_every_component_up_to_the_drawn_rank_through_the_runtime_rank():
    """A nested step at rank b: the gradient of the runtime-rank layer equals the reference's at rank b, for all
    b components (none frozen), zero beyond b, and the adapter is the same tensor throughout (no copy)."""
    layer = make_layer(r_max=8)
    x = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a_ptr = layer.lora_a.data_ptr()
    with active_rank([layer], 4):
        layer(x).square().sum().backward()
    assert layer.rank == 8 and layer.lora_a.data_ptr() == a_ptr
    a = layer.lora_a.detach().clone().requires_grad_(True)
    b = layer.lora_b.detach().clone().requires_grad_(True)
    reference.lora_forward(x, layer.weight, layer.bias, a, b, 4, 2.0 / 4)[0].square().sum().backward()
    torch.testing.assert_close(layer.lora_a.grad, a.grad)
    torch.testing.assert_close(layer.lora_b.grad, b.grad)
    assert (layer.lora_b.grad[:4].abs().sum(dim=1) > 0).all()  # every leading component learns
    assert layer.lora_b.grad[4:].abs().sum() == 0
