"""End-to-end training throughput of GPT-2 small with LoRA on c_attn, every pipeline in one process.

Pipelines (each starts from the same randomly initialised GPT-2; random init
is enough to time a step):

| pipeline        | what it is                                                                       |
|-----------------|----------------------------------------------------------------------------------|
| `original`      | the original experiment's: peft LoRA, fp32, eager, loss from ``labels=``         |
| `peft-bf16`     | the same under bf16 autocast                                                     |
| `ours-layer`    | the same loop with ``hybrid_lora.inject_lora`` (the fused layer) under bf16 autocast |
| `ours-engine`   | ``hybrid_lora.train.trainer.run_continual``, one stage of the default ``hybrid`` variant  |
|                 | (CE + ordering penalty, DyLoRA rank sampling), bf16: what the package trains with |
| `peft-compiled` | `peft-bf16` with the model under ``torch.compile`` (Inductor)                     |
| `ours-compiled` | `ours-layer` with the model under ``torch.compile(fullgraph=True)`` (Inductor)    |
| `ours-cudagraphs` | `ours-compiled` with ``mode="reduce-overhead"``: Inductor plus CUDA graphs      |
| `peft+accelerate` | `peft-bf16` after ``hybrid_lora.accelerate(model)``: peft's model on the fused op |

The loop pipelines share one step: forward with labels, backward, AdamW
step, zero_grad, with no host synchronisation inside the timed steps. The
engine reports its own training time and tokens (evaluation excluded).
A row gives step time, tokens/s (batch x sequence positions per second),
peak CUDA memory and the projected time of one stage of the original
(3 epochs of 3000 examples at this batch size).

    python -m bench.e2e                      # GPT-2 small, seq 128 and 1024, batch 8
"""

import argparse
import math
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from .record import RESULTS_DIR, pick_device, slug, stamp, utc_now, write_csv

COLUMNS = ["pipeline", "model", "seq_len", "batch", "steps", "step_ms", "tokens_per_s", "peak_mem_bytes",
           "projected_stage_s", "speedup_vs_original", "status", "timer", "device", "commit", "date"]
PIPELINES = ("original", "peft-bf16", "ours-layer", "ours-engine", "peft-compiled", "ours-compiled",
             "ours-cudagraphs", "peft+accelerate")
# torch.compile settings of the compiled pipelines: (mode, fullgraph). peft's layers may break the
# graph, so it is not asked for one graph; ours must give one.
COMPILED = {"peft-compiled": (None, False), "ours-compiled": (None, True), "ours-cudagraphs": ("reduce-overhead", True)}


@dataclass
class E2EConfig:
    seq_lens: tuple = (128, 1024)  # the original's 128, and GPT-2's full context
    batch_size: int = 8  # the original's
    warmup_steps: int = 3  # untimed: compiles and autotunes the kernels
    steps: int = 10  # timed steps per pipeline and sequence length
    r: int = 64  # the original's LoRA rank, alpha and dropout
    alpha: float = 32.0
    dropout: float = 0.05
    lr: float = 5e-5
    stage_examples: int = 3000  # one stage of the original: 3 epochs of 3000 examples
    stage_epochs: int = 3
    model: dict = field(default_factory=dict)  # GPT2Config overrides; empty is GPT-2 small (124M)
    pipelines: tuple = PIPELINES
    seed: int = 0
    compile_backend: str = "inductor"  # of the compiled pipelines; CUDA graphs ("reduce-overhead") need inductor

    def __post_init__(self):
        for name in ("batch_size", "steps", "r", "stage_examples", "stage_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"E2EConfig.{name}={value!r}: expected an integer >= 1")
        if self.warmup_steps < 1:
            raise ValueError(f"E2EConfig.warmup_steps={self.warmup_steps}: expected >= 1 (the first step compiles)")
        for name in self.pipelines:
            if name not in PIPELINES:
                raise ValueError(f"pipeline {name!r}: expected one of {PIPELINES}")

    @property
    def stage_steps(self):
        return self.stage_epochs * math.ceil(self.stage_examples / self.batch_size)


def model_name(config: E2EConfig) -> str:
    if not config.model:
        return "gpt2-small (random init)"
    return "gpt2 " + " ".join(f"{k}={v}" for k, v in config.model.items()) + " (random init)"


def random_gpt2(config: E2EConfig, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    model = GPT2LMHeadModel(GPT2Config(**config.model)).to(device)
    # The loss transformers falls back to anyway; named, so that no warning call breaks a compiled graph.
    model.loss_type = "ForCausalLM"
    return model


def with_peft(model, config: E2EConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=["c_attn"],
                      fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def with_fused(model, config: E2EConfig):
    from hybrid_lora import inject_lora

    inject_lora(model, ("c_attn",), r_max=config.r, alpha=config.alpha, dropout=config.dropout)
    return model


def random_batches(config: E2EConfig, seq_len, count, vocab_size, device):
    g = torch.Generator().manual_seed(config.seed + seq_len)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab_size, (config.batch_size, seq_len), generator=g).to(device)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return batches


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else math.nan


def time_loop(model, autocast_dtype, batches, config, device, compiled=None):
    """(seconds per step, peak bytes) of forward, backward, AdamW step over `batches` after the warm-up.

    compiled: (mode, fullgraph) to run the model under torch.compile (Inductor), or None for eager.
    """
    from contextlib import nullcontext

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    model.train()
    forward = model
    if compiled is not None:
        mode, fullgraph = compiled
        backend = config.compile_backend
        forward = torch.compile(model, backend=backend, mode=mode if backend == "inductor" else None,
                                fullgraph=fullgraph, dynamic=False)

    def step(batch):
        context = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with context:
            loss = forward(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:config.warmup_steps]:
        step(batch)
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    for batch in batches[config.warmup_steps:]:
        step(batch)
    _sync(device)
    return (time.perf_counter() - start) / config.steps, _peak(device)


def _warm_rank_buckets(model, batch, device):
    """Run one forward and backward at each rank bucket, so that no autotuning falls inside the timing."""
    from hybrid_lora import lora_layers
    from hybrid_lora.train.dynamic_rank import active_rank

    layers = lora_layers(model)
    for rank in sorted({min(b, layers[0].r_max) for b in (1, 17, 33, layers[0].r_max)}):
        with active_rank(layers, rank), torch.autocast(device.type, dtype=torch.bfloat16):
            model(**batch, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)


def time_engine(model, batches, config, device):
    """(seconds per step, peak bytes) of run_continual's training, one stage of the ``hybrid`` variant."""
    from hybrid_lora.train.config import variant_config
    from hybrid_lora.train.trainer import Domain, run_continual

    train = [{k: v[i].cpu() for k, v in batch.items()} for batch in batches[config.warmup_steps:]
             for i in range(config.batch_size)]
    evaluation = train[:config.batch_size]
    engine = variant_config("hybrid", r_max=config.r, alpha=config.alpha, lora_dropout=config.dropout,
                            lr=config.lr, batch_size=config.batch_size, epochs=1, log_every=0,
                            dtype="bfloat16", device=str(device), seed=config.seed)
    _warm_rank_buckets(model, batches[0], device)
    _sync(device)
    _reset_peak(device)
    result = run_continual(model, [Domain("random tokens", train, evaluation)], engine)
    epoch = next(row for row in result["history"] if row["kind"] == "epoch")
    return epoch["seconds"] / epoch["steps"], _peak(device)


def run_pipeline(name, seq_len, config: E2EConfig, device):
    model = random_gpt2(config, device)
    batches = random_batches(config, seq_len, config.warmup_steps + config.steps, model.config.vocab_size, device)
    if name == "original":
        return time_loop(with_peft(model, config), None, batches, config, device)
    if name == "peft-bf16":
        return time_loop(with_peft(model, config), torch.bfloat16, batches, config, device)
    if name == "peft+accelerate":
        from hybrid_lora import accelerate

        return time_loop(accelerate(with_peft(model, config), strict=True), torch.bfloat16, batches, config, device)
    if name == "ours-layer":
        return time_loop(with_fused(model, config), torch.bfloat16, batches, config, device)
    if name == "ours-engine":
        return time_engine(with_fused(model, config), batches, config, device)
    if name == "peft-compiled":
        return time_loop(with_peft(model, config), torch.bfloat16, batches, config, device, COMPILED[name])
    if name in ("ours-compiled", "ours-cudagraphs"):
        return time_loop(with_fused(model, config), torch.bfloat16, batches, config, device, COMPILED[name])
    raise ValueError(f"pipeline {name!r}: expected one of {PIPELINES}")


def _sig(value):
    return float(f"{value:.6g}")


def run(config: E2EConfig, device, log=print):
    run_stamp = stamp(device)
    timer = "CPU timing (perf_counter)" if device.type == "cpu" else "perf_counter after cuda synchronize"
    rows = []
    for seq_len in config.seq_lens:
        original_s = None
        for name in config.pipelines:
            row = {"pipeline": name, "model": model_name(config), "seq_len": seq_len, "batch": config.batch_size,
                   "steps": config.steps, "timer": timer, **run_stamp}
            try:
                step_s, peak = run_pipeline(name, seq_len, config, device)
            except Exception as error:  # one broken pipeline must not hide the others
                traceback.print_exc(file=sys.stderr)
                row.update(step_ms=math.nan, tokens_per_s=math.nan, peak_mem_bytes=math.nan,
                           projected_stage_s=math.nan, speedup_vs_original=math.nan,
                           status=f"error: {type(error).__name__}: {error}".replace("\n", " ")[:300])
                rows.append(row)
                continue
            if name == "original":
                original_s = step_s
            row.update(step_ms=_sig(step_s * 1e3), tokens_per_s=_sig(config.batch_size * seq_len / step_s),
                       peak_mem_bytes=peak, projected_stage_s=_sig(config.stage_steps * step_s),
                       speedup_vs_original=_sig(original_s / step_s) if original_s else math.nan,
                       status="ok")
            rows.append(row)
            log(f"seq {seq_len} {name:12s} {row['step_ms']:.2f} ms/step {row['tokens_per_s']:.0f} tok/s "
                f"stage {row['projected_stage_s']:.1f} s")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES))
    parser.add_argument("--tiny", action="store_true", help="a 2-layer GPT-2 of width 64, for CPU checks")
    parser.add_argument("--out", default=None, help="CSV path (default: bench/results/e2e-<device>-<date>.csv)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    config = E2EConfig(seq_lens=tuple(args.seq_lens), batch_size=args.batch, warmup_steps=args.warmup,
                       steps=args.steps, pipelines=tuple(args.pipelines), model=TINY_GPT2 if args.tiny else {})
    rows = run(config, device)
    out = args.out or RESULTS_DIR / f"e2e-{slug(rows[0]['device'])}-{utc_now()[:10]}.csv"
    print(f"wrote {write_csv(out, rows, COLUMNS)}")


TINY_GPT2 = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=128, bos_token_id=255,
                 eos_token_id=255)

if __name__ == "__main__":
    main()
