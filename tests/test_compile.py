"""The fused op under torch.compile: custom-op contracts, one graph for every rank and seed, and compiled training.

A tiny GPT-2 and a tiny Llama with injected adapters are compiled with
``fullgraph=True`` under ``aot_eager`` (and GPT-2 once under ``inductor``,
the default), on the Triton path (the interpreter on a CPU) and the PyTorch
path, on every supported torch (2.11 and newer). Rank and scale are device
buffers and the LoRA dropout seed a draw from torch's generator on the device,
so after the first call nothing may compile again:
``fail_on_recompile`` turns a recompile into an error. A rank cut makes new
adapter Parameters and compiles once more. The models' own dropouts are
off, so compiled and eager calls see the same randomness (LoRA dropout stays
on: the same torch seed draws the same mask on both).
"""

import pytest
import torch
from functorch.compile import make_boxed_func
from helpers import tiny_gpt2, tiny_llama
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend

import hybrid_lora
from hybrid_lora.nn.layer import lora_layers
from hybrid_lora.ops.fused_lora import fused_lora_backward, fused_lora_forward
from hybrid_lora.train import compiled, distributed, dynamic_rank, nonfinite

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

VOCAB, LENGTH, WIDTH, R = 16, 8, 32, 16
RANKS = (16, 5, 9, 1, 16, 12)  # the first call at the full width, then others, the full width again among them


@pytest.fixture
def inductor_in_process():
    """Inductor's code generation in this process: its pool of compile workers has outlived pytest by its
    300-second shutdown wait at exit on a busy 2-core machine."""
    with torch._inductor.config.patch(compile_threads=1):
        yield


MODELS = {  # name: (the tiny model from the seed, its target modules)
    "gpt2": (lambda seed: tiny_gpt2(seed, width=WIDTH, vocab=VOCAB, positions=LENGTH), ("c_attn",)),
    # Grouped-query attention (k_proj's out is 16) and an MLP projection, in nn.Linear's layout.
    "llama": (lambda seed: tiny_llama(seed, width=WIDTH, vocab=VOCAB, positions=LENGTH),
              ("q_proj", "k_proj", "down_proj")),
}


def tiny_lora_model(name="gpt2", seed=0, lora_dropout=0.25):
    build, targets = MODELS[name]
    model = build(seed)
    layers = hybrid_lora.inject_lora(model, targets, r_max=R, alpha=8.0, dropout=lora_dropout)
    with torch.no_grad():
        for layer in layers:  # B = 0 would hide every error in the LoRA term
            layer.lora_b.normal_(0.0, 0.5)
    return model.train()


def tiny_lora_gpt2(seed=0, lora_dropout=0.25):
    return tiny_lora_model("gpt2", seed, lora_dropout)


def logits_and_grads(model, fn, ids):
    logits = fn(input_ids=ids).logits
    (logits.float() ** 2).mean().backward()
    grads = [p.grad.clone() for layer in lora_layers(model) for p in (layer.lora_a, layer.lora_b)]
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def op_inputs(rank, dtype, requires_grad):
    g = torch.Generator().manual_seed(rank)
    M, K, N = 5, 20, 24
    x = torch.randn(M, K, generator=g).to(dtype)
    weight, bias = torch.randn(K, N, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    lora_a, lora_b = torch.randn(K, R, generator=g), torch.randn(R, N, generator=g)
    for t in (x, lora_a, lora_b):
        t.requires_grad_(requires_grad)
    scalars = (torch.tensor(rank), torch.tensor(8.0 / rank, dtype=torch.float64), torch.tensor(1234))
    return x, weight, bias, lora_a, lora_b, *scalars


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("rank", [1, R])
def test_opcheck_forward_and_backward(rank, dropout_p, dtype):
    x, weight, bias, lora_a, lora_b, rank_t, scale_t, seed_t = op_inputs(rank, dtype, requires_grad=True)
    torch.library.opcheck(fused_lora_forward, (x, weight, bias, lora_a, lora_b, rank_t, scale_t, seed_t, dropout_p))
    y, s_down, *copies = fused_lora_forward(x, weight, bias, lora_a, lora_b, rank_t, scale_t, seed_t, dropout_p)
    assert (s_down[:, rank:] == 0).all()  # the columns past the rank, as the backward reads them
    # The forward's copies of what it read, for its backward (the row offset: None is 0).
    assert [c.item() for c in copies] == [rank, pytest.approx(scale_t.item()), 0]
    assert [c.dtype for c in copies] == [torch.int32, torch.float32, torch.int64]
    grad_y = torch.randn_like(y)
    args = (grad_y, x.detach(), s_down, weight, lora_a.detach(), lora_b.detach(), rank_t, scale_t, seed_t, dropout_p)
    for needs in ((True, True, True), (False, True, True)):
        torch.library.opcheck(fused_lora_backward, (*args, *needs))


def _inspecting_backend(found):
    """aot_eager that records what every captured graph (Dynamo's, the forward, the backward) takes and calls."""

    def inspect(gm, stage):
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                value = node.meta.get("val", node.meta.get("example_value"))
                if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
                    found["scalar inputs"].append(f"{stage}: {node.name} = {value!r}")
            elif node.op in ("call_function", "call_method"):
                name = str(node.target)
                found["calls"].append(name)
                if "_local_scalar_dense" in name or name in ("item", "tolist"):
                    found["host reads"].append(f"{stage}: {name}")

    def compiler(stage):
        def compile_stage(graph, inputs):
            inspect(graph, stage)
            return make_boxed_func(graph.forward)

        return compile_stage

    def dynamo_backend(gm, example_inputs):
        inspect(gm, "dynamo")
        return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))(gm, example_inputs)

    return dynamo_backend


def agree_with_eager(model, compiled_model, ids, ranks, compiles_first=True):
    """Compiled logits and gradients equal eager ones at each rank in turn, each call drawing a new dropout mask;
    after the first call (or from the first, with ``compiles_first=False``) nothing may compile.

    The same torch seed before the eager and the compiled call draws the same LoRA dropout seeds (Inductor
    draws them through torch's generator with ``fallback_random``); each step uses another torch seed."""
    for i, rank in enumerate(ranks):
        hybrid_lora.set_rank(model, rank)
        torch.manual_seed(i)
        want_logits, want_grads = logits_and_grads(model, model, ids)
        torch.manual_seed(i)
        with torch.compiler.set_stance("default" if i == 0 and compiles_first else "fail_on_recompile"), \
                torch._inductor.config.patch(fallback_random=True):
            got_logits, got_grads = logits_and_grads(model, compiled_model, ids)
        torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
        for got, want in zip(got_grads, want_grads, strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        for grad_a, grad_b in zip(got_grads[::2], got_grads[1::2]):  # nothing past the active rank learns
            assert (grad_a[:, rank:] == 0).all() and (grad_b[rank:] == 0).all()
            assert (grad_a[:, :rank] != 0).any() and (grad_b[:rank] != 0).any()


def real_graphs(counter):
    """The graphs a counting backend was given that compute something (DDP's optimizer may add empty ones)."""
    return [g for g in counter.graphs if any(n.op == "call_function" for n in g.graph.nodes)]


# Inductor (the default) once: on GPT-2, on the Triton path (the default path: Inductor around the op's custom
# ops), without the cut; its C++ code generation takes many seconds a graph on a CPU. Llama on the Triton path
# compiles in test_accelerate_training (fullgraph, with dropout); here Llama's layout runs on the PyTorch path.
@pytest.mark.parametrize("model_name, path, compile_backend", [
    ("gpt2", "torch", "aot_eager"),
    pytest.param("gpt2", "triton", "aot_eager", marks=pytest.mark.slow),
    pytest.param("llama", "torch", "aot_eager", marks=pytest.mark.slow),
    pytest.param("gpt2", "triton", "inductor", marks=pytest.mark.slow),
])
def test_one_graph_for_every_rank_and_seed_and_one_more_after_a_rank_cut(model_name, path, compile_backend, request,
                                                                         monkeypatch):
    """Compiled logits and gradients equal eager ones at every rank. A rank cut compiles once for the new width,
    and that graph serves every rank of it: the old width's graph never runs on the cut adapters (torch 2.11
    replayed it when a cut shrank the Parameters in place)."""
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    if compile_backend == "inductor":
        request.getfixturevalue("inductor_in_process")
    model = tiny_lora_model(model_name)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    # aot_eager is run through a backend that inspects every graph it is given.
    found = {"scalar inputs": [], "host reads": [], "calls": []}
    backend = _inspecting_backend(found) if compile_backend == "aot_eager" else compile_backend
    counter = CompileCounterWithBackend(backend)
    torch._dynamo.utils.counters.clear()
    compiled_model = torch.compile(model, backend=counter, fullgraph=True)
    agree_with_eager(model, compiled_model, ids, RANKS)
    assert len(real_graphs(counter)) == 1, f"{len(real_graphs(counter))} graphs over ranks {RANKS}"
    if compile_backend == "aot_eager":
        dynamic_rank.truncate_adapters(lora_layers(model), 12)
        agree_with_eager(model, compiled_model, ids, (12, 3))
        assert all(layer.r_max == 12 for layer in lora_layers(model))
        assert len(real_graphs(counter)) == 2, f"{len(real_graphs(counter))} graphs for two adapter widths"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    if compile_backend == "aot_eager":
        assert found["scalar inputs"] == [] and found["host reads"] == []
        if path == "triton":
            assert any("fused_lora_forward" in c for c in found["calls"])
            assert any("fused_lora_backward" in c for c in found["calls"])


def _train(model, steps, dylora, cut_at, ids, compile_backend=None):
    """A few DyLoRA steps through the trainer's own step function, the rank cut to R // 2 at step `cut_at`."""
    from hybrid_lora.train import trainer
    from hybrid_lora.train.config import TrainConfig
    from hybrid_lora.train.state import EpochTotals

    layers = lora_layers(model)
    config = TrainConfig(r_max=R, alpha=8.0, lora_dropout=0.25, dylora=dylora, lambda_order=1e-3,
                         lambda_dc=0.0, lr=1e-2, epochs=1, rank_schedule=(), device="cpu",
                         compile=compile_backend is not None)
    params = [p for p in model.parameters() if p.requires_grad]
    device = torch.device("cpu")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=nonfinite.fused_adamw_supported(device) or None)  # as the trainer's
    parallel = distributed.current()
    stage = trainer._Stage(layers, optimizer, dynamic_rank.RankSampler(3), None, device, config, None,
                           parallel=parallel, guard=nonfinite.NonFiniteGuard(optimizer, device),
                           loss=compiled.loss_function(config, parallel, backend=compile_backend))
    totals = EpochTotals.zeros(torch.device("cpu"))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for step in range(steps):
        if step == cut_at:
            dynamic_rank.truncate_adapters(layers, R // 2, optimizer)
        trainer._train_step(model, [batch], stage, totals)
    return [t.detach().clone() for layer in layers for t in (layer.lora_a, layer.lora_b)]


@pytest.mark.parametrize("path, dylora", [("triton", "frozen"), ("torch", "nested")])
def test_compiled_dylora_training_with_a_rank_cut_ends_with_the_eager_adapters(path, dylora, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(2))
    eager = _train(tiny_lora_gpt2(), 4, dylora, 2, ids)
    counter = CompileCounterWithBackend("aot_eager")
    got = _train(tiny_lora_gpt2(), 4, dylora, 2, ids, compile_backend=counter)
    assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in eager] == [(WIDTH, R // 2), (R // 2, 3 * WIDTH)]
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    assert len(real_graphs(counter)) == 2, f"{len(real_graphs(counter))} graphs for two adapter widths"


def test_compiled_training_recompiles_up_to_its_bound_then_fails_instead_of_running_eager():
    """Each new sequence length is a graph; past ``graph_bound`` Dynamo raises (fullgraph) rather than run eager."""
    from hybrid_lora.train.config import TrainConfig

    # Below the bound: loss_function must raise it. (monkeypatch would delete the setting on undo.)
    with torch._dynamo.config.patch(recompile_limit=1):
        config = TrainConfig(r_max=R, alpha=8.0, rank_schedule=(), device="cpu", compile=True)
        bound = compiled.graph_bound(config, stages=1)
        assert bound == 2  # one width, and a smaller last batch
        counter = CompileCounterWithBackend("aot_eager")
        loss = compiled.loss_function(config, distributed.current(), backend=counter)
        model = tiny_lora_model(lora_dropout=0.0)
        ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(4))
        for length in range(LENGTH, LENGTH - bound, -1):
            batch = {"input_ids": ids[:, :length], "attention_mask": torch.ones_like(ids[:, :length]),
                     "labels": ids[:, :length]}
            loss(model, batch)[0].backward()
        assert counter.frame_count == bound
        batch = {"input_ids": ids[:, :2], "attention_mask": torch.ones_like(ids[:, :2]), "labels": ids[:, :2]}
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            loss(model, batch)
