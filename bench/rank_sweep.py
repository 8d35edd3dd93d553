"""Rank sweep: the fused layer's time at every rank 1..64 at a fixed M, and the kernel variants compiled.

The rank is a runtime argument read on the device; kernels are compiled once
per bucket of the adapter's width (``rank_block``: 16, 32, 64), here 64 at
every rank. Two counts per rank:

* ``compiled_variants``: kernels the JIT compiled since the sweep began, up to
  and including this rank (its post-compile hook; CUDA only: the CPU
  interpreter compiles nothing);
* ``predicted_variants``: distinct JIT specializations of every launch and
  autotune config up to this rank (``bench.launches``), which needs no GPU.

A new variant at any rank of one adapter is a recompile the design forbids.

    python -m bench.rank_sweep --M 8192 --dtype bf16
"""

import argparse
import json
import math

from .launches import interpreter_enabled, run_without_interpreter, variant_counts
from .providers import LayerShape, LayerWeights, build_layer, flops
from .record import RESULTS_DIR, dtype_name, parse_dtype, pick_device, slug, stamp, utc_now, write_csv
from .timing import time_fn

COLUMNS = ["r", "block_r", "mode", "M", "K", "N", "dtype", "dropout", "median_ms", "p20_ms", "p80_ms", "tflops",
           "compiled_variants", "predicted_variants", "note", "timer", "device", "commit", "date"]
NO_GPU_NOTE = "compile counting needs a GPU (the CPU interpreter compiles nothing)"


def predicted_variant_totals(M, K, N, ranks, dtype, dropout_p, device) -> dict:
    """{rank: distinct compiled variants over all kernels after the sweep reaches rank}, from JIT keys."""
    if interpreter_enabled():
        args = ["--M", M, "--K", K, "--N", N, "--dtype", dtype_name(dtype), "--dropout", dropout_p,
                "--ranks", *ranks]
        per_kernel = json.loads(run_without_interpreter("bench.launches", args).stdout)
        per_kernel = {name: {int(r): n for r, n in counts.items()} for name, counts in per_kernel.items()}
    else:
        target = None
        if device.type == "cuda":
            from triton.runtime import driver

            target = driver.active.get_current_target()
        # Captured on the device itself: some launch arguments depend on it (the SM count).
        per_kernel = variant_counts(M, K, N, ranks, dtype, dropout_p, target, device=device)
    # The mask utility is not launched by the layer; leave it out of the totals.
    per_kernel.pop("_keep_mask_kernel", None)
    return {r: sum(counts[r] for counts in per_kernel.values()) for r in ranks}


def run(device, M, ranks, dtype, *, K=768, N=2304, modes=("fwd+bwd",), dropout_p=0.0, rounds=None, rep_ms=100,
        log=print):
    from hybrid_lora.kernels.configs import rank_block

    from .launches import counting_compiles

    run_stamp = stamp(device)
    r_max = max(64, *ranks)
    predicted = predicted_variant_totals(M, K, N, list(ranks), dtype, dropout_p, device)
    weights = LayerWeights.random(LayerShape(M, K, N, r_max, dtype, r_max, dropout_p), device)
    rows = []
    with counting_compiles() as compiles:
        for r in ranks:
            shape = LayerShape(M, K, N, r, dtype, r_max, dropout_p)
            weights.scale = 32.0 / r
            layer = build_layer("fused", shape, device, weights=weights)
            for mode in modes:
                with layer.context():
                    fn, grads = layer.step(mode)
                    timing = time_fn(fn, device, grad_to_none=grads, rounds=rounds, warmup_ms=min(25, rep_ms),
                                     rep_ms=rep_ms)
                compiled = compiles.total() if device.type == "cuda" else math.nan
                rows.append({
                    "r": r, "block_r": rank_block(r_max), "mode": mode, "M": M, "K": K, "N": N,
                    "dtype": dtype_name(dtype), "dropout": dropout_p, "median_ms": round(timing.median_ms, 6),
                    "p20_ms": round(timing.p20_ms, 6), "p80_ms": round(timing.p80_ms, 6),
                    "tflops": float(f"{flops('fused', shape, mode) / (timing.median_ms * 1e-3) / 1e12:.6g}"),
                    "compiled_variants": compiled, "predicted_variants": predicted[r],
                    "note": "" if device.type == "cuda" else NO_GPU_NOTE, "timer": timing.timer, **run_stamp,
                })
                log(f"r={r:3d} {mode} {timing.median_ms:.4f} ms  compiled {compiled}  predicted {predicted[r]}")
    return rows


def recompiles_within_buckets(rows, column) -> list:
    """Ranks at which `column` grew although the previous rank was in the same bucket."""
    found, previous = [], None
    for row in sorted(rows, key=lambda row: int(row["r"])):
        value = float(row[column])
        if previous is not None and int(previous["block_r"]) == int(row["block_r"]) \
                and not math.isnan(value) and value > float(previous[column]):
            found.append(int(row["r"]))
        previous = row
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--M", type=int, default=8192)
    parser.add_argument("--K", type=int, default=768)
    parser.add_argument("--N", type=int, default=2304)
    parser.add_argument("--ranks", type=int, nargs="+", default=list(range(1, 65)))
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--modes", nargs="+", default=["fwd+bwd"])
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=None, help="CPU only: timed calls per rank")
    parser.add_argument("--out", default=None, help="CSV path (default: bench/results/rank-sweep-<device>-<date>.csv)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    rows = run(device, args.M, args.ranks, parse_dtype(args.dtype), K=args.K, N=args.N, modes=args.modes,
               dropout_p=args.dropout, rounds=args.rounds)
    for column in ("compiled_variants", "predicted_variants"):
        bad = recompiles_within_buckets([row for row in rows if row["mode"] == args.modes[0]], column)
        print(f"{column}: " + (f"new variants inside a rank bucket at r = {bad}" if bad else
                               "no new variant inside a rank bucket"))
    out = args.out or RESULTS_DIR / f"rank-sweep-{slug(rows[0]['device'])}-{utc_now()[:10]}.csv"
    print(f"wrote {write_csv(out, rows, COLUMNS)}")


if __name__ == "__main__":
    main()
