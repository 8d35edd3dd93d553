"""Every benchmark at one size, in one process, into one results file: what ``bench/gpu_check`` runs.

Steps, in order: warm Triton's compile cache in parallel (GPU only), the layer
table (bf16, M = 8192, r in {16, 64}, at GPT-2's c_attn and at Llama-7B's
K = 4096 projections in nn.Linear's layout), the rank sweep (r = 1..64), saved
activations (dropout on), end-to-end training (seq 128 and 1024, batch 8),
the compiled graphs and CUDA-graph recordings of a compiled DyLoRA run
(``bench.compile_counts``; ``bench/gpu_check`` runs it as a step of its own),
the autotuner's choices, then the markdown report and plots. All rows go to
``<out-dir>/<device>-<date>.csv`` with a ``bench`` column; the report to the
``.md`` beside it.

``--tiny`` runs the same steps at toy sizes with one timed round, so the
whole harness runs on a CPU (CI) in seconds; its timings are CPU timings.

    python -m bench.suite                       # on a GPU
    python -m bench.suite --device cpu --tiny --out-dir /tmp/bench
"""

import argparse
import contextlib
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from hybrid_lora.ops import backend

from . import compile_counts, e2e, layer_bench, memory, rank_sweep, report
from .record import RESULTS_DIR, pick_device, slug, stamp, utc_now, without_local_paths, write_csv

STEPS = ("precompile", "layer", "rank_sweep", "memory", "e2e", "checkpointing", "compile_counts", "autotune", "report")


@dataclass
class SuiteConfig:
    M: int = 8192  # tokens of the layer table, rank sweep and memory measurement
    K: int = 768  # GPT-2 c_attn
    N: int = 2304
    layer_ranks: tuple = (1, 16, 64)  # the ranks the targets name, and rank 1: the price of kernels sized by r_max
    linear_shapes: tuple = layer_bench.LLAMA_7B_SHAPES  # (K, N) timed with nn.Linear's weight layout too
    dtype: str = "bf16"
    sweep_ranks: tuple = tuple(range(1, 65))
    sweep_modes: tuple = ("fwd+bwd",)
    sweep_rep_ms: int = 40  # timed milliseconds per rank: 64 ranks must fit the 5-minute budget
    memory_rank: int = 64
    dropout: float = 0.05  # of the memory measurement: the original's LoRA dropout
    rounds: int = None  # CPU only: timed calls per measurement
    compile_backend: str = "inductor"  # torch.compile backend of the `compiled` provider
    training: e2e.E2EConfig = field(default_factory=e2e.E2EConfig)  # the end-to-end step
    e2e_torch_path: bool = False  # run the package's layers on the PyTorch path in e2e (CPU checks)
    compile_counts: dict = field(default_factory=dict)  # arguments of bench.compile_counts.run (default: 100 steps)


def tiny_config() -> SuiteConfig:
    """Toy sizes for a CPU: every step runs, in seconds, and nothing it times means anything."""
    return SuiteConfig(
        M=16, K=16, N=32, layer_ranks=(4,), linear_shapes=((32, 48),), dtype="fp32", sweep_ranks=(1, 2, 17),
        memory_rank=4, rounds=1,
        compile_backend="aot_eager",  # inductor's C++ build takes minutes on a CPU
        training=e2e.E2EConfig(seq_lens=(8,), batch_size=2, warmup_steps=1, steps=1, model=e2e.TINY_GPT2,
                               compile_backend="aot_eager"),
        e2e_torch_path=True,  # the Triton interpreter would take minutes per training step
        compile_counts=dict(steps=4, r=8, batch=2, seq_len=8, model=e2e.TINY_GPT2, backend="aot_eager"),
    )


@contextlib.contextmanager
def _torch_path(enabled):
    previous = os.environ.get("HYBRID_LORA_BACKEND")
    if enabled:
        os.environ["HYBRID_LORA_BACKEND"] = "torch"
        backend.refresh()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HYBRID_LORA_BACKEND", None)
        else:
            os.environ["HYBRID_LORA_BACKEND"] = previous
        backend.refresh()


def precompile(config: SuiteConfig, device, workers, log=print) -> list:
    """Compile every kernel config the run can autotune over, in parallel, into Triton's disk cache.

    The autotuner would otherwise compile each config in turn on first use.
    Covers the rank buckets, dropout on and off, adapters in the compute dtype
    (layer table) and in fp32 (autocast training), and both weight layouts
    (Conv1D's, and nn.Linear's read transposed). The shape does not matter when
    every size is a multiple of 16: Triton compiles the same variants.
    """
    from triton.runtime import driver

    from . import compile_report
    from .record import parse_dtype

    target = driver.active.get_current_target()
    dtype = parse_dtype(config.dtype)
    shape = dict(M=config.M, K=config.K, N=config.N)
    jobs = compile_report.plan((16, 32, 64), [dtype], (0.0, config.dropout), adapter_dtypes=(None, torch.float32),
                               target=target, device=device, weight_layouts=("in_out", "out_in"), **shape)
    log(f"precompile: {len(jobs)} specializations on {workers} processes for {target}")
    return compile_report.compile_all(jobs, workers=workers, target=target, device=str(device), log=lambda _: None,
                                      **shape)


def autotune_rows(run_stamp) -> list:
    """The config each autotuned kernel chose for each key it met in this process."""
    from .compile_report import _config_text
    from .launches import kernel_objects

    rows = []
    for (_, name), kernel in kernel_objects().items():
        for key, config in getattr(kernel, "cache", {}).items():
            rows.append({"kernel": name, "key": " ".join(map(str, key)), "config": _config_text(config), **run_stamp})
    return rows


def combined_columns() -> list:
    columns = ["bench"]
    for names in (layer_bench.COLUMNS, rank_sweep.COLUMNS, memory.COLUMNS, e2e.COLUMNS,
                  memory.CHECKPOINTING_COLUMNS, compile_counts.COLUMNS, ["kernel", "key", "config"]):
        columns += [name for name in names if name not in columns]
    return columns


STEP_COLUMNS = ["step", "status", "seconds", "device", "commit", "date"]


def run(config: SuiteConfig, device, out_dir, *, skip=(), workers=None, log=print) -> dict:
    """Run the steps not in `skip`, each on its own: a step that fails is recorded and the next one runs.

    The rows are rewritten to the CSV after every step, so a run cut short
    keeps what it measured; ``<name>-steps.csv`` says how each step ended.
    Returns {"csv": path, "md": path, "steps": path, "seconds": {step: s}, "failed": [step]}.
    """
    from .record import parse_dtype

    for step in skip:
        if step not in STEPS:
            raise ValueError(f"step {step!r}: expected one of {STEPS}")
    dtype = parse_dtype(config.dtype)
    run_stamp = stamp(device)
    rows, step_rows, seconds, failed = [], [], {}, []
    name = f"{slug(run_stamp['device'])}-{utc_now()[:10]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, steps_path = out_dir / f"{name}.csv", out_dir / f"{name}.md", out_dir / f"{name}-steps.csv"
    columns = combined_columns()

    def save():
        write_csv(csv_path, [{**dict.fromkeys(columns, ""), **row} for row in rows], columns)
        write_csv(steps_path, step_rows, STEP_COLUMNS)

    def timed(step, fn):
        if step in skip:
            log(f"== {step}: skipped")
            step_rows.append({"step": step, "status": "skipped", "seconds": "", **run_stamp})
            save()
            return
        log(f"== {step}")
        start = time.perf_counter()
        try:
            new_rows = [{"bench": step, **row} for row in fn() or ()]
            status = "ok"
        except Exception as error:  # one broken step must not cost the measurements of the others
            log(traceback.format_exc())
            new_rows, status = [], without_local_paths(f"error: {type(error).__name__}: {error}")[:300]
            failed.append(step)
        rows.extend(new_rows)
        seconds[step] = round(time.perf_counter() - start, 1)
        step_rows.append({"step": step, "status": status, "seconds": seconds[step], **run_stamp})
        save()
        log(f"== {step}: {status}, {seconds[step]} s")

    def warm_compile_cache():
        compiled = precompile(config, device, workers or max(1, (os.cpu_count() or 2) - 2), log)
        broken = [row for row in compiled if row["status"] != "ok"]
        if broken:  # the autotuner skips configs that fail to compile; a failure here is still a finding
            raise RuntimeError(f"{len(broken)} of {len(compiled)} configs failed to compile, e.g. "
                               f"{broken[0]['kernel']} [{broken[0]['config']}]: {broken[0]['status']}")

    if device.type == "cuda":
        timed("precompile", warm_compile_cache)

    def layer_table():
        shapes = [(config.K, config.N, "in_out"), *((K, N, "out_in") for K, N in config.linear_shapes)]
        return [row for K, N, layout in shapes for row in layer_bench.run(
            device, [config.M], list(config.layer_ranks), [dtype], K=K, N=N, rounds=config.rounds,
            compile_backend=config.compile_backend, weight_layout=layout, log=log)]

    timed("layer", layer_table)
    timed("rank_sweep", lambda: rank_sweep.run(
        device, config.M, list(config.sweep_ranks), dtype, K=config.K, N=config.N, modes=config.sweep_modes,
        rounds=config.rounds, rep_ms=config.sweep_rep_ms, log=log))
    timed("memory", lambda: memory.run(
        device, config.M, config.K, config.N, config.memory_rank, [dtype], dropout_p=config.dropout,
        compile_backend=config.compile_backend))
    with _torch_path(config.e2e_torch_path):
        timed("e2e", lambda: e2e.run(config.training, device, log=log))
        # Peak memory of the e2e model's training step without and with activation checkpointing.
        timed("checkpointing", lambda: memory.checkpointing_run(device, config.training))
        # Compiled graphs and CUDA-graph recordings of a compiled DyLoRA run with one rank cut.
        timed("compile_counts", lambda: compile_counts.run(device, log=log, **config.compile_counts))
    if device.type == "cuda":
        timed("autotune", lambda: autotune_rows(run_stamp))

    def write_report():
        report.write_report([csv_path], md_path, title=f"Benchmarks on {run_stamp['device']}", log=log)

    timed("report", write_report)
    log(f"wrote {csv_path.name}, {steps_path.name}" + ("" if "report" in skip else f" and {md_path.name}")
        + f" in {out_dir}")
    log("seconds per step: " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
    if failed:
        log(f"FAILED steps: {', '.join(failed)} (see {steps_path.name})")
    return {"csv": csv_path, "md": md_path, "steps": steps_path, "seconds": seconds, "failed": failed}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes and one round: a CPU check of the harness")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--skip", nargs="*", default=[], help=f"steps to leave out, of {STEPS}")
    parser.add_argument("--workers", type=int, default=None, help="precompile processes (default: CPUs - 2)")
    parser.add_argument("--precompile-only", action="store_true",
                        help="only fill Triton's compile cache for this GPU (before the correctness tests)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device.type != "cuda" and not args.tiny:
        parser.error(f"device {device.type!r}: the full sizes need a CUDA device; add --tiny for a CPU check")
    config = tiny_config() if args.tiny else SuiteConfig()
    workers = args.workers or max(1, (os.cpu_count() or 2) - 2)
    if args.precompile_only:
        if device.type != "cuda":
            print("precompile: nothing to do without CUDA (the interpreter compiles nothing)")
            return 0
        start = time.perf_counter()
        rows = precompile(config, device, workers)
        failed = [row for row in rows if row["status"] != "ok"]
        print(f"precompile: {len(rows)} configs in {time.perf_counter() - start:.0f} s, {len(failed)} failed")
        for row in failed:
            print(f"  {row['kernel']} [{row['config']}]: {row['status']}")
        return 1 if failed else 0
    from pathlib import Path

    result = run(config, device, Path(args.out_dir), skip=args.skip, workers=workers)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
