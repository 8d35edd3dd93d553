"""The kernel launches of ``hybrid_lora.kernels`` at a shape, and how Triton's JIT specializes each one.

``capture`` runs the real launchers (``lora_forward``, ``lora_backward``,
``dropout_keep_mask``) on CPU tensors with every kernel object of the kernel
modules replaced, for the duration of the call, by a recorder: nothing is
launched, and the exact arguments the launchers pass are kept.

``specialize`` turns one launch and one autotune config into what Triton's
``JITFunction.run`` would compile for a target: the cache key, the
signature, the constexprs, the attributes (16-byte divisibility) and the
options. It uses Triton's own binder (``create_function_from_signature`` and
``JITFunction._pack_args``, as in Triton 3.x), so an integer argument equal to
1 or divisible by 16 is specialized exactly as at run time. Two launches with
the same key share one compiled kernel; a new key is a new compile.

The real kernels are needed: this module refuses to run under
``TRITON_INTERPRET=1`` (use ``run_without_interpreter`` from a process that has it).
"""

import contextlib
import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from .record import REPO_ROOT

KERNEL_MODULES = ("hybrid_lora.kernels.skinny", "hybrid_lora.kernels.lora_forward",
                  "hybrid_lora.kernels.lora_backward", "hybrid_lora.kernels.dropout")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def require_compiled_kernels():
    if interpreter_enabled():
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted functions here; run this in a "
                           "process without TRITON_INTERPRET (bench.launches.run_without_interpreter)")


def run_without_interpreter(module: str, args: list, timeout=None, check=True) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` from the repository root in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"python -m {module} {' '.join(map(str, args))} exited with {result.returncode}:\n"
                           f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def _is_kernel(obj) -> bool:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    return isinstance(obj, (Autotuner, JITFunction))


def kernel_objects() -> dict:
    """{(module, name): Autotuner or JITFunction} for every Triton function defined in the kernel modules."""
    require_compiled_kernels()
    found = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if _is_kernel(obj) and jit_function(obj).__module__ == module_name:
                found[(module_name, name)] = obj
    return found


def jit_function(kernel):
    """The JITFunction under an Autotuner (or the kernel itself)."""
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def configs_of(kernel) -> list:
    """The autotune configs of `kernel`, or [None] for a plain @triton.jit kernel."""
    return list(kernel.configs) if hasattr(kernel, "configs") else [None]


def candidate_configs(launch) -> list:
    """The configs the autotuner would time for `launch`: its configs after its own pruning.

    Mirrors ``Autotuner.run``: with more than one config, ``prune_configs``
    (``early_config_prune``, then a perf model if any) sees the launch's
    arguments; with one, that config is used as is.
    """
    kernel = launch.kernel
    configs = configs_of(kernel)
    if len(configs) <= 1:
        return configs
    kernel.nargs = dict(zip(kernel.arg_names, launch.args))
    try:
        return list(kernel.prune_configs(dict(launch.kwargs)))
    finally:
        kernel.nargs = None


@dataclass
class Launch:
    module: str
    name: str
    kernel: object  # the Autotuner or JITFunction that was launched
    args: tuple
    kwargs: dict
    context: str  # which launcher call, e.g. "backward dropout=0.05"


class _Recorder:
    """Stands in for a kernel object: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, module, name, kernel, launches, context):
        self.module, self.name, self.kernel, self.launches, self.context = module, name, kernel, launches, context

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch(self.module, self.name, self.kernel, args, kwargs, self.context[0]))
        return record


@contextlib.contextmanager
def _recording(launches, context):
    kernels = kernel_objects()
    modules = {m: importlib.import_module(m) for m, _ in kernels}
    try:
        for (module, name), kernel in kernels.items():
            setattr(modules[module], name, _Recorder(module, name, kernel, launches, context))
        yield
    finally:
        for (module, name), kernel in kernels.items():
            setattr(modules[module], name, kernel)


WEIGHT_LAYOUTS = ("in_out", "out_in")  # Conv1D's W [K, N]; nn.Linear's [N, K], passed as its transposed view


def capture(M, K, N, rank, dtype=torch.bfloat16, dropout_p=0.0, r_max=64, adapter_dtype=None, device="cpu",
            weight_layout="in_out"):
    """Every kernel launch of one forward and one backward of the fused layer (and of the mask utility).

    x [M, K] and W [K, N] in `dtype`; A [K, r_max] and B [r_max, N] in
    `adapter_dtype` (default `dtype`). Tensors are allocated, never filled.
    weight_layout "out_in" stores W as nn.Linear does, [N, K], and passes its
    transpose: W's strides become (1, K), which Triton compiles separately.
    """
    require_compiled_kernels()
    from hybrid_lora.kernels import dropout_keep_mask, lora_backward, lora_forward

    adapter_dtype = adapter_dtype or dtype
    x = torch.empty(M, K, dtype=dtype, device=device)
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout {weight_layout!r}: expected one of {WEIGHT_LAYOUTS}")
    weight = torch.empty(K, N, dtype=dtype, device=device)
    if weight_layout == "out_in":
        weight = torch.empty(N, K, dtype=dtype, device=device).t()
    bias = torch.empty(N, dtype=dtype, device=device)
    lora_a = torch.empty(K, r_max, dtype=adapter_dtype, device=device)
    lora_b = torch.empty(r_max, N, dtype=adapter_dtype, device=device)
    grad_y = torch.empty(M, N, dtype=dtype, device=device)
    s_down = torch.empty(M, r_max, dtype=dtype, device=device)  # S is [M, R] whatever the rank
    seed, scale = 1234, 32.0 / rank
    launches, context = [], [""]
    with _recording(launches, context):
        layout = "" if weight_layout == "in_out" else " W=[N,K]^T"
        context[0] = f"forward dropout={dropout_p}{layout}"
        lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed)
        context[0] = f"backward dropout={dropout_p}{layout}"
        lora_backward(grad_y, x, s_down, weight, lora_a, lora_b, rank, scale, dropout_p, seed)
        context[0] = "dropout_keep_mask"
        dropout_keep_mask(M, K, seed, max(dropout_p, 0.05), device)
    return launches


@dataclass
class Specialization:
    key: str  # Triton's in-memory cache key of the compiled variant
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def specialize(launch: Launch, config, target) -> Specialization:
    """What ``JITFunction.run`` would compile for `launch` with autotune `config` on `target`."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = jit_function(launch.kernel)
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
    # The options JITFunction.run adds before binding (Triton 3.9).
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    key = str((tuple(specialization), str(options)))
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return Specialization(key, signature, constexprs, attrs, options.__dict__)


def compiled_variant_counts() -> dict:
    """{kernel name: variants in Triton's in-memory cache}, summed over devices: what has been compiled so far.

    Triton 3.x keeps them in ``JITFunction.device_caches[device][0]``; older
    versions in ``JITFunction.cache[device]``.
    """
    counts = {}
    for (_, name), kernel in kernel_objects().items():
        fn = jit_function(kernel)
        if hasattr(fn, "device_caches"):
            counts[name] = sum(len(caches[0]) for caches in fn.device_caches.values())
        else:
            counts[name] = sum(len(cache) for cache in fn.cache.values())
    return counts


def variant_counts(M, K, N, ranks, dtype=torch.bfloat16, dropout_p=0.0, target=None, device="cpu") -> dict:
    """{kernel name: {rank: number of distinct compiled variants after launching ranks[0..i]}}.

    Counts the distinct JIT cache keys over every config the autotuner times
    (after its pruning), as a sweep over `ranks` on a GPU fills each kernel's cache.
    """
    from triton.backends.compiler import GPUTarget

    target = target or GPUTarget("cuda", 90, 32)
    seen, counts = {}, {}
    for rank in ranks:
        for launch in capture(M, K, N, rank, dtype, dropout_p, device=device):
            keys = seen.setdefault(launch.name, set())
            for config in candidate_configs(launch):
                keys.add(specialize(launch, config, target).key)
        for name, keys in seen.items():
            counts.setdefault(name, {})[rank] = len(keys)
    return counts


def main(argv=None):
    import argparse

    from .record import parse_dtype

    parser = argparse.ArgumentParser(description="Distinct compiled variants per kernel over a rank sweep (JSON).")
    parser.add_argument("--M", type=int, default=8192)
    parser.add_argument("--K", type=int, default=768)
    parser.add_argument("--N", type=int, default=2304)
    parser.add_argument("--ranks", type=int, nargs="+", default=list(range(1, 65)))
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--target", default="sm90", choices=["sm90", "current"],
                        help="Hopper, or the target of the GPU this process sees")
    args = parser.parse_args(argv)
    target = None
    if args.target == "current":
        from triton.runtime import driver

        target = driver.active.get_current_target()
    counts = variant_counts(args.M, args.K, args.N, args.ranks, parse_dtype(args.dtype), args.dropout, target)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
