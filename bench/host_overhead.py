"""Host time per layer call at a launch-bound shape: hybrid-lora's layer vs peft's LoRA vs the plain layer.

At ``nn.Linear`` 64 -> 64 with 8 rows and r = 16 the arithmetic is nothing:
a forward and backward costs what the Python wrapper and the dispatcher spend
on the host, which is what decides an eager step at small batch sizes on a
GPU (a Llama-7B with every projection adapted calls the layer 224 times per
forward). Each provider wraps the same ``nn.Linear``:

- ``plain``: the ``nn.Linear`` alone;
- ``peft``: peft's LoRA on it (``inject_adapter_in_model``);
- ``ours``: ``hybrid_lora.LoRALinear.from_module`` at r_max = r, on the
  backend path asked for (``--backend``; ``auto`` is the Triton kernels on a
  GPU);
- ``peft+accelerate``: the ``peft`` layer after ``hybrid_lora.accelerate``,
  on the same backend path.

The LoRA layers run with each LoRA dropout asked for (``--dropout``, 0 and
0.1 by default; training mode), the providers of one dropout in the same
rounds; ``plain`` has no dropout and is timed again with each.

One call is ``layer(x).backward(grad_y)`` with x requiring grad. Providers
take turns in every round (the order rotates), each timing ``--calls`` calls,
so drifts of the machine touch all alike; the figure is the median over
rounds of microseconds per call, and the ratios are of medians measured in
this one process. On a GPU the time is wall time with CUDA synchronized at
the end of a round; on a CPU, with one torch thread (``--threads 1``), it is
the calling thread's CPU time, which leaves out the time other processes
hold the core. On a GPU it also times the first calls at a token count in a
new M bucket (the kernels autotune there) and in the same bucket (they must
not), next to a steady call (``call`` column).

    python -m bench.host_overhead                        # bench/results/host-overhead-<device>-<date>.csv
    python -m bench.host_overhead --device cpu --backend torch --threads 1
    python -m bench.host_overhead --device cpu --size 1024 128 384 64 --calls 10   # the default run's c_attn
"""

import argparse
import contextlib
import copy
import gc
import os
import statistics
import time

import torch

from .record import RESULTS_DIR, pick_device, slug, stamp, utc_now, write_csv

PROVIDERS = ("plain", "peft", "ours", "peft+accelerate")
FUSED = ("ours", "peft+accelerate")  # the providers that run hybrid_lora.fused_lora, on a backend path
COLUMNS = ["provider", "backend", "call", "M", "K", "N", "r", "dropout", "dtype", "us_per_call", "us_p20", "us_p80",
           "over_peft", "over_plain", "calls", "rounds", "threads", "device", "commit", "date"]


@contextlib.contextmanager
def backend_path(name):
    """HYBRID_LORA_BACKEND set to `name` ('auto': unset) while the block runs, and the op told so."""
    from hybrid_lora.ops import backend

    previous = os.environ.pop("HYBRID_LORA_BACKEND", None)
    if name != "auto":
        os.environ["HYBRID_LORA_BACKEND"] = name
    backend.refresh()
    try:
        yield
    finally:
        os.environ.pop("HYBRID_LORA_BACKEND", None)
        if previous is not None:
            os.environ["HYBRID_LORA_BACKEND"] = previous
        backend.refresh()


@contextlib.contextmanager
def cpu_threads(n):
    """torch's intra-op threads set to `n` while the block runs (None: leave as they are)."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build(provider, linear, r, dropout=0.0):
    """The layer of `provider` around a copy of `linear`, adapters live (B != 0), LoRA dropout `dropout`."""
    linear = copy.deepcopy(linear)
    if provider == "plain":
        return linear
    if provider == "ours":
        from hybrid_lora import LoRALinear

        layer = LoRALinear.from_module(linear, r_max=r, alpha=float(r), dropout=dropout)
        with torch.no_grad():
            layer.lora_b.normal_(0.0, 0.1)
        return layer.train()
    if provider in ("peft", "peft+accelerate"):
        from peft import LoraConfig, inject_adapter_in_model

        holder = torch.nn.Module()
        holder.proj = linear
        config = LoraConfig(r=r, lora_alpha=r, lora_dropout=dropout, target_modules=["proj"], bias="none")
        holder = inject_adapter_in_model(config, holder)
        if provider == "peft+accelerate":
            from hybrid_lora import accelerate

            accelerate(holder, strict=True)
        with torch.no_grad():
            holder.proj.lora_B["default"].weight.normal_(0.0, 0.1)
        return holder.proj.train()
    raise ValueError(f"provider {provider!r}: expected one of {PROVIDERS}")


def _timed_calls(layer, x, grad_y, calls, device):
    """Microseconds per call: wall time with CUDA synchronized at the end; on a CPU, this thread's CPU time.

    With one torch thread a CPU call runs wholly on the calling thread, and its
    CPU time leaves out the time other processes on a shared machine hold the core.
    Python's garbage collector is off while the calls run.
    """
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    collecting = gc.isenabled()
    gc.disable()  # as timeit does: a collection's cost follows the process's heap, not the layer
    try:
        start = clock()
        for _ in range(calls):
            layer(x).backward(grad_y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (clock() - start) / calls * 1e6
    finally:
        if collecting:
            gc.enable()


def measure(device, *, providers=PROVIDERS, M=8, K=64, N=64, r=16, dtype=torch.float32, calls=200, rounds=15,
            warmup=20, backend="auto", dropout=0.0):
    """{provider: [microseconds per call, one per round]} for fwd+bwd at [M, K] -> N, rank r, LoRA dropout `dropout`."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(K, N).to(device=device, dtype=dtype)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(M, N, device=device, dtype=dtype)
    with backend_path(backend):
        layers = {p: build(p, linear, r, dropout) for p in providers}
        for layer in layers.values():
            _timed_calls(layer, x, grad_y, warmup, device)  # autotuning, allocator, first-call paths
        times = {p: [] for p in providers}
        for i in range(rounds):
            order = providers[i % len(providers):] + providers[:i % len(providers)]
            for p in order:
                times[p].append(_timed_calls(layers[p], x, grad_y, calls, device))
    return times


def _quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(device, *, backends=("auto",), threads=None, M=8, K=64, N=64, r=16, dtype=torch.float32, calls=200,
        rounds=15, providers=PROVIDERS, dropouts=(0.0,)):
    """One row per dropout, backend path and provider; ``plain`` and ``peft`` do not depend on the path."""
    run_stamp = stamp(device)
    rows = []
    with cpu_threads(threads if device.type == "cpu" else None):
        n_threads = torch.get_num_threads() if device.type == "cpu" else ""
        for dropout, backend in ((p, b) for p in dropouts for b in backends):
            times = measure(device, providers=tuple(providers), M=M, K=K, N=N, r=r, dtype=dtype, calls=calls,
                            rounds=rounds, backend=backend, dropout=dropout)
            median = {p: statistics.median(t) for p, t in times.items()}
            for p, t in times.items():
                rows.append({
                    "provider": p, "backend": backend if p in FUSED else "", "call": "steady",
                    "M": M, "K": K, "N": N, "r": 0 if p == "plain" else r,
                    "dropout": 0.0 if p == "plain" else dropout, "dtype": str(dtype).removeprefix("torch."),
                    "us_per_call": round(median[p], 2), "us_p20": round(_quantile(t, 0.2), 2),
                    "us_p80": round(_quantile(t, 0.8), 2),
                    "over_peft": round(median[p] / median["peft"], 3) if "peft" in median else "",
                    "over_plain": round(median[p] / median["plain"], 3) if "plain" in median else "",
                    "calls": calls, "rounds": rounds, "threads": n_threads, **run_stamp,
                })
    return rows


def autotune_cost(device, *, first_M=1000, second_M=1010, K=64, N=64, r=16, dtype=torch.float32):
    """Rows for the first fwd+bwd calls of our layer at a token count in a new M bucket, then at another in
    the same bucket, and a steady call: what a batch of a new length costs while the kernels autotune.

    Only where the autotuner has several configs to time (CUDA); the interpreter has one.
    """
    from hybrid_lora.kernels.configs import m_bucket

    assert m_bucket(first_M) == m_bucket(second_M)
    run_stamp, rows = stamp(device), []
    torch.manual_seed(0)
    layer = build("ours", torch.nn.Linear(K, N).to(device=device, dtype=dtype), r)
    with backend_path("auto"):
        for call, M in (("first, new M bucket", first_M), ("first, same M bucket", second_M),
                        ("steady", second_M)):
            x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
            us = _timed_calls(layer, x, torch.randn(M, N, device=device, dtype=dtype), 1, device)
            rows.append({"provider": "ours", "backend": "auto", "call": call, "M": M, "K": K, "N": N, "r": r,
                         "dropout": 0.0, "dtype": str(dtype).removeprefix("torch."), "us_per_call": round(us, 2),
                         "us_p20": "", "us_p80": "", "over_peft": "", "over_plain": "", "calls": 1, "rounds": 1,
                         "threads": "",
                         **run_stamp})
    return rows


def markdown(rows) -> str:
    lines = ["| provider | backend | dropout | call | M | us per fwd+bwd call (p20-p80) | / peft | / plain |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        spread = f" ({row['us_p20']:.1f}-{row['us_p80']:.1f})" if row["us_p20"] != "" else ""
        lines.append(f"| {row['provider']} | {row['backend'] or '-'} | {row['dropout']} | {row['call']} | {row['M']} | "
                     f"{row['us_per_call']:.1f}{spread} | {row['over_peft']} | {row['over_plain']} |")
    first = rows[0]
    lines.append(f"\n{first['device']}, {first['threads'] or 'GPU'} threads, M={first['M']} K={first['K']} "
                 f"N={first['N']} r={rows[-1]['r']} {first['dtype']}, median of {first['rounds']} rounds of "
                 f"{first['calls']} calls; commit {first['commit']}, {first['date']}.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--backend", nargs="+", default=None, choices=("auto", "triton", "torch"),
                        help="backend paths of our layer (default: auto and torch on CUDA, torch on a CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=200, help="calls per round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per provider (default: %(default)s)")
    parser.add_argument("--dropout", nargs="+", type=float, default=[0.0, 0.1],
                        help="LoRA dropout of the LoRA layers, one table each (default: %(default)s)")
    parser.add_argument("--size", nargs=4, type=int, default=[8, 64, 64, 16], metavar=("M", "K", "N", "R"),
                        help="rows, in and out features, rank (default: %(default)s)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS,
                        help="layers to time (default: all)")
    parser.add_argument("--out", default=None,
                        help="CSV path (default: bench/results/host-overhead-<device>-<date>.csv)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    backends = args.backend or (["auto", "torch"] if device.type == "cuda" else ["torch"])
    for p in args.dropout:
        if not 0.0 <= p < 1.0:
            parser.error(f"--dropout {p}: expected a probability in [0, 1)")
    if min(args.size) < 1:
        parser.error(f"--size {' '.join(map(str, args.size))}: expected four positive integers")
    M, K, N, r = args.size
    rows = run(device, backends=backends, threads=args.threads, calls=args.calls, rounds=args.rounds, M=M, K=K, N=N,
               r=r, providers=args.providers, dropouts=args.dropout)
    if device.type == "cuda":
        rows += autotune_cost(device)
    print(markdown(rows))
    out = args.out or RESULTS_DIR / f"host-overhead-{slug(rows[0]['device'])}-{utc_now()[:10]}.csv"
    print(f"wrote {write_csv(out, rows, COLUMNS)}")


if __name__ == "__main__":
    main()
