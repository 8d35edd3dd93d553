"""Activation memory: the bytes each provider saves for its backward per layer call, and what
activation checkpointing saves in a training step.

Per layer call, measured with ``torch.autograd.graph.saved_tensors_hooks`` around one forward:
every tensor that autograd saves is recorded by its storage, so a tensor saved
twice (or two views of one storage) counts once, and storages of the layer's
parameters (W, b, A, B) are left out. The input X is counted when it is saved.
The bound to meet is ``X + S`` (the input and the [M, r] down-projection).
On CUDA the peak memory of a forward and backward is reported as well.

Per training step (``checkpointing_run``): GPT-2 (random init, the end-to-end
bench's model and adapters, LoRA dropout on) runs one forward and backward
without and with activation checkpointing (``models.enable_activation_checkpointing``);
a row gives the peak CUDA memory above the model's own of each (NaN off CUDA),
their ratio, and the largest difference between the two runs' adapter
gradients at the same seed (0 when the recomputed forward drew the same masks).

    python -m bench.memory --M 8192 --r 64 --dtypes bf16
    python -m bench.memory --checkpointing --seq-lens 128 1024
"""

import argparse
import math
from dataclasses import dataclass

import torch

from .providers import PROVIDERS, LayerShape, LayerWeights, build_layer
from .record import RESULTS_DIR, dtype_name, parse_dtype, pick_device, slug, stamp, utc_now, write_csv

COLUMNS = ["provider", "M", "K", "N", "r", "dtype", "dropout", "saved_bytes", "x_plus_s_bytes",
           "saved_over_x_plus_s", "saved_tensors", "peak_fwd_bwd_bytes", "device", "commit", "date"]

CHECKPOINTING_COLUMNS = ["model", "seq_len", "batch", "r", "dtype", "dropout", "checkpointing", "peak_fwd_bwd_bytes",
                         "peak_over_plain", "max_grad_diff", "device", "commit", "date"]

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
    """The fused layer's bound: X [M, K] and S [M, r_max] in the compute dtype, and its four 0-d step values.

    S is as wide as the adapter, not the rank (zeros past it): no shape of the
    op may depend on the rank, so that one compiled graph serves every rank.
    The rank (int64), scale (fp64), dropout seed (int64) and dropout row offset
    (int64) are kept as 0-d tensors.
    """
    element = torch.empty((), dtype=shape.dtype).element_size()
    return shape.M * (shape.K + shape.r_max) * element + 4 * 8


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


def _step_peak_and_grads(model, batch, autocast_dtype, device, seed):
    """(peak bytes above the start, adapter gradients) of one forward and backward at torch seed `seed`."""
    from contextlib import nullcontext

    from hybrid_lora import lora_layers

    def step():
        context = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        torch.manual_seed(seed)
        with context:
            loss = model(**batch, use_cache=False).loss
        loss.backward()

    step()  # warm-up: autotunes the kernels at this shape, allocates the gradients
    model.zero_grad(set_to_none=False)
    peak = math.nan
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start
    grads = [p.grad.detach().float().clone() for layer in lora_layers(model) for p in (layer.lora_a, layer.lora_b)]
    model.zero_grad(set_to_none=False)
    return peak, grads


def checkpointing_run(device, config=None):
    """Rows of one training step's peak memory without and with activation checkpointing, per sequence length.

    config: a ``bench.e2e.E2EConfig`` (model, adapters, batch, sequence lengths; default: GPT-2 small at
    seq 128 and 1024, batch 8, r = 64, LoRA dropout 0.05). bf16 autocast on CUDA, fp32 elsewhere.
    """
    from hybrid_lora.io.models import enable_activation_checkpointing

    from .e2e import E2EConfig, model_name, random_batches, random_gpt2, with_fused

    config = config or E2EConfig()
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    run_stamp = stamp(device)
    rows = []
    for seq_len in config.seq_lens:
        model = with_fused(random_gpt2(config, device), config).train()
        (batch,) = random_batches(config, seq_len, 1, model.config.vocab_size, device)
        plain_peak, plain_grads = _step_peak_and_grads(model, batch, autocast_dtype, device, config.seed)
        enable_activation_checkpointing(model)
        peak, grads = _step_peak_and_grads(model, batch, autocast_dtype, device, config.seed)
        diff = max(float((g - p).abs().max()) for g, p in zip(grads, plain_grads))
        for checkpointing, bytes_ in ((False, plain_peak), (True, peak)):
            rows.append({"model": model_name(config), "seq_len": seq_len, "batch": config.batch_size, "r": config.r,
                         "dtype": "bf16" if autocast_dtype else "fp32", "dropout": config.dropout,
                         "checkpointing": checkpointing, "peak_fwd_bwd_bytes": bytes_,
                         "peak_over_plain": round(bytes_ / plain_peak, 4) if plain_peak == plain_peak else math.nan,
                         "max_grad_diff": 0.0 if not checkpointing else diff, **run_stamp})
        del model, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
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
    parser.add_argument("--checkpointing", action="store_true",
                        help="measure a GPT-2 training step without and with activation checkpointing instead")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 1024], help="of --checkpointing")
    parser.add_argument("--out", default=None, help="CSV path (default: bench/results/memory-<device>-<date>.csv)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if args.checkpointing:
        from .e2e import E2EConfig

        rows = checkpointing_run(device, E2EConfig(seq_lens=tuple(args.seq_lens), r=args.r, dropout=args.dropout))
        for row in rows:
            print(f"seq {row['seq_len']} checkpointing {'on ' if row['checkpointing'] else 'off'} peak "
                  f"{row['peak_fwd_bwd_bytes']:,.0f} B = {row['peak_over_plain']} x off, max |grad diff| "
                  f"{row['max_grad_diff']:.3g}")
        out = args.out or RESULTS_DIR / f"checkpointing-{slug(rows[0]['device'])}-{utc_now()[:10]}.csv"
        print(f"wrote {write_csv(out, rows, CHECKPOINTING_COLUMNS)}")
        return
    rows = run(device, args.M, args.K, args.N, args.r, [parse_dtype(d) for d in args.dtypes],
               providers=args.providers, dropout_p=args.dropout, compile_backend=args.compile_backend)
    for row in rows:
        print(f"{row['provider']:9s} saved {row['saved_bytes']:>12,d} B = {row['saved_over_x_plus_s']:.3f} (X + S)"
              f"  [{row['saved_tensors']}]")
    out = args.out or RESULTS_DIR / f"memory-{slug(rows[0]['device'])}-{utc_now()[:10]}.csv"
    print(f"wrote {write_csv(out, rows, COLUMNS)}")


if __name__ == "__main__":
    main()
