"""Compiled graphs and CUDA-graph recordings over a compiled DyLoRA run with one rank cut.

A GPT-2 with adapters of width r on c_attn trains one stage through the
package's trainer with ``TrainConfig.compile`` (``torch.compile(fullgraph=True)``,
on CUDA with ``mode="reduce-overhead"``: Inductor plus CUDA graphs): DyLoRA
draws a rank every step (frozen mode), LoRA dropout draws a new mask every
call, and the adapter is cut from r to r / 2 halfway (two epochs, the rank
schedule (r, r / 2)). One row counts:

- ``graphs``: graphs Dynamo compiled (its ``unique_graphs`` counter); the
  target is exactly one per adapter width, so 2;
- ``recordings``: CUDA graphs captured (calls of ``CUDAGraph.capture_begin``);
  the forward and the backward of a graph are captured separately, so the
  target is one of each per width, 4 in all; 0 off CUDA.

The row is written either way; the command exits non-zero when a count
misses its target.

    python -m bench.compile_counts                  # on a GPU: 100 steps of GPT-2 small, batch 8 x 128
    python -m bench.compile_counts --out counts.csv # the row also as CSV (what bench/gpu_check writes)
"""

import argparse
import contextlib
import json

import torch

from .record import pick_device, stamp, write_csv

COLUMNS = ["steps", "widths", "graphs", "recordings", "target_graphs", "target_recordings", "compile_mode"]


@contextlib.contextmanager
def counting_captures():
    """A list that gets one entry per CUDA-graph capture started inside the block."""
    captures = []
    graph_class = torch.cuda.CUDAGraph
    original = graph_class.capture_begin

    def capture_begin(self, *args, **kwargs):
        captures.append(1)
        return original(self, *args, **kwargs)

    graph_class.capture_begin = capture_begin
    try:
        yield captures
    finally:
        graph_class.capture_begin = original


def run(device, *, steps=100, r=64, batch=8, seq_len=128, model=None, backend="inductor", log=print):
    """Train `steps` compiled DyLoRA steps (the rank cut at steps // 2) and count graphs and recordings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hybrid_lora import inject_lora
    from hybrid_lora.train import compiled
    from hybrid_lora.train.config import TrainConfig
    from hybrid_lora.train.trainer import Domain, train_stage

    if steps < 2 or steps % 2:
        raise ValueError(f"steps={steps}: expected an even number >= 2 (two epochs, the cut between them)")
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(**(model or {}))).to(device)
    inject_lora(gpt2, ("c_attn",), r_max=r, alpha=32.0, dropout=0.05)
    g = torch.Generator().manual_seed(1)
    vocab = gpt2.config.vocab_size
    examples = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
                for ids in torch.randint(0, vocab, (steps // 2 * batch, seq_len), generator=g)]
    config = TrainConfig(r_max=r, alpha=32.0, lora_dropout=0.05, batch_size=batch, eval_batch_size=batch, epochs=2,
                         rank_schedule=(r, max(1, r // 2)), dylora="frozen", lambda_dc=0.0, log_every=0,
                         progress=False, sweep_ranks=(), device=str(device), compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    saved = compiled.COMPILE_BACKEND, compiled.COMPILE_MODE
    compiled.COMPILE_BACKEND, compiled.COMPILE_MODE = backend, mode
    try:
        with counting_captures() as captures:
            train_stage(gpt2, Domain("random tokens", examples, examples[:batch]), config, stage=1)
    finally:
        compiled.COMPILE_BACKEND, compiled.COMPILE_MODE = saved
    row = {"steps": steps, "widths": 2, "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
           "recordings": len(captures), "target_graphs": 2, "target_recordings": 4 if mode else 0,
           "compile_mode": mode or backend, **stamp(device)}
    log(f"compile counts: {row['graphs']} graphs (target 2), {row['recordings']} CUDA-graph recordings "
        f"(target {row['target_recordings']}) over {steps} DyLoRA steps with one rank cut")
    return [row]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer GPT-2 of width 64, 8 steps, aot_eager")
    parser.add_argument("--out", default=None, help="also write the row to this CSV file")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if args.tiny:
        from .e2e import TINY_GPT2

        rows = run(device, steps=min(args.steps, 8), r=8, batch=2, seq_len=8, model=TINY_GPT2, backend="aot_eager")
    else:
        rows = run(device, steps=args.steps)
    print(json.dumps(rows, indent=1))
    if args.out:
        columns = COLUMNS + [name for name in rows[0] if name not in COLUMNS]
        write_csv(args.out, rows, columns)
    missed = off_target(rows[0])
    if missed:
        raise SystemExit(f"compile counts: {missed}")


def off_target(row):
    """What of `row` misses its target (exactly, both ways: a graph too few is one replayed for a width it was
    not compiled for), or '' when both counts hit it."""
    missed = [f"{row[name]} {name}, expected {row[f'target_{name}']}" for name in ("graphs", "recordings")
              if row[name] != row[f"target_{name}"]]
    return "; ".join(missed)


if __name__ == "__main__":
    main()
