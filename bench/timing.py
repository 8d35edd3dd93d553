"""One timer for every benchmark: ``triton.testing.do_bench`` on CUDA, ``time.perf_counter`` on the CPU.

Both return the median and the 20th/80th percentiles in milliseconds. On CUDA,
do_bench warms up, times each call with CUDA events and flushes the L2 cache
before every call, so inputs are read from DRAM as in training. CPU timings
are labelled as such by their timer name and are not comparable with GPU ones.
"""

import time
from dataclasses import dataclass

import torch

QUANTILES = (0.5, 0.2, 0.8)
CUDA_TIMER = "cuda events (triton do_bench, L2 flushed)"
CPU_TIMER = "CPU timing (perf_counter)"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str


def _quantiles(times_ms):
    values = torch.tensor(times_ms, dtype=torch.float64)
    return [float(values.quantile(q)) for q in QUANTILES]


def time_fn(fn, device: torch.device, *, grad_to_none=None, warmup_ms=25, rep_ms=100, rounds=None) -> Timing:
    """Time `fn()` on `device`.

    grad_to_none: tensors whose .grad is cleared before each call, so that a
    backward does not time gradient accumulation. On the CPU, `rounds` fixes
    the number of timed calls and nothing else runs; without it, one warm-up
    call, then as many calls as fit in `rep_ms`.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                    quantiles=list(QUANTILES))
        return Timing(median, p20, p80, CUDA_TIMER)

    def clear_grads():
        for t in grad_to_none or ():
            t.grad = None

    if rounds is None:
        clear_grads()
        start = time.perf_counter()
        fn()  # warm-up: the first call may compile
        first_ms = (time.perf_counter() - start) * 1e3
        rounds = max(1, min(1000, int(rep_ms / max(first_ms, 1e-3))))
    times = []
    for _ in range(rounds):
        clear_grads()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(*_quantiles(times), CPU_TIMER)
