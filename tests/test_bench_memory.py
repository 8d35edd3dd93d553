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


def test_checkpointing_rows_pair_each_sequence_length_with_the_same_gradients(monkeypatch):
    from bench.e2e import TINY_GPT2, E2EConfig
    from bench.memory import checkpointing_run

    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    rows = checkpointing_run(torch.device("cpu"), E2EConfig(seq_lens=(8, 12), batch_size=2, r=4, model=TINY_GPT2))
    assert [(row["seq_len"], row["checkpointing"]) for row in rows] == [(8, False), (8, True), (12, False), (12, True)]
    # The recomputed forwards drew the forward's LoRA and GPT-2 dropout masks (both on): the same gradients.
    assert all(row["max_grad_diff"] == 0.0 and row["dropout"] == 0.05 for row in rows)
    assert all(row["peak_fwd_bwd_bytes"] != row["peak_fwd_bwd_bytes"] for row in rows)  # no peak off CUDA: NaN
