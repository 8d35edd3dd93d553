"""The benchmark's five layers compute the same function, and their work counts follow the design notes."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `bench`

from helpers import assert_close  # noqa: E402

from bench.providers import (MODES, PROVIDERS, LayerShape, LayerWeights, build_layer,  # noqa: E402
                             bytes_moved, flops, tensor_bytes, traffic)
from hybrid_lora.ops import reference  # noqa: E402

TINY = LayerShape(M=24, K=32, N=48, r=5, dtype=torch.float32, r_max=16)
GPT2 = dict(K=768, N=2304)


@pytest.mark.parametrize("weight_layout", ["in_out", "out_in"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_provider_computes_the_reference_layer(provider, weight_layout):
    shape = dataclasses.replace(TINY, weight_layout=weight_layout)
    weights = LayerWeights.random(shape, "cpu", seed=3)
    assert weights.weight.shape == (TINY.K, TINY.N)
    assert weights.weight.stride() == ((1, TINY.K) if weight_layout == "out_in" else (TINY.N, 1))
    layer = build_layer(provider, shape, "cpu", weights=weights, seed=3, compile_backend="aot_eager")
    with layer.context():
        y = layer.forward()
        y.backward(layer.grad_y)
    d = {name: getattr(weights, name).double() for name in ("weight", "bias", "lora_a", "lora_b")}
    x, grad_y = layer.x.detach().double(), layer.grad_y.double()
    if provider == "base":
        want_y, want_dx = x @ d["weight"] + d["bias"], grad_y @ d["weight"].t()
    else:
        want_y, _ = reference.lora_forward(x, d["weight"], d["bias"], d["lora_a"], d["lora_b"], TINY.r,
                                           weights.scale)
        want_dx, want_da, want_db = reference.lora_backward(grad_y, x, d["weight"], d["lora_a"], d["lora_b"],
                                                            TINY.r, weights.scale)
        grad_a, grad_b = layer.adapter_grads()
        assert_close("dA", grad_a, want_da[:, :TINY.r], torch.float32)
        assert_close("dB", grad_b, want_db[:TINY.r], torch.float32)
    assert_close("y", y, want_y, torch.float32)
    assert_close("dX", layer.x.grad, want_dx, torch.float32)


@pytest.mark.parametrize("r", [16, 64])
def test_lora_arithmetic_is_r_over_576_of_the_frozen_gemm(r):
    # performance.md: LoRA adds 2Mr(K+N) to the 2MKN of the frozen GEMM, r/576 of it at K=768, N=2304.
    shape = LayerShape(M=8192, r=r, dtype=torch.bfloat16, **GPT2)
    for provider in PROVIDERS[1:]:
        ratio = flops(provider, shape, "fwd") / flops("base", shape, "fwd")
        assert ratio == pytest.approx(1 + r / 576, rel=1e-12), provider
    assert flops("fused", shape, "fwd+bwd") == flops("fused", shape, "fwd") + flops("fused", shape, "bwd")


def test_traffic_models_rank_the_providers_as_the_design_notes_do():
    shape = LayerShape(M=8192, r=16, dtype=torch.bfloat16, **GPT2)
    sizes = tensor_bytes(shape)
    assert bytes_moved("base", shape, "fwd") == sizes["X"] + sizes["W"] + sizes["b"] + sizes["Y"]
    fwd = {p: bytes_moved(p, shape, "fwd") for p in PROVIDERS}
    # The fused forward reads X twice and writes S; peft re-reads X and moves Y-sized tensors several times.
    assert fwd["base"] < fwd["fused"] < fwd["addmm"] < fwd["peft"]
    assert fwd["fused"] - fwd["base"] == sizes["X"] + 2 * sizes["S"] + sizes["A"] + sizes["B"]
    assert fwd["peft"] - fwd["base"] > 4 * sizes["Y"]
    for mode in MODES:
        for p in PROVIDERS:
            assert bytes_moved(p, shape, mode) > 0


def test_only_the_fused_layer_gets_its_dropout_mask_for_free():
    plain = LayerShape(M=8192, r=16, dtype=torch.bfloat16, **GPT2)
    dropped = LayerShape(M=8192, r=16, dtype=torch.bfloat16, dropout_p=0.05, **GPT2)
    for mode in MODES:
        assert bytes_moved("fused", dropped, mode) == bytes_moved("fused", plain, mode)
        for provider in ("peft", "addmm", "compiled"):
            assert bytes_moved(provider, dropped, mode) > bytes_moved(provider, plain, mode), (provider, mode)
            names = {t for _, reads, writes in traffic(provider, dropped, mode) for t in (*reads, *writes)}
            assert "mask" in names, (provider, mode)


def test_bad_arguments_name_the_value_and_what_was_expected():
    with pytest.raises(ValueError, match=r"r=65.*r_max=64"):
        LayerShape(M=8, K=8, N=8, r=65, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"dropout_p=1.0"):
        LayerShape(M=8, K=8, N=8, r=4, dtype=torch.float32, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"'lora'.*expected one of"):
        build_layer("lora", TINY, "cpu")
    with pytest.raises(ValueError, match=r"'backward'.*expected one of"):
        flops("fused", TINY, "backward")


def test_fused_layer_one_round_with_pytest_benchmark(benchmark):
    layer = build_layer("fused", LayerShape(M=16, K=16, N=32, r=4, dtype=torch.float32), "cpu")
    step, grads = layer.step("fwd+bwd")

    def one_step():
        for t in grads:
            t.grad = None
        step()

    benchmark.pedantic(one_step, rounds=1, iterations=1)
    assert benchmark.stats.stats.rounds == 1
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in grads)
