"""The PyTorch path of ``fused_lora`` and the reference itself."""

import pytest
import torch

from hybrid_lora import fused_lora
from hybrid_lora.ops import reference


def fp64_inputs(M=5, K=12, N=10, R=6):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(K, N, generator=g, dtype=torch.float64)
    bias = torch.randn(N, generator=g, dtype=torch.float64)
    lora_a = torch.randn(K, R, generator=g, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(R, N, generator=g, dtype=torch.float64, requires_grad=True)
    return x, weight, bias, lora_a, lora_b


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_gradcheck_fp64(torch_path, dropout_p):
    x, weight, bias, lora_a, lora_b = fp64_inputs()

    def op(x, lora_a, lora_b):  # a fixed seed makes the dropout mask part of the function
        return fused_lora(x, weight, bias, lora_a, lora_b, rank=4, scale=1.25, dropout_p=dropout_p, seed=11)

    assert torch.autograd.gradcheck(op, (x, lora_a, lora_b))


def test_closed_form_backward_equals_autograd_of_the_forward():
    x, weight, bias, lora_a, lora_b = fp64_inputs()
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) >= 0.3
    y, _ = reference.lora_forward(x, weight, bias, lora_a, lora_b, 4, 0.5, keep, 0.3)
    grad_y = torch.randn_like(y)
    auto = torch.autograd.grad(y, (x, lora_a, lora_b), grad_y)
    closed = reference.lora_backward(grad_y, x, weight, lora_a, lora_b, 4, 0.5, keep, 0.3)
    for got, want in zip(closed, auto):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_torch_path_matches_reference(torch_path):
    x, weight, bias, lora_a, lora_b = fp64_inputs()
    y = fused_lora(x, weight, bias, lora_a, lora_b, rank=3, scale=2.0)
    want, _ = reference.lora_forward(x, weight, bias, lora_a, lora_b, 3, 2.0)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_torch_path_autocast_bf16_keeps_fp32_adapter_gradients(torch_path):
    x, weight, bias, lora_a, lora_b = (t.float() if t is not None else None for t in fp64_inputs())
    x, lora_a, lora_b = (t.detach().requires_grad_() for t in (x, lora_a, lora_b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_lora(x, weight, bias, lora_a, lora_b, rank=6, scale=0.5)
    assert y.dtype == torch.bfloat16
    grad_a, grad_b = torch.autograd.grad(y.float().sum(), (lora_a, lora_b))
    assert grad_a.dtype == torch.float32 and grad_b.dtype == torch.float32
    want = reference.lora_backward(torch.ones(y.shape, dtype=torch.float64), x.double(), weight.double(),
                                   lora_a.double(), lora_b.double(), 6, 0.5)
    torch.testing.assert_close(grad_a.double(), want[1], rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(grad_b.double(), want[2], rtol=5e-2, atol=5e-2)
