"""``fused_lora_4bit`` at the 16-bit op's edges, on both paths: fp16 outlier gradients, the rank changed between a
forward and its backward, strided inputs (the bias above all), double backward.

The cases and their helpers are the 16-bit op's (test_fp16_range, test_rank_between_passes, test_strided_inputs),
over a bitsandbytes 4-bit weight; the reference multiplies by W as the op sees it: decoded, in the compute dtype.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (extra qlora)")

from helpers import assert_close  # noqa: E402
from test_fp16_range import RANK2, SCALE, outlier_gradient_inputs  # noqa: E402
from test_fused_lora import reference_outputs  # noqa: E402
from test_qlora_op import make_inputs, quantized_weight  # noqa: E402
from test_rank_between_passes import (IN, OUT, R_MAX, RANKS, assert_gradients_equal, gradients,  # noqa: E402
                                      inputs, loss_at)
from test_rank_between_passes import separate_gradients as separate_gradients_of  # noqa: E402
from test_strided_inputs import strided  # noqa: E402

from hybrid_lora.kernels.dropout import dropout_keep_mask  # noqa: E402
from hybrid_lora.nn.quantized import LoRALinear4bit  # noqa: E402
from hybrid_lora.ops.fused_lora_4bit import fused_lora_4bit  # noqa: E402
from hybrid_lora.ops.nf4_reference import Quant4bit, dequantize  # noqa: E402


def quantize(weight_kn):
    """The 4-bit NF4 form of a [K, N] weight (stored [N, K], as nn.Linear's)."""
    packed, state = bnb.functional.quantize_4bit(weight_kn.t().float().contiguous(), blocksize=64, quant_type="nf4")
    return Quant4bit.from_bnb(packed, state)


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_outliers_in_x_and_the_upstream_gradient_with_scale_32(dtype, path, monkeypatch, nan_outputs):
    if path == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 kernels need a CUDA device (the CPU interpreter has no bf16 arithmetic)")
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    x, weight, lora_a, lora_b, grad_y = outlier_gradient_inputs(dtype, torch.device("cpu"))
    quant = quantize(weight)
    y = fused_lora_4bit(x, quant, None, lora_a, lora_b, rank=RANK2, scale=SCALE)
    grads = torch.autograd.grad(y, (x, lora_a, lora_b), grad_y)
    want = reference_outputs(x, dequantize(quant, dtype).t(), None, lora_a.to(dtype), lora_b.to(dtype), RANK2,
                             SCALE, grad_y)
    if dtype == torch.float16:  # the case is the one described: s dS leaves fp16's range, dX does not
        scaled_ds = SCALE * (grad_y.double() @ lora_b.detach()[:RANK2].to(dtype).double().t())
        fp16_max = torch.finfo(torch.float16).max
        assert scaled_ds.abs().max() > fp16_max > max(w.abs().max() for w in want[:2])
    for name, got, ref in zip(("y", "grad_x", "grad_a", "grad_b"), (y, *grads), want):
        assert_close(name, got, ref, dtype)


def make_layer(dropout):
    """test_rank_between_passes's layer over the same weights, the frozen one in 4 bits."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(IN, OUT)
    base = bnb.nn.Linear4bit(IN, OUT, bias=True, quant_type="nf4", compute_dtype=torch.float32)
    base.load_state_dict(linear.state_dict())
    base = base.to("cpu")  # quantizes the weight
    layer = LoRALinear4bit(base, r_max=R_MAX, alpha=16.0, dropout=dropout).train()
    with torch.no_grad():  # B = 0 would make every gradient of A zero
        layer.lora_a.copy_(torch.randn(IN, R_MAX, generator=g) * 0.3)
        layer.lora_b.copy_(torch.randn(R_MAX, OUT, generator=g) * 0.3)
    return layer


def separate_gradients(dropout):
    """Gradients of the losses at ranks 8 and 3 on the 4-bit layer, each with its own backward right after its
    forward."""
    x, targets = inputs()
    want = separate_gradients_of(dropout, x, targets, make=make_layer)
    # Rank 8 reached every component, so the sum is not rank 3's gradient alone.
    assert want[1][:, 3:].abs().max() > 0.1
    return x, targets, want


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_summed_losses_of_two_ranks_give_the_sum_of_separate_gradients(path, dropout, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    x, targets, want = separate_gradients(dropout)
    layer = make_layer(dropout)
    x_sum = x.clone().requires_grad_()
    total = sum(loss_at(layer, x_sum, target, rank, step) for step, (rank, target) in enumerate(zip(RANKS, targets)))
    assert layer.rank == RANKS[-1]  # the layer's tensors now hold the last rank and row offset
    total.backward()
    assert_gradients_equal(gradients(layer, x_sum), want)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_compiled_summed_losses_of_two_ranks_in_one_graph(path, dropout, monkeypatch, fresh_dynamo):
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    x, targets, want = separate_gradients(dropout)
    layer = make_layer(dropout)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    x_sum = x.clone().requires_grad_()
    total = sum(loss_at(compiled, x_sum, target, rank, step) for step, (rank, target) in enumerate(zip(RANKS, targets)))
    total.backward()
    assert counter.frame_count == 1  # one graph for both ranks
    assert_gradients_equal(gradients(layer, x_sum), want)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_double_backward_raises_one_clear_line(path, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    layer = make_layer(0.0)
    x = inputs()[0].requires_grad_()
    y = layer(x)
    # the Triton path names the 4-bit op; the PyTorch path runs fused_lora's on the dequantized weight
    op = {"triton": "fused_lora_4bit", "torch": "fused_lora"}[path]
    with pytest.raises(RuntimeError, match=rf"^{op}: double backward \(a backward with create_graph=True"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    layer(x).sum().backward()  # a plain backward still runs
    assert x.grad is not None and torch.isfinite(layer.lora_a.grad).all()


M, K, N, R, RANK = 7, 40, 24, 12, 5


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("strided_input, dropout_p",
                         [(name, 0.0) for name in ("x", "bias", "lora_a", "lora_b", "grad_y")] + [("all", 0.25)])
def test_a_strided_input_gives_the_contiguous_result(strided_input, dropout_p, path, monkeypatch, nan_outputs):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    quant = quantized_weight(N, K, "nf4", True)
    x, bias, lora_a, lora_b = make_inputs(M, K, N, R, torch.float32)
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(7))
    views = {"x": x, "bias": bias, "lora_a": lora_a, "lora_b": lora_b, "grad_y": grad_y}
    for name in views:
        if strided_input in (name, "all"):
            views[name] = strided(views[name])
    x, bias, lora_a, lora_b, grad_y = views.values()
    y = fused_lora_4bit(x, quant, bias, lora_a, lora_b, rank=RANK, scale=1.5, dropout_p=dropout_p, seed=99)
    got = (y, *torch.autograd.grad(y, (x, lora_a, lora_b), grad_y))
    keep = dropout_keep_mask(M, K, 99, dropout_p, x.device) if dropout_p > 0 else None
    want = reference_outputs(x, dequantize(quant, torch.float32).t(), bias, lora_a, lora_b, RANK, 1.5, grad_y, keep,
                             dropout_p)
    for name, g, w in zip(("y", "grad_x", "grad_a", "grad_b"), got, want):
        assert_close(name, g, w, torch.float32)
