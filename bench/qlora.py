"""QLoRA benchmarks: a LoRA layer over a bitsandbytes 4-bit (NF4) frozen weight, three ways, and a training step.

    y = x W4^T + b + s * dropout(x) A[:, :r] B[:r, :]      x [M, K], W4 the 4-bit [N, K] weight

| provider        | what it is                                                                      |
|-----------------|---------------------------------------------------------------------------------|
| `peft-qlora`    | peft's LoRA over ``bnb.nn.Linear4bit`` (QLoRA): bitsandbytes' 4-bit matmul (it   |
|                 | dequantizes W, then a dense GEMM), then the adapter as two nn.Linear            |
| `dequant-addmm` | the design of unsloth's ``fast_lora`` (our own code): dequantize the whole W    |
|                 | into a buffer, one GEMM, ``addmm_`` for s D(X) A B; the backward dequantizes    |
|                 | W again for dX                                                                  |
| `fused-4bit`    | ``hybrid_lora.fused_lora_4bit``: the 4-bit codes decoded tile by tile inside    |
|                 | the forward and dX GEMMs; no full-size W is written                             |

``layer`` times fwd, bwd and fwd+bwd of each provider (median/p20/p80 ms and
the peak CUDA memory of a fwd+bwd) at Llama-3-8B's projections (4096 -> 4096,
4096 -> 14336, 14336 -> 4096), M = 512, 2048, 8192, r = 16, dropout 0 and
0.05, bf16 compute, NF4 with double quantization (the QLoRA recipe).
``step`` times a training step (forward, backward, AdamW on the adapters) of a
stack of Llama-8B-width MLP blocks (gate, up, down, SiLU), each projection a
QLoRA layer, in tokens/s with its peak memory.

    python -m bench.qlora --out bench/results/qlora.csv                 # on a GPU (bitsandbytes needed)
    python -m bench.qlora --device cpu --tiny --out /tmp/qlora.csv      # toy sizes on a CPU
"""

import argparse
import contextlib
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .record import pick_device, stamp, write_csv
from .timing import time_fn

PROVIDERS = ("peft-qlora", "dequant-addmm", "fused-4bit")
MODES = ("fwd", "bwd", "fwd+bwd")
LLAMA_8B_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N): q/o, gate/up, down
LLAMA_8B_WIDTH = (4096, 14336)  # hidden, intermediate
COLUMNS = ["device", "commit", "date", "bench", "provider", "mode", "M", "K", "N", "r", "dropout_p", "dtype", "quant",
           "layers", "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "peak_mib", "timer"]


@dataclass(frozen=True)
class QLoRAConfig:
    shapes: tuple = LLAMA_8B_SHAPES
    rows: tuple = (512, 2048, 8192)
    rank: int = 16
    dropouts: tuple = (0.0, 0.05)
    dtype: torch.dtype = torch.bfloat16
    quant_type: str = "nf4"
    double_quant: bool = True
    step_layers: int = 2  # MLP blocks in the training step
    step_width: tuple = LLAMA_8B_WIDTH
    step_rows: int = 4096
    rounds: int = None  # CPU only: timed calls per measurement


def tiny_config() -> QLoRAConfig:
    """Toy sizes for a CPU (the fused provider runs the Triton interpreter): every row, nothing meaningful."""
    return QLoRAConfig(shapes=((32, 48),), rows=(16,), rank=4, dropouts=(0.05,), dtype=torch.float32, step_layers=1,
                       step_width=(32, 48), step_rows=16, rounds=1)


def linear_4bit(K, N, config, device, seed=0):
    """A bnb ``Linear4bit`` (K -> N, bias) holding a random weight, quantized on its way to `device`."""
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=config.dtype, quant_type=config.quant_type,
                              compress_statistics=config.double_quant)
    with torch.no_grad():
        layer.weight.data.copy_(torch.randn(N, K, generator=g) / K ** 0.5)
        layer.bias.data.copy_(torch.randn(N, generator=g) * 0.01)
    return layer.to(device)  # Params4bit quantizes when it moves


class PeftQLoRA(nn.Module):
    """peft's LoRA over a ``Linear4bit``: what ``get_peft_model`` builds for a model loaded in 4 bits."""

    is_loaded_in_4bit = True  # what peft reads to pick its bitsandbytes 4-bit LoRA layer

    def __init__(self, base, rank, dropout_p):
        super().__init__()
        import peft

        self.proj = base
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout_p, target_modules=["proj"],
                                 init_lora_weights=False)
        peft.inject_adapter_in_model(config, self)

    def adapters(self):
        return [p for name, p in self.named_parameters() if "lora_" in name]

    def forward(self, x):
        return self.proj(x)


class _DequantAddmm(torch.autograd.Function):
    """Y = addmm(b, X, W^T) with W dequantized to a full-size buffer, then Y += s D(X) A B (unsloth's design)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropout_p):
        from bitsandbytes.functional import dequantize_4bit

        dense = dequantize_4bit(weight.data, weight.quant_state).to(x.dtype)  # [N, K], written in full
        keep = None
        if dropout_p > 0.0:
            keep = torch.rand_like(x) >= dropout_p
            xd = x * keep / (1.0 - dropout_p)
        else:
            xd = x
        down = xd @ lora_a.to(x.dtype)
        y = torch.addmm(bias, x, dense.t())
        y.addmm_(down, lora_b.to(x.dtype), alpha=scale)
        ctx.save_for_backward(xd, down, lora_a, lora_b, keep)
        ctx.weight, ctx.scale, ctx.dropout_p = weight, scale, dropout_p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        from bitsandbytes.functional import dequantize_4bit

        xd, down, lora_a, lora_b, keep = ctx.saved_tensors
        dense = dequantize_4bit(ctx.weight.data, ctx.weight.quant_state).to(grad_y.dtype)  # again, for dX
        grad_down = (grad_y @ lora_b.to(grad_y.dtype).t()) * ctx.scale
        grad_x = grad_y @ dense
        lora_part = grad_down @ lora_a.to(grad_y.dtype).t()
        if keep is not None:
            lora_part = lora_part * keep / (1.0 - ctx.dropout_p)
        grad_x.add_(lora_part)
        grad_a = (xd.t() @ grad_down).to(lora_a.dtype)
        grad_b = (down.t() @ grad_y).mul_(ctx.scale).to(lora_b.dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


class QLoRALayer(nn.Module):
    """One 4-bit base with fp32 adapters, run by the `dequant-addmm` or the `fused-4bit` provider."""

    def __init__(self, base, rank, dropout_p, provider, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed + 1)
        device = base.weight.device
        self.base, self.provider, self.dropout_p = base, provider, dropout_p
        self.scale = 2.0  # lora_alpha = 2 r, as PeftQLoRA
        self.lora_a = nn.Parameter((torch.randn(base.in_features, rank, generator=g) / base.in_features ** 0.5)
                                   .to(device))
        self.lora_b = nn.Parameter((torch.randn(rank, base.out_features, generator=g) * 0.01).to(device))

    def adapters(self):
        return [self.lora_a, self.lora_b]

    def forward(self, x):
        weight, bias = self.base.weight, self.base.bias.to(x.dtype)
        p = self.dropout_p if self.training else 0.0
        if self.provider == "dequant-addmm":
            return _DequantAddmm.apply(x, weight, bias, self.lora_a, self.lora_b, self.scale, p)
        from hybrid_lora.nn.quantized import quant_of
        from hybrid_lora.ops.fused_lora_4bit import fused_lora_4bit

        return fused_lora_4bit(x, quant_of(weight), bias, self.lora_a, self.lora_b, rank=self.lora_a.shape[1],
                               scale=self.scale, dropout_p=p)


def make_layer(provider, K, N, config, dropout_p, device, seed=0):
    base = linear_4bit(K, N, config, device, seed)
    if provider == "peft-qlora":
        return PeftQLoRA(base, config.rank, dropout_p)
    return QLoRALayer(base, config.rank, dropout_p, provider, seed)


def _peak(device, fn):
    """Peak CUDA memory (MiB) over one call of fn, above what was allocated before; None on a CPU."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def layer_rows(config, device, providers=PROVIDERS):
    rows = []
    for K, N in config.shapes:
        for M in config.rows:
            for dropout_p in config.dropouts:
                x = torch.randn(M, K, device=device, dtype=config.dtype, requires_grad=True)
                grad = torch.randn(M, N, device=device, dtype=config.dtype)
                for provider in providers:
                    layer = make_layer(provider, K, N, config, dropout_p, device).train()
                    params = [x, *layer.adapters()]

                    def fwd():
                        return layer(x)

                    def both():
                        layer(x).backward(grad)

                    out = fwd()
                    timings = {"fwd": time_fn(fwd, device, rounds=config.rounds),
                               "bwd": time_fn(lambda: out.backward(grad, retain_graph=True), device,
                                              grad_to_none=params, rounds=config.rounds),
                               "fwd+bwd": time_fn(both, device, grad_to_none=params, rounds=config.rounds)}
                    del out
                    peak = _peak(device, both)
                    for mode, timing in timings.items():
                        rows.append(dict(bench="qlora_layer", provider=provider, mode=mode, M=M, K=K, N=N,
                                         r=config.rank, dropout_p=dropout_p, dtype=str(config.dtype).split(".")[1],
                                         quant=f"{config.quant_type}{'+dq' if config.double_quant else ''}",
                                         median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                                         peak_mib=peak if mode == "fwd+bwd" else None, timer=timing.timer))
                    del layer
    return rows


class MLPStack(nn.Module):
    """`layers` Llama MLP blocks (x + down(silu(gate(x)) * up(x))), every projection a QLoRA layer of `provider`."""

    def __init__(self, provider, config, dropout_p, device):
        super().__init__()
        hidden, inner = config.step_width
        self.blocks = nn.ModuleList()
        for i in range(config.step_layers):
            self.blocks.append(nn.ModuleDict({
                name: make_layer(provider, k, n, config, dropout_p, device, seed=3 * i + j)
                for j, (name, k, n) in enumerate((("gate", hidden, inner), ("up", hidden, inner),
                                                  ("down", inner, hidden)))}))

    def adapters(self):
        return [p for block in self.blocks for layer in block.values() for p in layer.adapters()]

    def forward(self, x):
        for block in self.blocks:
            x = x + block["down"](torch.nn.functional.silu(block["gate"](x)) * block["up"](x))
        return x


def step_rows(config, device, providers=PROVIDERS, dropout_p=0.05):
    rows = []
    hidden = config.step_width[0]
    x = torch.randn(config.step_rows, hidden, device=device, dtype=config.dtype)
    for provider in providers:
        model = MLPStack(provider, config, dropout_p, device).train()
        optimizer = torch.optim.AdamW(model.adapters(), lr=1e-4)

        def step():
            model(x).float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # AdamW's state exists before the peak is read
        peak = _peak(device, step)
        timing = time_fn(step, device, rounds=config.rounds)
        rows.append(dict(bench="qlora_step", provider=provider, mode="train step", M=config.step_rows, K=hidden,
                         N=config.step_width[1], r=config.rank, dropout_p=dropout_p,
                         dtype=str(config.dtype).split(".")[1], layers=config.step_layers,
                         quant=f"{config.quant_type}{'+dq' if config.double_quant else ''}",
                         median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                         tokens_per_s=config.step_rows / (timing.median_ms / 1e3), peak_mib=peak, timer=timing.timer))
        del model, optimizer
    return rows


def check(config, device, M=None):
    """Refuse to time a wrong kernel: fused-4bit's output and gradients at the first shape (M rows, default one
    more than the largest M timed, so a partial row tile; dropout 0)
    against the fp32 reference over bitsandbytes' dequantized weight, at the compute dtype's tolerance."""
    from bitsandbytes.functional import dequantize_4bit

    from hybrid_lora.ops import reference

    K, N = config.shapes[0]
    M = M or max(config.rows) + 1
    layer = make_layer("fused-4bit", K, N, config, 0.0, device)
    x = torch.randn(M, K, device=device, dtype=config.dtype, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    got = (y, *torch.autograd.grad(y, (x, layer.lora_a, layer.lora_b), grad))
    weight = dequantize_4bit(layer.base.weight.data, layer.base.weight.quant_state).to(config.dtype).float().t()
    args = [t.detach().float() for t in (x, weight, layer.base.bias.to(config.dtype), layer.lora_a, layer.lora_b)]
    want_y, _ = reference.lora_forward(*args, config.rank, layer.scale)
    want = (want_y, *reference.lora_backward(grad.float(), args[0], args[1], args[3], args[4], config.rank,
                                             layer.scale))
    tol = 2e-2 if config.dtype in (torch.bfloat16, torch.float16) else 1e-4
    for name, g, w in zip(("y", "dX", "dA", "dB"), got, want):
        err, size = (g.float() - w).abs().max().item(), w.abs().max().item()
        if not err <= tol * max(1.0, size):
            raise AssertionError(f"bench.qlora: fused-4bit {name} differs from the reference by {err:.3e} "
                                 f"(max |ref| {size:.3e}); nothing timed")


def run(config, device):
    """Every row of both benchmarks, stamped with the device, commit and date (after ``check``)."""
    with (torch.autocast(device.type, enabled=False) if device.type == "cuda" else contextlib.nullcontext()):
        check(config, device)
        rows = layer_rows(config, device) + step_rows(config, device)
    stamped = stamp(device)
    return [{column: "" for column in COLUMNS} | stamped | {k: ("" if v is None else v) for k, v in row.items()}
            for row in rows]


def markdown(rows):
    """The layer table (fwd+bwd) and the step table, with fused-4bit's speed-up over each other provider."""
    def ms(provider, **where):
        found = [r["median_ms"] for r in rows if r["provider"] == provider
                 and all(r[k] == v for k, v in where.items())]
        return found[0] if found else None

    def ratio(base, ours):
        return f"{base / ours:.2f}x" if base and ours else "n/a"

    device = rows[0]["device"] if rows else "?"
    lines = [f"QLoRA on {device} ({rows[0]['timer'] if rows else ''}), r = {rows[0]['r'] if rows else ''}, "
             f"{rows[0]['quant'] if rows else ''}", "",
             "| M | K | N | dropout | " + " | ".join(f"{p} ms" for p in PROVIDERS)
             + " | fused vs peft | fused vs dequant | peak MiB (peft / dequant / fused) |",
             "|" + "---|" * (4 + len(PROVIDERS) + 3)]
    keys = sorted({(r["M"], r["K"], r["N"], r["dropout_p"]) for r in rows if r["bench"] == "qlora_layer"})
    for M, K, N, p in keys:
        where = dict(bench="qlora_layer", mode="fwd+bwd", M=M, K=K, N=N, dropout_p=p)
        times = [ms(provider, **where) for provider in PROVIDERS]
        peaks = [next((r["peak_mib"] for r in rows if r["provider"] == provider
                       and all(r[k] == v for k, v in where.items())), "") for provider in PROVIDERS]
        lines.append(f"| {M} | {K} | {N} | {p} | " + " | ".join(f"{t:.3f}" if t else "n/a" for t in times)
                     + f" | {ratio(times[0], times[2])} | {ratio(times[1], times[2])} | "
                     + " / ".join(f"{v:.0f}" if v != "" else "-" for v in peaks) + " |")
    steps = [r for r in rows if r["bench"] == "qlora_step"]
    if steps:
        fused = ms("fused-4bit", bench="qlora_step")
        lines += ["", "| training step | layers | tokens | ms | tokens/s | peak MiB | fused speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for r in steps:
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] != "" else "-"
            lines.append(f"| {r['provider']} | {r['layers']} | {r['M']} | {r['median_ms']:.2f} | "
                         f"{r['tokens_per_s']:.0f} | {peak} | {ratio(r['median_ms'], fused)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.qlora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a CPU check of the harness)")
    parser.add_argument("--out", required=True, help="CSV file for the rows")
    args = parser.parse_args(argv)
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as error:
        print(f"bench.qlora: skipped, {error.name} is not installed (pip install -e \".[qlora]\" and peft)")
        return 0
    device = pick_device(args.device)
    config = tiny_config() if args.tiny else QLoRAConfig()
    rows = run(config, device)
    write_csv(args.out, rows, COLUMNS)
    table = markdown(rows)
    with open(str(args.out).rsplit(".", 1)[0] + ".md", "w", encoding="utf-8") as handle:
        handle.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
