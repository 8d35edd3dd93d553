"""The ordering penalty and the domain-correlation loss against plain dense formulas in fp64."""

import pytest
import torch

from hybrid_lora import LoRAConv1D
from hybrid_lora.train.regularizers import (DC_MODES, adapter_inner, domain_correlation, order_penalty,
                                            snapshot_adapters, weight_correlation)


def random_layers(count=3, in_features=7, out_features=5, r_max=6, seed=0, dtype=torch.float64):
    """Layers with random, non-zero A and B (a fresh adapter has B = 0)."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(count):
        weight = torch.randn(in_features, out_features, generator=generator, dtype=dtype)
        layer = LoRAConv1D(weight, torch.zeros(out_features, dtype=dtype), r_max=r_max, alpha=3.0)
        with torch.no_grad():
            layer.lora_a.copy_(torch.randn(in_features, r_max, generator=generator, dtype=dtype))
            layer.lora_b.copy_(torch.randn(r_max, out_features, generator=generator, dtype=dtype))
        layers.append(layer)
    return layers


def dense_update(layer):
    """delta_W = s A[:, :r] B[:r, :], formed explicitly."""
    r = layer.rank
    return layer.scale * layer.lora_a[:, :r] @ layer.lora_b[:r]


def test_order_penalty_is_the_weighted_sum_of_norm_products_at_the_active_rank():
    layers = random_layers()
    layers[0].set_rank(4)
    layers[1].set_rank(1)  # a single component is the most important one: weight 0
    expected = 0.0
    for layer in layers:
        r = layer.rank
        for i in range(r):
            weight = i / (r - 1) if r > 1 else 0.0
            expected += weight * layer.lora_a[:, i].norm().item() * layer.lora_b[i].norm().item()
    got = order_penalty(layers)
    assert got.dtype == torch.float32
    assert abs(got.item() - expected) <= 1e-5 * abs(expected)


def test_order_penalty_charges_a_late_component_more_than_an_early_one():
    layer = random_layers(count=1, r_max=4)[0]
    with torch.no_grad():
        layer.lora_b.zero_()
        layer.lora_b[0] = 1.0
    early = order_penalty([layer]).item()
    with torch.no_grad():
        layer.lora_b.zero_()
        layer.lora_b[3] = 1.0
        layer.lora_a[:, 3] = layer.lora_a[:, 0]
    late = order_penalty([layer]).item()
    assert early == 0.0
    assert late > 0.0


def test_order_penalty_gradient_is_zero_not_nan_on_a_fresh_adapter():
    layer = LoRAConv1D(torch.randn(7, 5), torch.zeros(5), r_max=4)  # B = 0
    order_penalty([layer]).backward()
    assert torch.equal(layer.lora_a.grad, torch.zeros_like(layer.lora_a))
    assert torch.equal(layer.lora_b.grad, torch.zeros_like(layer.lora_b))


def test_adapter_inner_equals_the_frobenius_product_of_dense_updates_of_different_ranks():
    generator = torch.Generator().manual_seed(1)
    a1, b1 = torch.randn(9, 3, generator=generator, dtype=torch.float64), torch.randn(3, 11, generator=generator,
                                                                                     dtype=torch.float64)
    a2, b2 = torch.randn(9, 5, generator=generator, dtype=torch.float64), torch.randn(5, 11, generator=generator,
                                                                                     dtype=torch.float64)
    dense = ((0.5 * a1 @ b1) * (2.0 * a2 @ b2)).sum()
    torch.testing.assert_close(adapter_inner(a1, b1, 0.5, a2, b2, 2.0), dense, atol=1e-12, rtol=1e-12)


def test_domain_correlation_matches_the_dense_cosine_after_a_rank_cut_and_has_its_gradient():
    layers = random_layers()
    snapshot = snapshot_adapters(layers)
    dense_prev = torch.cat([dense_update(layer).flatten() for layer in layers]).detach()
    # Move on from the snapshot and cut the rank: the factors no longer line up
    # element by element, the update matrices still do.
    with torch.no_grad():
        for layer in layers:
            layer.lora_b.add_(0.3 * torch.randn_like(layer.lora_b))
    for layer in layers:
        layer.truncate_(3)
    got = domain_correlation(layers, snapshot)
    got.backward()
    got_grads = [(layer.lora_a.grad.clone(), layer.lora_b.grad.clone()) for layer in layers]

    for layer in layers:
        layer.lora_a.grad = layer.lora_b.grad = None
    dense_cur = torch.cat([dense_update(layer).flatten() for layer in layers])
    expected = 1.0 - torch.nn.functional.cosine_similarity(dense_prev, dense_cur, dim=0)
    expected.backward()
    assert abs(got.item() - expected.item()) <= 1e-5
    assert expected.item() > 1e-3  # the test is about a real difference, not cos = 1
    for (grad_a, grad_b), layer in zip(got_grads, layers):
        assert grad_a.abs().max() > 0
        torch.testing.assert_close(grad_a, layer.lora_a.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(grad_b, layer.lora_b.grad, atol=1e-6, rtol=1e-4)


def test_domain_correlation_is_zero_for_the_same_update_however_its_rank_is_split():
    layers = random_layers(count=2, r_max=4)
    snapshot = snapshot_adapters(layers)
    with torch.no_grad():
        for layer in layers:
            # Permute the components and scale A up, B down: delta_W is unchanged.
            order = torch.tensor([2, 0, 3, 1])
            layer.lora_a.copy_(3.0 * layer.lora_a[:, order])
            layer.lora_b.copy_(layer.lora_b[order] / 3.0)
    assert abs(domain_correlation(layers, snapshot).item()) <= 1e-6


def test_snapshot_of_a_fresh_adapter_is_refused():
    layer = LoRAConv1D(torch.randn(7, 5), torch.zeros(5), r_max=4)
    with pytest.raises(ValueError, match="squared norm is 0"):
        snapshot_adapters([layer])


def test_domain_correlation_refuses_other_layers():
    layers = random_layers(count=2)
    snapshot = snapshot_adapters(layers)
    with pytest.raises(ValueError, match="2 layers but a snapshot of 1"):
        domain_correlation(layers, snapshot_adapters(layers[:1]))
    other = random_layers(count=2, in_features=8)
    with pytest.raises(ValueError, match="expected the same layer"):
        domain_correlation(other, snapshot)
    with pytest.raises(ValueError, match="no LoRA layers"):
        order_penalty([])


def test_weight_correlation_is_the_flattened_cosine_of_rank_aligned_factors_with_a_gradient():
    layers = random_layers(count=2)
    snapshot = snapshot_adapters(layers)
    prev = [(layer.lora_a.detach().clone(), layer.lora_b.detach().clone()) for layer in layers]  # rank 6
    with torch.no_grad():
        for layer in layers:
            layer.lora_a.add_(0.5 * torch.randn_like(layer.lora_a))
    layers[0].truncate_(4)  # layer 0 compares 4 components, layer 1 all 6
    got = weight_correlation(layers, snapshot)
    got.backward()

    r = [4, 6]
    w_prev = torch.cat([torch.cat([a[:, :k].flatten(), b[:k].flatten()]) for (a, b), k in zip(prev, r)])
    w_cur = torch.cat([torch.cat([layer.lora_a[:, :k].flatten(), layer.lora_b[:k].flatten()])
                       for layer, k in zip(layers, r)]).detach()
    expected = 1.0 - (w_prev @ w_cur) / (w_prev.norm() * w_cur.norm())
    assert expected.item() > 1e-3
    assert abs(got.item() - expected.item()) <= 1e-6  # L_DC is computed in fp32, the expectation in fp64
    for layer in layers:
        assert layer.lora_a.grad.abs().max() > 0 and layer.lora_b.grad.abs().max() > 0
    # Unlike the delta form, it sees how the update is split into components.
    with torch.no_grad():
        for layer in layers:
            layer.lora_a.copy_(layer.lora_a.flip(1))
            layer.lora_b.copy_(layer.lora_b.flip(0))
    assert abs(weight_correlation(layers, snapshot).item() - got.item()) > 1e-3
    assert DC_MODES == {"delta": domain_correlation, "weights": weight_correlation}


def test_l2_to_previous_matches_the_dense_squared_distance_after_a_rank_cut_with_its_gradient():
    from hybrid_lora.train.regularizers import l2_to_previous

    previous = random_layers(seed=1)
    snapshot = snapshot_adapters(previous)
    layers = random_layers(seed=2)
    for layer in layers:
        layer.set_rank(3)  # the current adapter runs at a lower rank than the stored one
    value = l2_to_previous(layers, snapshot)
    dense = [dense_update(layer) for layer in layers]
    expected = sum((d - dense_update(p).detach()).square().sum() for d, p in zip(dense, previous))
    # the regularisers compute in fp32, the dense form in fp64
    assert abs(value.item() - expected.item()) <= 1e-5 * expected.item()
    grads = torch.autograd.grad(value, [layers[0].lora_a, layers[0].lora_b])
    dense_grads = torch.autograd.grad(expected, [layers[0].lora_a, layers[0].lora_b])
    for got, want in zip(grads, dense_grads):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the same update scores (nearly) zero, a scaled one does not (1 - cos would be 0 for both)
    assert abs(l2_to_previous(previous, snapshot).item()) <= 1e-5 * snapshot.squared_norm.item()
    with torch.no_grad():
        for layer in previous:
            layer.lora_b.mul_(2.0)
    assert l2_to_previous(previous, snapshot) > 0.1 * snapshot.squared_norm
