"""Saved-activation bytes per layer call: the measurement itself, and the fused layer's bound X + S."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `bench`

from bench.memory import saved_activations, x_plus_s_bytes  # noqa: E402
from bench.providers import Layer, LayerShape, build_layer  # noqa: E402


def test_saved_bytes_count_each_storage_once_and_leave_out_parameters():
    x = torch.randn(4, 8, requires_grad=True)
    p = torch.nn.Parameter(torch.randn(8))

    def forward():
        y = x * p  # saves x and p
        return (y * x).sum()  # saves y and x again: x counts once, p never

    shape = LayerShape(M=4, K=8, N=8, r=1, dtype=torch.float32)
    layer = Layer("toy", shape, x, None, forward, [p], [], lambda: (None, None))
    saved = saved_activations(layer)
    assert saved.bytes == 2 * x.numel() * 4
    assert sorted(saved.tensors) == ["float32[4, 8]", "float32[4, 8]"]


@pytest.mark.parametrize("dropout_p", [0.05, 0.5])
def test_fused_layer_saves_at_most_x_plus_s_with_dropout_on(dropout_p):
    shape = LayerShape(M=24, K=32, N=48, r=8, dtype=torch.float32, r_max=16, dropout_p=dropout_p)
    layer = build_layer("fused", shape, "cpu")
    saved = saved_activations(layer)
    x_bytes = shape.M * shape.K * 4
    assert x_bytes <= saved.bytes <= x_plus_s_bytes(shape), saved.tensors


def test_peft_saves_more_than_the_bound_with_dropout_on():
    # The measurement must be able to see a layer that keeps more: peft stores the dropped input and its mask.
    shape = LayerShape(M=24, K=32, N=48, r=8, dtype=torch.float32, r_max=16, dropout_p=0.05)
    saved = saved_activations(build_layer("peft", shape, "cpu"))
    assert saved.bytes > x_plus_s_bytes(shape), saved.tensors
