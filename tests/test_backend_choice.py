"""The op's backend is decided once per device type, outside any traced region, and HYBRID_LORA_BACKEND still rules."""

import importlib.util

import pytest
import torch

from hybrid_lora import LoRALinear, fused_lora
from hybrid_lora.ops import backend


def small_inputs(M=4, K=16, N=8, R=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(M, K, generator=g), torch.randn(K, N, generator=g), torch.randn(N, generator=g),
            torch.randn(K, R, generator=g), torch.randn(R, N, generator=g))


def test_a_call_reads_no_environment_and_finds_no_module_once_decided(monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    want = fused_lora(*small_inputs(), rank=3, scale=2.0)

    def refuse(*args, **kwargs):
        raise AssertionError("importlib.util.find_spec called on a call of the op")

    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "no-such-backend")
    torch.testing.assert_close(fused_lora(*small_inputs(), rank=3, scale=2.0), want, rtol=0, atol=0)
    backend.refresh()  # what the command line does after setting the variable
    with pytest.raises(ValueError, match="HYBRID_LORA_BACKEND='no-such-backend'"):
        fused_lora(*small_inputs(), rank=3, scale=2.0)


def test_the_choice_follows_the_variable_after_refresh(monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    assert backend.chosen_backend("cpu") == ("torch", True)
    monkeypatch.delenv("HYBRID_LORA_BACKEND")
    assert backend.chosen_backend("cpu") == ("torch", True)  # kept
    backend.refresh()
    assert backend.chosen_backend("cpu") == (backend.select_backend(torch.device("cpu")), False)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_the_op_traces_in_one_graph_when_first_called_under_compile(path, monkeypatch):
    """torch 2.11's Dynamo refused the old per-call choice (it called importlib.util.find_spec)."""
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    if path == "triton" and backend.select_backend(torch.device("cpu")) != "triton":
        pytest.skip("Triton cannot run here")
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LoRALinear.from_module(torch.nn.Linear(16, 24), r_max=8, alpha=8.0, dropout=0.25).train()
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(5, 16)
    backend.refresh()  # the first decision happens inside the trace
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    seed = layer.dropout_seed.clone()
    got = compiled(x)
    layer.dropout_seed.copy_(seed)
    torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
