"""The first compile traces once: no Dynamo restart, one backend compile per graph.

Dynamo restarts its analysis ("Restarting analysis due to
_tensorify_python_scalars") when a float symbol of the trace is neither
turned into a tensor nor specialized. A Python float reaching the op (the
dropout probability) is not such a symbol: it is a constant of the trace.
What does make one is a 0-d fp64 *CPU* tensor: Dynamo's fake tensors give
every 0-d fp64 CPU tensor they see a float symbol for its value (in case
``.item()`` is called), and that symbol, unused, makes the restart; so the
layer keeps its scale in fp32 (fp64 only for an fp64 adapter). The counting
backend sees each trace Dynamo hands it, the restarted one too.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hybrid_lora
from hybrid_lora import fused_lora
from hybrid_lora.ops import backend

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def use_path(monkeypatch, path):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    backend.refresh()
    if backend.select_backend(torch.device("cpu")) != path:
        pytest.skip(f"the {path} path cannot run here")


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_the_op_with_a_python_dropout_probability_compiles_once(path, monkeypatch):
    use_path(monkeypatch, path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g, requires_grad=True)
    weight, bias = torch.randn(16, 24, generator=g), torch.randn(24, generator=g)
    lora_a = torch.randn(16, 8, generator=g, requires_grad=True)
    lora_b = torch.randn(8, 24, generator=g, requires_grad=True)
    rank, scale, seed = torch.tensor(5), torch.tensor(1.6), torch.tensor(11)
    dropout_p = 0.25

    def step(x):
        return fused_lora(x, weight, bias, lora_a, lora_b, rank=rank, scale=scale, dropout_p=dropout_p, seed=seed)

    counter = CompileCounterWithBackend("aot_eager")
    y = torch.compile(step, backend=counter, fullgraph=True)(x)
    y.sum().backward()
    assert counter.frame_count == 1, f"{counter.frame_count} backend compiles for one graph: a restart"
    torch.testing.assert_close(y, step(x))


@pytest.mark.slow
def test_a_lora_gpt2_compiles_once_per_graph_at_the_first_step(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    use_path(monkeypatch, "torch")  # the restart is the trace's, whichever path the op takes
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=8, vocab_size=16,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    hybrid_lora.inject_lora(model, r_max=8, alpha=8.0, dropout=0.1)
    counter = CompileCounterWithBackend("aot_eager")
    ids = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.compile(model.train(), backend=counter, fullgraph=True)(input_ids=ids).logits.sum().backward()
    assert counter.frame_count == len({id(g) for g in counter.graphs}) == 1, (
        f"{counter.frame_count} backend compiles for one graph: a restart")
