"""Dropout statistics and determinism, and the errors bad input gets."""

import pytest
import torch

from hybrid_lora import fused_lora
from hybrid_lora.kernels.dropout import dropout_keep_mask


def small_inputs(M=4, K=16, N=8, R=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(M, K, generator=g), torch.randn(K, N, generator=g), torch.randn(N, generator=g),
            torch.randn(K, R, generator=g), torch.randn(R, N, generator=g))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_drop_rate_is_close_to_p(p):
    keep = dropout_keep_mask(128, 96, seed=42, dropout_p=p, device="cpu")
    n = keep.numel()
    # Binomial standard deviation sqrt(p (1-p) / n); 5 sigma makes a false alarm negligible.
    tolerance = 5 * (p * (1 - p) / n) ** 0.5
    assert abs((1 - keep.float().mean().item()) - p) < tolerance


def test_mask_depends_on_seed_and_repeats_for_the_same_seed():
    a = dropout_keep_mask(32, 48, seed=1, dropout_p=0.5, device="cpu")
    b = dropout_keep_mask(32, 48, seed=1, dropout_p=0.5, device="cpu")
    c = dropout_keep_mask(32, 48, seed=2, dropout_p=0.5, device="cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Rows are not copies of one another: the flat index, not the column, drives the counter.
    assert not torch.equal(a[0], a[1])


def test_same_seed_same_output_and_unseeded_calls_differ():
    x, w, b, a, bb = small_inputs()
    y1 = fused_lora(x, w, b, a, bb, rank=8, scale=1.0, dropout_p=0.5, seed=9)
    y2 = fused_lora(x, w, b, a, bb, rank=8, scale=1.0, dropout_p=0.5, seed=9)
    y3 = fused_lora(x, w, b, a, bb, rank=8, scale=1.0, dropout_p=0.5)
    y4 = fused_lora(x, w, b, a, bb, rank=8, scale=1.0, dropout_p=0.5)
    assert torch.equal(y1, y2)
    assert not torch.equal(y3, y4)


BAD_CALLS = [
    (dict(rank=0), "rank is 0"),
    (dict(rank=9), "rank is 9"),
    (dict(dropout_p=1.0), "dropout_p is 1.0"),
    (dict(dropout_p=-0.1), "dropout_p is -0.1"),
    (dict(x=torch.randn(4, 15)), r"x has shape \(4, 15\)"),
    (dict(weight=torch.randn(16)), r"weight has shape \(16,\)"),
    (dict(bias=torch.randn(7)), r"bias has shape \(7,\)"),
    (dict(lora_a=torch.randn(15, 8)), r"lora_a has shape \(15, 8\)"),
    (dict(lora_b=torch.randn(8, 9)), r"lora_b has shape \(8, 9\)"),
    (dict(x=torch.randn(4, 16, dtype=torch.float64)), "x has dtype torch.float64"),
    (dict(lora_b=torch.randn(8, 8, dtype=torch.float16)), "lora_b has dtype torch.float16"),
    (dict(lora_a=torch.randn(16, 8, device="meta")), "lora_a is on meta"),
    (dict(x=torch.ones(4, 16, dtype=torch.long)), "x has dtype torch.int64"),
]


@pytest.mark.parametrize("override,message", BAD_CALLS, ids=[m for _, m in BAD_CALLS])
def test_bad_input_is_named_in_the_error(override, message):
    x, weight, bias, lora_a, lora_b = small_inputs()
    args = dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, rank=8, scale=1.0, dropout_p=0.0)
    args.update(override)
    with pytest.raises(ValueError, match=message):
        fused_lora(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("lora_a"), args.pop("lora_b"),
                   **args)


def test_rank_must_be_an_integer():
    x, weight, bias, lora_a, lora_b = small_inputs()
    with pytest.raises(TypeError):
        fused_lora(x, weight, bias, lora_a, lora_b, rank=2.5, scale=1.0)


def test_forcing_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_lora(*small_inputs(), rank=8, scale=1.0)


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="HYBRID_LORA_BACKEND='cuda'"):
        fused_lora(*small_inputs(), rank=8, scale=1.0)


def test_forcing_triton_with_fp64_is_an_error(monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "triton")
    with pytest.raises(ValueError, match="torch.float64"):
        fused_lora(*(t.double() for t in small_inputs()), rank=8, scale=1.0)
