"""Layer microbenchmarks: every provider, mode, shape and dtype, timed in one process.

For GPT-2's c_attn (K = 768, N = 2304, Conv1D's weight layout) at M tokens,
or any K and N: Llama-7B's attention and MLP projections are K = 4096 with
N = 4096 and 11008, in nn.Linear's weight layout (``--weight-layout out_in``,
peft with ``fan_in_fan_out=False``). ``peft+accelerate`` times peft's own layer after
``hybrid_lora.accelerate``, next to ``peft`` and ``fused``. Each row holds the
provider, mode, shape, weight layout, dtype, median/p20/p80 ms, TFLOP/s, GB/s (the provider's
traffic model, ``bench.providers.traffic``), the ratio to ``base`` (the frozen
addmm alone, measured in the same run), the adapter's share of the matrix work
the provider executes (``bench.providers.lora_share``: the fused kernels run it
at the width of r_max's rank tile, whatever the rank), the timer, device,
commit and date.

    python -m bench.layer_bench                       # the full grid on the default device
    python -m bench.layer_bench --M 8192 --dtypes bf16 --out bench/results/layer.csv
    python -m bench.layer_bench --M 8192 --r 16 64 --dtypes bf16 --K 4096 --N 11008 --weight-layout out_in
"""

import argparse
import math
import sys
import traceback

import torch

from .providers import (MODES, PROVIDERS, WEIGHT_LAYOUTS, LayerShape, LayerWeights, build_layer, bytes_moved,
                        flops, lora_share)
from .record import RESULTS_DIR, dtype_name, parse_dtype, pick_device, slug, stamp, utc_now, write_csv
from .timing import time_fn

COLUMNS = ["provider", "mode", "M", "K", "N", "r", "dtype", "dropout", "weight_layout", "median_ms", "p20_ms", "p80_ms",
           "tflops", "gbps", "ratio_to_base", "lora_share", "status", "timer", "device", "commit", "date"]

GPT2_K, GPT2_N = 768, 2304  # c_attn of GPT-2 small: in 768, out 3 x 768
LLAMA_7B_SHAPES = ((4096, 4096), (4096, 11008))  # (K, N) of Llama-7B's q/k/v/o and gate/up projections


def _row(provider, mode, shape, timing, base_ms, run_stamp, status="ok"):
    r = 0 if provider == "base" else shape.r  # r = 0 marks the layer without an adapter
    row = {"provider": provider, "mode": mode, "M": shape.M, "K": shape.K, "N": shape.N, "r": r,
           "dtype": dtype_name(shape.dtype), "dropout": shape.dropout_p, "weight_layout": shape.weight_layout,
           "status": status, "lora_share": round(lora_share(provider, shape, mode), 6), **run_stamp}
    if timing is None:
        row.update(median_ms=math.nan, p20_ms=math.nan, p80_ms=math.nan, tflops=math.nan, gbps=math.nan,
                   ratio_to_base=math.nan, timer="")
        return row
    seconds = timing.median_ms * 1e-3
    row.update(
        median_ms=round(timing.median_ms, 6), p20_ms=round(timing.p20_ms, 6), p80_ms=round(timing.p80_ms, 6),
        tflops=float(f"{flops(provider, shape, mode) / seconds / 1e12:.6g}"),
        gbps=float(f"{bytes_moved(provider, shape, mode) / seconds / 1e9:.6g}"),
        ratio_to_base=round(timing.median_ms / base_ms, 6) if base_ms else math.nan,
        timer=timing.timer,
    )
    return row


def time_layer(provider, shape, device, modes, *, weights, rounds=None, compile_backend="inductor"):
    """{mode: Timing} for one provider at one shape."""
    layer = build_layer(provider, shape, device, weights=weights, compile_backend=compile_backend)
    timings = {}
    with layer.context():
        for mode in modes:
            fn, grads = layer.step(mode)
            timings[mode] = time_fn(fn, device, grad_to_none=grads, rounds=rounds)
    return timings


def run(device, Ms, ranks, dtypes, *, providers=PROVIDERS, modes=MODES, K=GPT2_K, N=GPT2_N, dropout_p=0.0,
        rounds=None, compile_backend="inductor", weight_layout="in_out", log=print):
    """Time every (dtype, M, r, provider, mode); returns the rows. ``base`` is timed once per (dtype, M)."""
    for name in providers:
        if name not in PROVIDERS:
            raise ValueError(f"provider {name!r}: expected one of {PROVIDERS}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    run_stamp = stamp(device)
    r_max = max(64, *ranks)
    rows = []
    for dtype in dtypes:
        for M in Ms:
            base_shape = LayerShape(M, K, N, min(ranks), dtype, r_max, dropout_p, weight_layout)
            weights = LayerWeights.random(LayerShape(M, K, N, r_max, dtype, r_max, dropout_p, weight_layout), device)
            base = time_layer("base", base_shape, device, modes, weights=weights, rounds=rounds)
            for mode in modes:
                rows.append(_row("base", mode, base_shape, base[mode], base[mode].median_ms, run_stamp))
            for r in ranks:
                shape = LayerShape(M, K, N, r, dtype, r_max, dropout_p, weight_layout)
                weights.scale = 32.0 / r
                for provider in providers:
                    if provider == "base":
                        continue
                    try:
                        timings = time_layer(provider, shape, device, modes, weights=weights, rounds=rounds,
                                             compile_backend=compile_backend)
                    except Exception as error:  # one broken provider must not hide the others' results
                        traceback.print_exc(file=sys.stderr)
                        status = f"error: {type(error).__name__}: {error}".replace("\n", " ")[:300]
                        rows.extend(_row(provider, mode, shape, None, None, run_stamp, status) for mode in modes)
                        continue
                    for mode in modes:
                        rows.append(_row(provider, mode, shape, timings[mode], base[mode].median_ms, run_stamp))
                    log(f"{dtype_name(dtype)} M={M} K={K} N={N} r={r} {provider:9s} " + "  ".join(
                        f"{m} {timings[m].median_ms:.4f} ms ({timings[m].median_ms / base[m].median_ms:.2f}x)"
                        for m in modes))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--M", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--r", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"])
    parser.add_argument("--K", type=int, default=GPT2_K)
    parser.add_argument("--N", type=int, default=GPT2_N)
    parser.add_argument("--weight-layout", choices=WEIGHT_LAYOUTS, default="in_out",
                        help="W stored [K, N] as Conv1D (in_out) or [N, K] as nn.Linear (out_in, read transposed)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout probability")
    parser.add_argument("--rounds", type=int, default=None, help="CPU only: timed calls per measurement")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of 'compiled'")
    parser.add_argument("--out", default=None, help="CSV path (default: bench/results/layer-<device>-<date>.csv)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    rows = run(device, args.M, args.r, [parse_dtype(d) for d in args.dtypes], providers=args.providers,
               modes=args.modes, K=args.K, N=args.N, dropout_p=args.dropout, rounds=args.rounds,
               compile_backend=args.compile_backend, weight_layout=args.weight_layout)
    out = args.out or RESULTS_DIR / f"layer-{slug(rows[0]['device'])}-{utc_now()[:10]}.csv"
    print(f"wrote {write_csv(out, rows, COLUMNS)}")


if __name__ == "__main__":
    main()
