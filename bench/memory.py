"""Activation memory per layer call: the bytes each provider saves for its backward.

Measured with ``torch.autograd.graph.saved_tensors_hooks`` around one forward:
every tensor that autograd saves is recorded by its storage, so a tensor saved
twice (or two views of one storage) counts once, and storages of the layer's
parameters (W, b, A, B) are left out. The input X is counted when it is saved.
The bound to meet is ``X + S`` (the input and the [M, r] down-projection).
On CUDA the peak memory of a forward and backward is reported as well.

    python -m bench.memory --M 8192 --r 64 --dtypes bf16
"""

import argparse
import math
from dataclasses import dataclass

import torch

from .providers import PROVIDERS, LayerShape, LayerWeights, build_layer
from .record import RESULTS_DIR, dtype_name, parse_dtype, pick_device, slug, stamp, utc_now, write_csv

COLUMNS = ["provider", "M", "K", "N", "r", "dtype", "dropout", "saved_bytes", "x_plus_s_bytes",
           "saved_over_x_plus_s", "saved_tensors", "peak_fwd_bwd_bytes", "device", "commit", "date"]

DEFAULT_DROPOUT = 0.05  # the original experiment's LoRA dropout


@dataclass
class Saved:
    bytes: int
    tensors: list  # "dtype[shape]" of each distinct storage kept for the backward


def saved_activations(layer) -> Saved:
    """Bytes autograd keeps for the backward of one `layer.forward()`, parameters excluded."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in parameter_storages and key not in kept:
            kept[key] = (storage.nbytes(), f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}")
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer.forward()
    del y
    return Saved(sum(n for n, _ in kept.values()), [d for _, d in kept.values()])


def x_plus_s_bytes(shape: LayerShape) -> int:
    """The fused layer's bound: X [M, K] and S [M, r_max] in the compute dtype, and its three 0-d step values.

    S is as wide as the adapter, not the rank (zeros past it): no shape of the
    op may depend on the rank, so that one compiled graph serves every rank.
    The rank (int64), scale (fp64) and dropout seed (int64) are kept as 0-d tensors.
    """
    element = torch.empty((), dtype=shape.dtype).element_size()
    return shape.M * (shape.K + shape.r_max) * element + 3 * 8


def peak_fwd_bwd_bytes(layer, device) -> float:
    """Peak CUDA memory above the starting point during one forward and backward (NaN off CUDA)."""
    if device.type != "cuda":
        return math.nan
    layer.forward().backward(layer.grad_y)  # warm-up: compiles, allocates gradients
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    layer.forward().backward(layer.grad_y)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def run(device, M, K, N, r, dtypes, *, providers=PROVIDERS, dropout_p=DEFAULT_DROPOUT,
        compile_backend="inductor"):
    run_stamp = stamp(device)
    rows = []
    for dtype in dtypes:
        shape = LayerShape(M, K, N, r, dtype, r, dropout_p)  # an adapter of width r: S is saved at its width
        weights = LayerWeights.random(shape, device)
        for provider in providers:
            layer = build_layer(provider, shape, device, weights=weights, compile_backend=compile_backend)
            with layer.context():
                saved = saved_activations(layer)
                peak = peak_fwd_bwd_bytes(layer, device)
            bound = x_plus_s_bytes(shape)
            rows.append({
                "provider": provider, "M": M, "K": K, "N": N, "r": 0 if provider == "base" else r,
                "dtype": dtype_name(dtype), "dropout": dropout_p, "saved_bytes": saved.bytes,
                "x_plus_s_bytes": bound, "saved_over_x_plus_s": round(saved.bytes / bound, 4),
                "saved_tensors": " + ".join(saved.tensors) or "none",
                "peak_fwd_bwd_bytes": peak, **run_stamp,
            })
            del layer
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--M", type=int, default=8192)
    parser.add_argument("--K", type=int, default=768)
    parser.add_argument("--N", type=int, default=2304)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["bf16"])
    parser.add_argument("--dropout", type=float, default=DEFAULT_DROPOUT)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--out", default=None, help="CSV path (default: bench/results/memory-<device>-<date>.csv)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    rows = run(device, args.M, args.K, args.N, args.r, [parse_dtype(d) for d in args.dtypes],
               providers=args.providers, dropout_p=args.dropout, compile_backend=args.compile_backend)
    for row in rows:
        print(f"{row['provider']:9s} saved {row['saved_bytes']:>12,d} B = {row['saved_over_x_plus_s']:.3f} (X + S)"
              f"  [{row['saved_tensors']}]")
    out = args.out or RESULTS_DIR / f"memory-{slug(rows[0]['device'])}-{utc_now()[:10]}.csv"
    print(f"wrote {write_csv(out, rows, COLUMNS)}")


if __name__ == "__main__":
    main()
