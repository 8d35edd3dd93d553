"""fp16 keeps every intermediate in range wherever the result is: an outlier input channel with a large LoRA scale.

LLM activations carry a few outlier channels orders of magnitude above the
rest (Dettmers et al., 2022, "LLM.int8()"). With the scale folded into the
down-projection, S = s D(X) A overflows fp16 (65,504) at such a channel while
the output, s S B, is well inside it.
"""

import pytest
import torch
from helpers import assert_close
from test_fused_lora import reference_outputs

from hybrid_lora import fused_lora

M, K, N, RANK, SCALE, OUTLIER = 8, 256, 64, 1, 32.0, 40_000.0


def outlier_inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    x[:, 3] = OUTLIER
    weight = torch.randn(K, N, generator=g) / K ** 0.5
    lora_a = (torch.rand(K, RANK, generator=g) * 2 - 1) / K ** 0.5  # kaiming-uniform's range, as LoRA inits A
    lora_a[3] = 0.06
    lora_b = torch.randn(RANK, N, generator=g) * 0.1
    x, weight = x.half().to(device).requires_grad_(), weight.half().to(device)
    return x, weight, lora_a.to(device).requires_grad_(), lora_b.to(device).requires_grad_()


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_an_outlier_channel_with_scale_32_stays_finite_in_fp16(path, device, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    x, weight, lora_a, lora_b = outlier_inputs(device)
    y = fused_lora(x, weight, None, lora_a, lora_b, rank=RANK, scale=SCALE)
    # An upstream gradient of a size that keeps every true gradient inside fp16 too.
    grad_y = (1e-3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).to(device=device,
                                                                                        dtype=y.dtype)
    grads = torch.autograd.grad(y, (x, lora_a, lora_b), grad_y)
    want = reference_outputs(x, weight, None, lora_a.half(), lora_b.half(), RANK, SCALE, grad_y)
    # The case is the one described: s S leaves fp16's range, the output does not.
    scaled_s = SCALE * (x.detach().double().cpu() @ lora_a.detach().half().double().cpu())
    fp16_max = torch.finfo(torch.float16).max
    assert scaled_s.abs().max() > fp16_max > max(w.abs().max() for w in want)
    for name, got, ref in zip(("y", "grad_x", "grad_a", "grad_b"), (y, *grads), want):
        assert_close(name, got, ref, torch.float16)


# Outlier channels in x and in the upstream gradient, with a large B: dS = dY B^T times the scale leaves fp16's
# range where dX (fp16) and dA, dB (fp32) do not.
M2, K2, N2, R2, RANK2 = 6, 40, 24, 8, 6


def outlier_gradient_inputs(dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M2, K2, generator=g)
    x[:, 3], x[:, 17] = 300.0, -120.0
    weight = torch.randn(K2, N2, generator=g) / K2 ** 0.5
    lora_a = (torch.rand(K2, R2, generator=g) * 2 - 1) / K2 ** 0.5
    lora_b = torch.randn(R2, N2, generator=g) * 4
    grad_y = torch.randn(M2, N2, generator=g) * 10
    grad_y[:, 5], grad_y[:, 11], grad_y[:, 12] = 150.0, -150.0, 150.0
    x, weight, grad_y = (t.to(device=device, dtype=dtype) for t in (x, weight, grad_y))
    return x.requires_grad_(), weight, lora_a.to(device).requires_grad_(), lora_b.to(device).requires_grad_(), grad_y


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_outliers_in_x_and_the_upstream_gradient_with_scale_32(dtype, path, device, monkeypatch, nan_outputs):
    if path == "triton" and dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("bf16 kernels need a CUDA device (the CPU interpreter has no bf16 arithmetic)")
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    x, weight, lora_a, lora_b, grad_y = outlier_gradient_inputs(dtype, device)
    y = fused_lora(x, weight, None, lora_a, lora_b, rank=RANK2, scale=SCALE)
    grads = torch.autograd.grad(y, (x, lora_a, lora_b), grad_y)
    # The reference sees the adapters rounded to the compute dtype, as both paths multiply them.
    want = reference_outputs(x, weight, None, lora_a.to(dtype), lora_b.to(dtype), RANK2, SCALE, grad_y)
    if dtype == torch.float16:  # the case is the one described: s dS leaves fp16's range, dX does not
        scaled_ds = SCALE * (grad_y.double().cpu() @ lora_b.detach()[:RANK2].to(dtype).double().cpu().t())
        fp16_max = torch.finfo(torch.float16).max
        assert scaled_ds.abs().max() > fp16_max > max(w.abs().max() for w in want[:2])
    for name, got, ref in zip(("y", "grad_x", "grad_a", "grad_b"), (y, *grads), want):
        assert_close(name, got, ref, dtype)
