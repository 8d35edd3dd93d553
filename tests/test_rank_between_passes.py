"""A layer's rank, scale and dropout row offset changed between a forward and its backward, and double backward.

Objectives that sum the losses of several ranks in one step (nested-rank,
Matryoshka-style training) run forward at rank 8, forward at rank 3, then one
backward: each backward must use the values its own forward read, although
``set_rank`` and ``set_dropout_row_offset`` write the layer's tensors in place.
"""

import pytest
import torch

from hybrid_lora import LoRALinear, reference

IN, OUT, R_MAX = 24, 20, 8
RANKS = (8, 3)


def make_layer(dropout):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(IN, OUT)
    layer = LoRALinear(linear.weight, linear.bias, r_max=R_MAX, alpha=16.0, dropout=dropout).train()
    with torch.no_grad():  # B = 0 would make every gradient of A zero
        layer.lora_a.copy_(torch.randn(IN, R_MAX, generator=g) * 0.3)
        layer.lora_b.copy_(torch.randn(R_MAX, OUT, generator=g) * 0.3)
    return layer


def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, IN, generator=g)
    return x, [torch.randn(2, 5, OUT, generator=g) for _ in RANKS]


def loss_at(layer, x, target, rank, step):
    """The loss at `rank`, with the dropout seed and the row offset of `step` (the same in every run)."""
    layer.set_rank(rank)
    layer.set_dropout_row_offset(10 * step)
    torch.manual_seed(100 + step)
    return (layer(x) - target).square().sum()


def gradients(layer, x):
    return [t.grad.clone() for t in (x, layer.lora_a, layer.lora_b)]


def separate_gradients(dropout, x, targets, make=None):
    """(dx, dA, dB) of one backward per rank, each right after its own forward; make(dropout): the layer
    (this file's make_layer by default)."""
    layer = (make or make_layer)(dropout)
    x_sep = x.clone().requires_grad_()
    for step, (rank, target) in enumerate(zip(RANKS, targets)):
        loss_at(layer, x_sep, target, rank, step).backward()
    return gradients(layer, x_sep)


def assert_gradients_equal(got, want):
    for name, g, w in zip(("x", "lora_a", "lora_b"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_summed_losses_of_two_ranks_give_the_sum_of_separate_gradients(path, dropout, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    x, targets = inputs()

    want = separate_gradients(dropout, x, targets)

    layer = make_layer(dropout)
    x_sum = x.clone().requires_grad_()
    total = sum(loss_at(layer, x_sum, target, rank, step) for step, (rank, target) in enumerate(zip(RANKS, targets)))
    assert layer.rank == RANKS[-1]  # the layer's tensors now hold the last rank and row offset
    total.backward()
    assert_gradients_equal(gradients(layer, x_sum), want)
    # Rank 8 reached every component, so the sum is not rank 3's gradient alone.
    assert want[1][:, 3:].abs().max() > 0.1


@pytest.mark.parametrize("path, dtype", [("triton", torch.float32), ("torch", torch.float16)])
def test_double_backward_raises_one_clear_line_on_the_kernels_and_in_fp16(path, dtype, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    layer = make_layer(0.0).to(dtype)
    x = inputs()[0].to(dtype).requires_grad_()
    y = layer(x)
    one_line = r"^fused_lora: double backward \(a backward with create_graph=True[^\n]* is not supported$"
    with pytest.raises(RuntimeError, match=one_line):
        torch.autograd.grad(y.float().square().sum(), x, create_graph=True)
    # A plain backward of the same graph still runs.
    layer(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(layer.lora_a.grad).all()


def test_double_backward_on_the_pytorch_path_equals_the_reference(monkeypatch):
    """A gradient penalty through the layer: bf16, fp32 and fp64 run autograd's own backward there."""
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    layer = make_layer(0.0)
    layer.set_rank(5)
    x = inputs()[0].requires_grad_()
    penalty = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)[0].square().sum()
    penalty.backward()

    a = layer.lora_a.detach().double().requires_grad_()
    b = layer.lora_b.detach().double().requires_grad_()
    x64 = x.detach().double().reshape(-1, IN).requires_grad_()
    y64, _ = reference.lora_forward(x64, layer.frozen_weight().detach().double(), layer.bias.detach().double(),
                                    a, b, 5, layer.scale)
    want = torch.autograd.grad(y64.square().sum(), x64, create_graph=True)[0].square().sum()
    want_a, want_b = torch.autograd.grad(want, (a, b))
    torch.testing.assert_close(layer.lora_a.grad.double(), want_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_b.grad.double(), want_b, rtol=1e-4, atol=1e-4)
    assert want_a[:, 5:].abs().max() == 0 and want_a[:, :5].abs().max() > 0


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_compiled_summed_losses_of_two_ranks_in_one_graph(path, dropout, monkeypatch, fresh_dynamo):
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    x, targets = inputs()
    want = separate_gradients(dropout, x, targets)

    layer = make_layer(dropout)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    x_sum = x.clone().requires_grad_()
    total = sum(loss_at(compiled, x_sum, target, rank, step) for step, (rank, target) in enumerate(zip(RANKS, targets)))
    total.backward()
    assert counter.frame_count == 1  # one graph for both ranks
    assert_gradients_equal(gradients(layer, x_sum), want)
