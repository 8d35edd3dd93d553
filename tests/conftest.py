"""Test setup: the Triton interpreter on machines without CUDA, and one tolerance table.

TRITON_INTERPRET must be set before triton is first imported, so it is set
here, at collection, before any test module imports hybrid_lora.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Absolute and relative tolerances per compute dtype, for kernel-vs-fp64-reference comparisons.
# fp16/bf16 round inputs and outputs to 11/8 mantissa bits; the reductions accumulate in fp32.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=1e-1, rtol=5e-2),
}


@pytest.fixture(autouse=True)
def backend_decided_per_test():
    """Tests set HYBRID_LORA_BACKEND with monkeypatch: the op decides its backend again in each test."""
    from hybrid_lora.ops import backend

    backend.refresh()
    yield
    backend.refresh()


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: at the peft tests' sizes more threads only wait on each other (tenfold, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_path(monkeypatch):
    """The op runs its PyTorch path (HYBRID_LORA_BACKEND=torch) for the test."""
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")


def _record_fused_calls(monkeypatch, record):
    """Calls record(dropout_p) for every call peft layers patched by ``accelerate`` make to fused_lora."""
    from hybrid_lora.nn import peft as peft_integration

    real = peft_integration.fused_lora

    def recording(*args, **kwargs):
        record(kwargs["dropout_p"])
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_integration, "fused_lora", recording)


@pytest.fixture
def fused_calls(monkeypatch):
    """The dropout_p of every call peft layers patched by ``accelerate`` make to fused_lora (empty: peft's ran)."""
    calls = []
    _record_fused_calls(monkeypatch, calls.append)
    return calls


@pytest.fixture
def fused_dropouts(monkeypatch):
    """{dropout_p: True} for each dropout_p the patched layers passed to fused_lora, for compiled calls.

    A dict, not a list of calls: a compiled graph guards on what it captures, and a list that
    grows every call would recompile every step.
    """
    seen = {}
    _record_fused_calls(monkeypatch, lambda p: seen.__setitem__(p, True))
    return seen


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every torch.empty during the test comes back full of NaN, so an unwritten element fails."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after: compile counts and recompiles are the test's own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
