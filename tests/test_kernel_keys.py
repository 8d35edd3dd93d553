"""What a new rank or a new batch length costs: the keys the autotuned kernels are cached under.

Neither the CPU interpreter nor these tests compile anything: every launch of
the four autotuned kernels is recorded and the key is formed as Triton forms it.

- A runtime rank: sweeping every rank 1..R compiles one kernel per call site,
  keyed by the width R only. The compile key is each argument's specialization
  (``native_specialize_impl``: ints equal to 1 become constants, multiples of
  16 get a divisibility attribute, unless do_not_specialize) plus the constexpr
  meta-parameters. A GPU run counts the real caches (bench/rank_sweep.py).
- A bucket of M, not M: batches of new lengths do not retune the kernels. The
  autotune key is formed as ``Autotuner.run`` forms it: the values of the
  key's arguments, then the dtypes of the tensor arguments (the launchers
  allocate their outputs; nothing is computed). 50 token counts between 1 and
  70,000 must give at most one key per M bucket and call site, while the
  kernels still receive the exact M for their grids and masks.
"""

import importlib

import torch
import triton
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import native_specialize_impl

from hybrid_lora import fused_lora
from hybrid_lora.kernels.configs import MIN_M_BUCKET, m_bucket, rank_block

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


def autotune_key(kernel, args, kwargs):
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    key = [named[name] for name in kernel.keys if name in named]
    key += [str(value.dtype) for name, value in named.items() if name in kernel.arg_names and hasattr(value, "dtype")]
    return tuple(key)


def token_counts(n=50, largest=70_000):
    """1, `largest`, and n - 2 other distinct counts drawn between them."""
    g = torch.Generator().manual_seed(0)
    return sorted([1, largest] + (torch.randperm(largest - 2, generator=g)[: n - 2] + 2).tolist())


def test_fifty_token_counts_give_one_autotune_key_per_bucket(monkeypatch):
    keys = {name: set() for name in KERNELS}
    exact_m = {name: set() for name in KERNELS}

    for name, kernel in KERNELS.items():
        def record(*args, _name=name, _kernel=kernel, **kwargs):
            keys[_name].add(autotune_key(_kernel, args, kwargs))
            exact_m[_name].add(dict(zip(_kernel.arg_names, args))["M"])

        monkeypatch.setattr(kernel, "run", record)

    counts = token_counts()
    assert len(set(counts)) == 50 and counts[0] == 1 and counts[-1] == 70_000
    K, N, R = 16, 24, 16
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(K, N, generator=g), torch.randn(N, generator=g)
    lora_a, lora_b = torch.randn(K, R, generator=g), torch.randn(R, N, generator=g)
    rank, scale, seed = torch.tensor(5), torch.tensor(2.0, dtype=torch.float64), torch.tensor(7)
    for M in counts:
        x, grad_y = torch.empty(M, K), torch.empty(M, N)
        for dropout_p in (0.0, 0.1):
            _, s_down = forward_module.lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed)
            backward_module.lora_backward(grad_y, x, s_down, weight, lora_a, lora_b, rank, scale, dropout_p, seed)

    buckets = {m_bucket(M) for M in counts}
    for name in KERNELS:
        # Each key also carries HAS_DROPOUT where the kernel has dropout: two variants per bucket at most.
        variants = CALL_SITES.get(name, 1) * (2 if "HAS_DROPOUT" in KERNELS[name].keys else 1)
        assert len(keys[name]) <= variants * len(buckets), (
            f"{name}: {len(keys[name])} autotune keys for {len(counts)} token counts in {len(buckets)} buckets")
        assert exact_m[name] >= set(counts), f"{name}: launched with a bucketed M instead of the exact one"


def test_the_bucket_is_the_next_power_of_two_from_the_smallest():
    assert [m_bucket(m) for m in (1, 15, 16, 17, 64, 65, 8192, 8193, 70_000)] == [
        MIN_M_BUCKET, 16, 16, 32, 64, 128, 8192, 16384, 131072]
    assert all(m <= m_bucket(m) < 2 * max(m, MIN_M_BUCKET) for m in range(1, 5000))
