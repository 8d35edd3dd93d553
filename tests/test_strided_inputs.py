"""Every input of the op as a non-contiguous view, on both paths, against the fp64 reference.

Each view skips every other element of a NaN-filled buffer, so an element read
through the wrong stride is NaN and fails the comparison; the frozen weight is
also given as nn.Linear's [N, K] storage seen through its transpose.
"""

import pytest
import torch
from helpers import assert_close
from test_fused_lora import make_inputs, reference_outputs

from hybrid_lora import fused_lora
from hybrid_lora.kernels.dropout import dropout_keep_mask

M, K, N, R, RANK, SCALE = 7, 24, 20, 12, 5, 1.5
INPUTS = ("x", "weight", "weight_linear", "weight_linear_strided", "bias", "lora_a", "lora_b", "grad_y")


def strided(t):
    """The values of t, seen with every stride doubled (the last one) inside a NaN-filled buffer."""
    buf = torch.full(t.shape[:-1] + (2 * t.shape[-1],), float("nan"), dtype=t.dtype, device=t.device)
    buf[..., ::2] = t.detach()
    view = buf[..., ::2]
    assert not view.is_contiguous() and torch.equal(view, t.detach())
    return view.requires_grad_(t.requires_grad)


def linear_view(weight, stride_rows=False):
    """weight [K, N] as the transpose of an [N, K] nn.Linear weight, optionally strided along K too."""
    storage = strided(weight.t()) if stride_rows else weight.t().contiguous()
    view = storage.t()
    assert torch.equal(view, weight) and view.stride(0) != N
    return view


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("strided_input, dropout_p", [(name, 0.0) for name in INPUTS] + [("all", 0.0), ("all", 0.25)])
def test_a_strided_input_gives_the_contiguous_result(strided_input, path, dropout_p, monkeypatch, nan_outputs):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    x, weight, bias, lora_a, lora_b = make_inputs(M, K, N, R, torch.float32, torch.device("cpu"))
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(7))
    every = strided_input == "all"
    if strided_input == "weight_linear":
        weight = linear_view(weight)
    elif strided_input == "weight_linear_strided" or every:
        weight = linear_view(weight, stride_rows=True)
    elif strided_input == "weight":
        weight = strided(weight)
    if strided_input == "x" or every:
        x = strided(x)
    if strided_input == "bias" or every:
        bias = strided(bias)
    if strided_input == "lora_a" or every:
        lora_a = strided(lora_a)
    if strided_input == "lora_b" or every:
        lora_b = strided(lora_b)
    if strided_input == "grad_y" or every:
        grad_y = strided(grad_y)
    y = fused_lora(x, weight, bias, lora_a, lora_b, rank=RANK, scale=SCALE, dropout_p=dropout_p, seed=99)
    got = (y, *torch.autograd.grad(y, (x, lora_a, lora_b), grad_y))
    keep = dropout_keep_mask(M, K, 99, dropout_p, x.device) if dropout_p > 0 else None
    want = reference_outputs(x, weight, bias, lora_a, lora_b, RANK, SCALE, grad_y, keep, dropout_p)
    for name, g, w in zip(("y", "grad_x", "grad_a", "grad_b"), got, want):
        assert_close(name, g, w, torch.float32)
