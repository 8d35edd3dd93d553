"""The kernel launches of ``hybrid_lora.kernels`` at a shape, and what Triton's JIT compiles for each one.

``capture`` runs the real launchers (``lora_forward``, ``lora_backward``,
``dropout_keep_mask``) on CPU tensors with every kernel object of the kernel
modules replaced, for the duration of the call, by a recorder: nothing is
launched, and the exact arguments the launchers pass are kept, whatever they are.

``warmup`` hands one captured launch to the kernel's own ``warmup`` (the
autotuner's, which prunes its configs as a timed launch would, or the
JIT's), so Triton's binder specializes the arguments exactly as at run time
(an integer equal to 1 or divisible by 16, a 16-byte aligned pointer).
What the JIT then compiles is read through its public compile hooks
(``triton.knobs.runtime.jit_cache_hook``, ``jit_post_compile_hook``): the cache
key, the signature, the constants and the attributes. Two launches with the
same key share one compiled kernel; a new key is a new compile.

The JIT asks the active driver for the device and the target it compiles
for. ``target_driver`` makes a driver that answers with a chosen target (sm_90
by default) active for the duration, so all of this runs without a GPU. That
driver is the one piece of Triton's backend interface this module depends on;
it is tested on every Triton version CI runs (tests/test_bench_launches.py).

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

from hybrid_lora.kernels.interpreter import interpreter_enabled

from .record import REPO_ROOT

KERNEL_MODULES = ("hybrid_lora.kernels.skinny", "hybrid_lora.kernels.lora_forward",
                  "hybrid_lora.kernels.lora_backward", "hybrid_lora.kernels.dropout")


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
    from hybrid_lora.kernels.dropout import dropout_keep_mask
    from hybrid_lora.kernels.lora_backward import lora_backward
    from hybrid_lora.kernels.lora_forward import lora_forward

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
        # snapshot: what a training forward (one with a backward to come) launches
        lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed, snapshot=True)
        context[0] = f"backward dropout={dropout_p}{layout}"
        lora_backward(grad_y, x, s_down, weight, lora_a, lora_b, rank, scale, dropout_p, seed)
        context[0] = "dropout_keep_mask"
        dropout_keep_mask(M, K, seed, max(dropout_p, 0.05), device)
    return launches


# --- the two Triton surfaces this module relies on -------------------------------------------------

class _TargetDriver:
    """Answers the JIT's questions for one target (and one device key of its own); launches nothing.

    ``JITFunction.run`` asks the active driver for the current device, its
    stream and its target (Triton 3.6 to 3.9). Anything else it asks is an
    error naming the attribute, so a Triton that needs more fails loudly here.
    """

    _count = 0

    def __init__(self, target):
        _TargetDriver._count += 1
        self.target = target
        # A device key no real device has, fresh for each use: the JIT keys its caches by device,
        # so nothing compiled here is ever launched, and nothing cached elsewhere hides a compile.
        self.device = f"bench.launches:{target.backend}:{target.arch}:{_TargetDriver._count}"

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        import triton

        raise RuntimeError(f"Triton {triton.__version__} asked the compile-only driver for {name!r}; "
                           "bench.launches._TargetDriver answers get_current_target/device/stream only")


def current_target():
    """The target of the GPU this process sees, or None without one."""
    if not torch.cuda.is_available():
        return None
    from triton.runtime import driver

    return driver.active.get_current_target()


@contextlib.contextmanager
def target_driver(target=None):
    """Make a driver that compiles for `target` (default sm_90) the active one, and restore the previous."""
    from triton.runtime import driver

    stand_in = _TargetDriver(target or sm90())
    previous = driver._active  # None until a driver was first asked for (on a CPU: never)
    driver.set_active(stand_in)
    try:
        yield stand_in
    finally:
        driver._active = previous


@contextlib.contextmanager
def jit_hook(name, hook):
    """Install `hook` as ``triton.knobs.runtime.<name>`` (``jit_cache_hook`` or ``jit_post_compile_hook``).

    The hook is called with keywords ``key``, ``repr``, ``fn`` (module, name,
    jit_function), ``compile`` (signature, device, constants, num_warps, ...,
    configs: the attributes) and more; returning True from ``jit_cache_hook``
    skips the compile. A hook installed before is still called.
    """
    from triton import knobs

    previous = getattr(knobs.runtime, name)

    def chained(**kwargs):
        skip = hook(**kwargs)
        if previous is not None:
            skip = previous(**kwargs) or skip
        return skip

    setattr(knobs.runtime, name, chained)
    try:
        yield
    finally:
        setattr(knobs.runtime, name, previous)


def sm90():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


# --- what the JIT compiles ---------------------------------------------------------------------------

OPTION_FIELDS = ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion", "launch_cooperative_grid")


@dataclass
class Specialization:
    kernel: str  # the Python name of the @triton.jit function
    key: str  # the JIT's in-memory cache key of the compiled variant
    signature: dict
    constants: dict
    attrs: dict
    options: dict  # OPTION_FIELDS


def _warmup(launch: Launch, config=None):
    """The launch through the kernel's own warmup: with `config`, the JIT alone; without, the autotuner's."""
    kwargs = dict(launch.kwargs)
    if config is not None:
        return jit_function(launch.kernel).warmup(*launch.args, grid=(1,), **kwargs, **config.all_kwargs())
    return launch.kernel.warmup(*launch.args, grid=(1,), **kwargs)


@contextlib.contextmanager
def recording_specializations(target=None):
    """Within: launches given to ``_warmup`` are specialized for `target` and recorded, never compiled.

    Yields the list the Specializations are appended to, one per variant the JIT would compile.
    """
    found = []

    def record(*, key, fn, compile, **_):
        found.append(Specialization(fn.name, str(key), dict(compile["signature"]), dict(compile["constants"]),
                                    dict(compile["configs"][0]), {k: compile[k] for k in OPTION_FIELDS}))
        return True

    with target_driver(target), jit_hook("jit_cache_hook", record):
        yield found


def specialize(launch: Launch, config, target=None) -> Specialization:
    """What the JIT would compile for `launch` with autotune `config` (None: a plain kernel) on `target`."""
    with recording_specializations(target) as found:
        _warmup(launch, config)
    if len(found) != 1:
        raise RuntimeError(f"{launch.name}: the JIT's cache hook saw {len(found)} compiles for one config, "
                           "expected 1")
    return found[0]


def compile_launch(launch: Launch, config, target=None):
    """Compile `launch` in `config` for `target` through the JIT's own warmup: Triton's CompiledKernel.

    The compiled kernel also lands in Triton's on-disk cache, under the key a
    launch on a GPU of that target looks up.
    """
    with target_driver(target):
        return _warmup(launch, config)


class CompileCounter:
    """Kernels of ``hybrid_lora.kernels`` the JIT compiled while counting (its post-compile hook)."""

    def __init__(self):
        self.keys = {}  # kernel name -> {(device, key)}

    def add(self, *, key, fn, compile, **_):
        if fn.module in KERNEL_MODULES:
            self.keys.setdefault(fn.name, set()).add((str(compile["device"]), str(key)))

    def counts(self) -> dict:
        return {name: len(keys) for name, keys in self.keys.items()}

    def total(self) -> int:
        return sum(self.counts().values())


@contextlib.contextmanager
def counting_compiles():
    """Count the compiles of the kernels inside the block: yields a CompileCounter."""
    counter = CompileCounter()
    with jit_hook("jit_post_compile_hook", counter.add):
        yield counter


def variant_counts(M, K, N, ranks, dtype=torch.bfloat16, dropout_p=0.0, target=None, device="cpu") -> dict:
    """{kernel name: {rank: number of distinct compiled variants after launching ranks[0..i]}}.

    Counts the distinct JIT cache keys over every config the autotuner times
    (its own warmup prunes them as a launch would), as a sweep over `ranks`
    on a GPU fills each kernel's cache.
    """
    seen, counts = {}, {}
    for rank in ranks:
        launches = capture(M, K, N, rank, dtype, dropout_p, device=device)
        for launch in launches:
            with recording_specializations(target) as found:
                _warmup(launch)
            seen.setdefault(launch.name, set()).update(spec.key for spec in found)
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
    target = current_target() if args.target == "current" else None
    if args.target == "current" and target is None:
        parser.error("--target current: no GPU here; expected --target sm90")
    counts = variant_counts(args.M, args.K, args.N, args.ranks, parse_dtype(args.dtype), args.dropout, target)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
