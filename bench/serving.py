"""Serving many adapters in one batch: each request its own adapter and rank, prefill and decode.

A batch of 32 requests over 8 adapters (r_max 64), each request at a rank drawn
from a mix (``MIXES``), through one adapted layer at GPT-2's c_attn (K = 768,
N = 2304, Conv1D layout) and at a K = 4096 projection (N = 4096, nn.Linear's
layout), bf16. Prefill runs every request's prompt (``prefill_len`` tokens
each); decode one token per request. Providers:

- `ours`: ``hybrid_lora.ops.multi_lora``, rows grouped by adapter, each
  group's work following its ranks;
- `peft-mixed`: peft's ``adapter_names`` mixed batch, one peft adapter per
  (adapter, rank) pair of the batch (a peft adapter has one rank), one
  sub-batch and one matmul pair each, in Python;
- `padded-bmm`: every request's adapter padded to r_max, gathered per request,
  in one batched matmul pair (the punica/vLLM design; our own code);
- `single-rmax`: ``fused_lora`` with one adapter at r_max for every row;
- `merged`: ``addmm(b, x, W)``, one adapter merged into W: the floor;
- `ours-native-r8`: ``ours`` with adapters stored 8 wide (mix `all-8` only),
  what a rank-8 request costs without a nested r_max 64 adapter.

Before timing, ``ours`` is checked against ``padded-bmm`` (the same function)
and the largest difference recorded. Rows go to ``<device>-<date>-serving.csv``,
the table to the ``.md`` beside it; rows of ``ours`` that disagree are
marked ``wrong`` and the command exits 1.

    python -m bench.serving --out-dir bench/results             # on a GPU
    python -m bench.serving --device cpu --tiny --out-dir /tmp/bench
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from hybrid_lora.io.atomic import write_text

from .record import RESULTS_DIR, dtype_name, parse_dtype, pick_device, slug, stamp, utc_now, write_csv
from .timing import time_fn

# name -> the ranks requests draw from
MIXES = {"all-4": (4,), "all-8": (8,), "small": (4, 8), "uniform": (4, 8, 16, 32, 64), "large": (32, 64),
         "all-64": (64,)}
PROVIDERS = ("ours", "peft-mixed", "padded-bmm", "single-rmax", "merged", "ours-native-r8")
COLUMNS = ["shape", "K", "N", "weight_layout", "phase", "batch", "tokens", "M", "adapters", "r_max", "mix",
           "mean_rank", "provider", "median_ms", "p20_ms", "p80_ms", "ratio_to_merged", "max_diff", "status",
           "dtype", "timer", "device", "commit", "date"]


@dataclass
class ServingConfig:
    shapes: tuple = (("gpt2-c_attn", 768, 2304, "in_out"), ("k4096", 4096, 4096, "out_in"))
    batch: int = 32
    adapters: int = 8
    r_max: int = 64
    prefill_len: int = 128
    mixes: dict = None  # default: MIXES
    dtype: str = "bf16"
    rounds: int = None  # CPU only: timed calls per measurement
    rep_ms: int = 50

    def __post_init__(self):
        self.mixes = dict(MIXES) if self.mixes is None else self.mixes


def tiny_config() -> ServingConfig:
    """Toy sizes for a CPU: every provider runs once, and nothing it times means anything."""
    return ServingConfig(shapes=(("tiny", 16, 32, "in_out"), ("tiny-linear", 32, 24, "out_in")), batch=4,
                         adapters=3, r_max=8, prefill_len=3, mixes={"all-8": (8,), "uniform": (2, 8)},
                         dtype="fp32", rounds=1)


def requests(config, ranks, seed=0):
    """(slot per request [batch], rank per request [batch]): adapters in turn, ranks drawn from `ranks`."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.arange(config.batch) % config.adapters
    drawn = torch.tensor(ranks)[torch.randint(0, len(ranks), (config.batch,), generator=g)]
    return slots, drawn


class Layer:
    """One frozen layer and `adapters` adapters of width r_max, in the layout and dtype asked for."""

    def __init__(self, K, N, layout, config, device, dtype, width=None):
        g = torch.Generator().manual_seed(K + N)
        width = width or config.r_max
        stored = torch.randn((K, N) if layout == "in_out" else (N, K), generator=g) / K ** 0.5
        self.stored = stored.to(device, dtype)
        self.weight = self.stored if layout == "in_out" else self.stored.t()
        self.bias = (torch.randn(N, generator=g) * 0.1).to(device, dtype)
        self.lora_a = (torch.randn(config.adapters, K, width, generator=g) / K ** 0.5).to(device, dtype)
        self.lora_b = (torch.randn(config.adapters, width, N, generator=g) * 0.1).to(device, dtype)
        self.layout = layout


def scales_of(ranks, alpha=16.0):
    return alpha / ranks.double()


def ours(layer, x, slots, ranks):
    from hybrid_lora.ops.multi_lora import multi_lora

    batch, tokens = x.shape[:2]
    device = x.device
    per_token = dict(slots=slots.to(device, torch.int32).repeat_interleave(tokens),
                     ranks=ranks.to(device, torch.int32).repeat_interleave(tokens),
                     scales=scales_of(ranks).float().to(device).repeat_interleave(tokens))

    def run():
        return multi_lora(x, layer.weight, layer.bias, layer.lora_a, layer.lora_b, **per_token)

    return run


def padded_bmm(layer, x, slots, ranks):
    """Each request's adapter gathered at r_max (zero past its rank, scaled at it): two bmm over the batch."""
    device = x.device
    index = slots.to(device)
    coef = (torch.arange(layer.lora_a.shape[2], device=device) < ranks.to(device)[:, None]).to(x.dtype)
    coef = (coef * scales_of(ranks).to(device, x.dtype)[:, None]).unsqueeze(1)  # [batch, 1, R]

    def run():
        y = torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight).view(*x.shape[:2], -1)
        down = torch.bmm(x, layer.lora_a[index]) * coef  # [batch, tokens, R]
        return y.baddbmm_(down, layer.lora_b[index])

    return run


def single_rmax(layer, x, slots, ranks):
    from hybrid_lora import fused_lora

    r_max = layer.lora_a.shape[2]

    def run():
        return fused_lora(x, layer.weight, layer.bias, layer.lora_a[0], layer.lora_b[0], rank=r_max,
                          scale=16.0 / r_max)

    return run


def merged(layer, x, slots, ranks):
    def run():
        return torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight)

    return run


def peft_mixed(layer, x, slots, ranks):
    """peft's mixed batch over one adapter per (adapter, rank) pair of the batch, each truncated to its rank."""
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    K, N = layer.weight.shape
    if layer.layout == "in_out":
        base = Conv1D(N, K)
        base.weight.data = layer.stored
    else:
        base = nn.Linear(K, N)
        base.weight.data = layer.stored
    base.bias.data = layer.bias
    holder = nn.Sequential()
    holder.add_module("layer", base)
    pairs = sorted({(int(s), int(r)) for s, r in zip(slots, ranks)})
    model = None
    for slot, rank in pairs:
        name = f"a{slot}-r{rank}"
        config = LoraConfig(r=rank, lora_alpha=16.0, target_modules=["layer"], fan_in_fan_out=layer.layout == "in_out")
        if model is None:
            model = get_peft_model(holder, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        lora = model.base_model.model.layer
        with torch.no_grad():
            lora.lora_A[name].weight.copy_(layer.lora_a[slot, :, :rank].t())
            lora.lora_B[name].weight.copy_(layer.lora_b[slot, :rank].t())
    lora = model.base_model.model.layer.to(x.device, x.dtype)
    names = [f"a{int(s)}-r{int(r)}" for s, r in zip(slots, ranks)]

    def run():
        return lora(x, adapter_names=names)

    return run


# Largest |ours - padded-bmm| allowed, relative to the output's size: fp32 accumulation, inputs rounded to the dtype.
AGREEMENT = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}

BUILDERS = {"ours": ours, "peft-mixed": peft_mixed, "padded-bmm": padded_bmm, "single-rmax": single_rmax,
            "merged": merged, "ours-native-r8": ours}


def run(config: ServingConfig, device, log=print) -> list:
    dtype = parse_dtype(config.dtype)
    run_stamp = stamp(device)
    rows = []
    for shape_name, K, N, layout in config.shapes:
        layer = Layer(K, N, layout, config, device, dtype)
        native = Layer(K, N, layout, config, device, dtype, width=8) if config.r_max >= 8 else None
        for phase, tokens in (("prefill", config.prefill_len), ("decode", 1)):
            x = (torch.randn(config.batch, tokens, K, generator=torch.Generator().manual_seed(1)) / 2).to(device, dtype)
            for mix, ranks_of_mix in config.mixes.items():
                slots, ranks = requests(config, ranks_of_mix)
                with torch.no_grad():
                    want = padded_bmm(layer, x, slots, ranks)().float()
                    max_diff = float((ours(layer, x, slots, ranks)().float().reshape(want.shape) - want).abs().max())
                agrees = max_diff <= AGREEMENT[dtype] * max(1.0, float(want.abs().max()))
                base_ms = None
                for provider in PROVIDERS:
                    if provider == "ours-native-r8" and (native is None or set(ranks_of_mix) != {8}):
                        continue
                    status, timing = "ok" if agrees or provider != "ours" else "wrong", None
                    try:
                        with torch.no_grad():
                            fn = BUILDERS[provider](native if provider == "ours-native-r8" else layer, x, slots,
                                                    ranks)
                            timing = time_fn(fn, device, rounds=config.rounds, rep_ms=config.rep_ms)
                    except ImportError as err:
                        status = f"skipped: {err.name or err} not installed"
                    except torch.OutOfMemoryError:
                        status = "skipped: out of memory"
                    if provider == "merged" and timing is not None:
                        base_ms = timing.median_ms
                    rows.append({
                        "shape": shape_name, "K": K, "N": N, "weight_layout": layout, "phase": phase,
                        "batch": config.batch, "tokens": tokens, "M": config.batch * tokens,
                        "adapters": config.adapters, "r_max": 8 if provider == "ours-native-r8" else config.r_max,
                        "mix": mix, "mean_rank": round(float(ranks.double().mean()), 3), "provider": provider,
                        "median_ms": round(timing.median_ms, 6) if timing else "",
                        "p20_ms": round(timing.p20_ms, 6) if timing else "",
                        "p80_ms": round(timing.p80_ms, 6) if timing else "", "ratio_to_merged": "",
                        "max_diff": f"{max_diff:.3g}", "status": status, "dtype": dtype_name(dtype),
                        "timer": timing.timer if timing else "", **run_stamp,
                    })
                    log(f"{shape_name} {phase} {mix} {provider}: "
                        + (f"{timing.median_ms:.4f} ms" if timing else status))
                for row in rows:
                    if row["shape"] == shape_name and row["phase"] == phase and row["mix"] == mix \
                            and row["median_ms"] != "" and base_ms:
                        row["ratio_to_merged"] = round(row["median_ms"] / base_ms, 4)
    return rows


def table(rows) -> str:
    """Markdown: per shape and phase, one line per mix with every provider's time and the ratios the targets name."""
    if not rows:
        return "No rows.\n"
    cpu = "CPU" in rows[0]["timer"]
    lines = [f"# Serving: {rows[0]['batch']} requests over {rows[0]['adapters']} adapters, r_max "
             f"{rows[0]['r_max']}", "", f"Device: {rows[0]['device']}; commit {rows[0]['commit']}; "
             f"{rows[0]['date']}; {rows[0]['dtype']}; timer: {rows[0]['timer']}.", ""]
    if cpu:
        lines += ["**CPU timings**: they show that the harness runs, not how fast anything is; the targets are "
                  "n/a: CPU timing.", ""]
    times = {(r["shape"], r["phase"], r["mix"], r["provider"]): r["median_ms"] for r in rows}
    keys = list(dict.fromkeys((r["shape"], r["phase"]) for r in rows))
    for shape, phase in keys:
        sample = next(r for r in rows if r["shape"] == shape and r["phase"] == phase)
        lines += [f"## {shape} (K = {sample['K']}, N = {sample['N']}), {phase}: M = {sample['M']}", "",
                  "| mix | mean rank | " + " | ".join(f"{p} ms" for p in PROVIDERS[:5])
                  + " | peft / ours | padded / ours | ours / merged |", "|---" * 10 + "|"]
        for mix in dict.fromkeys(r["mix"] for r in rows if r["shape"] == shape and r["phase"] == phase):
            t = {p: times.get((shape, phase, mix, p), "") for p in PROVIDERS}
            mean = next(r["mean_rank"] for r in rows if (r["shape"], r["phase"], r["mix"]) == (shape, phase, mix))

            def ratio(a, b):
                return f"{t[a] / t[b]:.2f}" if t[a] != "" and t[b] not in ("", 0) else "n/a"

            lines.append(f"| {mix} | {mean} | " + " | ".join(f"{t[p]:.4f}" if t[p] != "" else "n/a"
                                                          for p in PROVIDERS[:5])
                         + f" | {ratio('peft-mixed', 'ours')} | {ratio('padded-bmm', 'ours')} | "
                           f"{ratio('ours', 'merged')} |")
            if t["ours-native-r8"] != "":
                lines.append(f"| {mix}, adapters 8 wide | {mean} | {t['ours-native-r8']:.4f} | | | | | | | "
                             f"nested / native: {ratio('ours', 'ours-native-r8')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes and one round: a CPU check of the harness")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device.type != "cuda" and not args.tiny:
        parser.error(f"device {device.type!r}: the full sizes need a CUDA device; add --tiny for a CPU check")
    rows = run(tiny_config() if args.tiny else ServingConfig(), device)
    name = f"{slug(rows[0]['device'])}-{utc_now()[:10]}-serving"
    out = Path(args.out_dir)
    write_csv(out / f"{name}.csv", rows, COLUMNS)
    write_text(out / f"{name}.md", table(rows))
    print(f"wrote {name}.csv and {name}.md in {out}")
    wrong = [row for row in rows if row["status"] == "wrong"]
    for row in wrong:
        print(f"WRONG: ours differs from padded-bmm by {row['max_diff']} at {row['shape']} {row['phase']} "
              f"{row['mix']}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
