"""A runtime rank: sweeping every rank 1..R compiles one kernel per call site, keyed by the width R only.

The CPU interpreter compiles nothing, so the test records every launch and
computes the key Triton caches compiled kernels under: each argument's
specialization (``native_specialize_impl``: ints equal to 1 become constants,
multiples of 16 get a divisibility attribute, unless do_not_specialize) plus
the constexpr meta-parameters. A GPU run counts the real caches
(bench/rank_sweep.py).
"""

import importlib

import torch
import triton
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import native_specialize_impl

from hybrid_lora import fused_lora
from hybrid_lora.kernels.configs import rank_block

# The package re-exports the launchers under the modules' names; take the modules themselves.
forward_module = importlib.import_module("hybrid_lora.kernels.lora_forward")
skinny_module = importlib.import_module("hybrid_lora.kernels.skinny")
backward_module = importlib.import_module("hybrid_lora.kernels.lora_backward")

KERNELS = {
    "skinny": skinny_module._skinny_product_kernel,
    "forward": forward_module._fused_forward_kernel,
    "grad_x": backward_module._fused_grad_x_kernel,
    "grad_weight": backward_module._lora_grad_weight_kernel,
}
# Launches per training step: the skinny product serves S and dS, the weight-gradient kernel dA and dB.
CALL_SITES = {"skinny": 2, "grad_weight": 2}


def jit_parameters(kernel):
    """(argument names, do_not_specialize names) of an autotuned kernel."""
    fn = kernel.fn
    names = list(fn.arg_names)
    unspecialized = getattr(fn, "do_not_specialize", None)
    if unspecialized is None:  # the interpreter keeps the jit() keyword arguments
        unspecialized = fn.kwargs.get("do_not_specialize", ())
    unspecialized = unspecialized or ()
    return names, {names[i] if isinstance(i, int) else i for i in unspecialized}


def specialization_key(kernel, args, kwargs):
    names, unspecialized = jit_parameters(kernel)
    key = []
    for name, value in zip(names, args):
        key.append(native_specialize_impl(BaseBackend, value, False, name not in unspecialized, True))
    key.extend(sorted((k, v) for k, v in kwargs.items() if k != "grid" and k != "warmup"))
    return tuple(key)


def test_every_rank_reuses_one_kernel_per_width(monkeypatch):
    keys = {name: set() for name in KERNELS}
    for name, kernel in KERNELS.items():
        real_run = kernel.run

        def recording_run(*args, _name=name, _kernel=kernel, _run=real_run, **kwargs):
            keys[_name].add(specialization_key(_kernel, args, kwargs))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", recording_run)

    R, M, K, N = 64, 4, 16, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    weight, bias = torch.randn(K, N, generator=g), torch.randn(N, generator=g)
    lora_a = torch.randn(K, R, generator=g, requires_grad=True)
    lora_b = torch.randn(R, N, generator=g, requires_grad=True)
    for rank in range(1, R + 1):
        y = fused_lora(x, weight, bias, lora_a, lora_b, rank=rank, scale=32 / rank, dropout_p=0.1, seed=rank)
        y.sum().backward()

    # The rank, scale and seed are read from device tensors: the specialization
    # follows the width R, so every rank 1..R shares the kernels of one call site.
    for name, seen in keys.items():
        assert seen, f"{name} was never launched"
        assert all(("BLOCK_R", rank_block(R)) in key for key in seen), f"{name}: BLOCK_R not taken from R"
        assert len(seen) <= CALL_SITES.get(name, 1), f"{name}: {len(seen)} specializations over ranks 1..{R}"


def test_rank_block_is_a_power_of_two_bucket():
    assert [rank_block(r) for r in (1, 16, 17, 32, 33, 64, 65, 200)] == [16, 16, 32, 32, 64, 64, 64, 64]
    assert all(triton.next_power_of_2(rank_block(r)) == rank_block(r) for r in range(1, 300))
