"""Hopper compile report: every kernel of ``hybrid_lora.kernels`` compiled for sm_90, without a GPU.

Each kernel is compiled for ``GPUTarget("cuda", 90, 32)`` by the JIT's own warmup (``bench.launches``)
for the launches the launchers make at the GPT-2 c_attn shape (``bench.launches``),
in every autotune config the autotuner keeps for that launch (after its own
``early_config_prune``), for each rank bucket, with dropout on and off, and with
the adapters in x's dtype and in fp32 (what bf16 autocast training passes).
The cubin is read with the ``cuobjdump`` bundled with Triton:

* ``--dump-resource-usage``: registers per thread, local memory (spills), stack
  and static shared memory; the dynamic shared memory comes from Triton's metadata;
* ``--dump-sass``: whether the matrix instructions are ``HGMMA`` (wgmma, Hopper's
  warpgroup MMA) or ``HMMA`` (mma.sync), and how many local loads/stores there are.

A config can launch on sm_90 when its shared memory fits the 227 KiB a block
may opt into and its registers fit the register file; the autotuner can only
choose such configs. The report fails (exit code 1) when a config that can
launch spills, or when a frozen-weight GEMM kernel (tuned with ``gemm_configs``)
has no HGMMA.

    python -m bench.compile_report                       # every config: a few minutes
    python -m bench.compile_report --configs first-fit   # per kernel, the first config that can launch
    python -m bench.compile_report --K 4096 --N 11008 --name compile-sm90-k4096   # Llama-7B's MLP shape

The weight is compiled in both layouts: Conv1D's [K, N] and nn.Linear's [N, K]
read through its transpose (``--weight-layouts``), which Triton specializes
separately (a unit stride is a compile-time constant).
"""

import argparse
import concurrent.futures
import hashlib
import multiprocessing
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_lora.io.atomic import write_text

from .record import (REPO_ROOT, RESULTS_DIR, commit, parse_dtype, read_csv, utc_now, without_local_paths,
                     write_csv)

SM90_MAX_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one block can opt into on sm_90
SM90_REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255
GPT2 = dict(M=8192, K=768, N=2304)

COLUMNS = ["kernel", "role", "dtype", "adapter_dtype", "block_r", "dropout", "used_by", "pruned_configs", "config",
           "num_warps", "num_stages",
           "registers", "local_bytes", "stack_bytes", "spill_instructions", "static_shared_bytes",
           "dynamic_shared_bytes", "can_launch", "hgmma", "hmma", "compile_s", "status", "target", "triton",
           "ptxas", "kernels_sha256", "commit", "date"]


def cuda_bin(tool: str) -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    if not path.exists():
        raise FileNotFoundError(f"{path}: Triton's bundled {tool} is missing; expected it under "
                                "triton/backends/nvidia/bin/")
    return path


def kernels_sha256() -> str:
    """Hash of the kernel sources, so that a report names the code it describes."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "kernels").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# --- reading the cubin ----------------------------------------------------------------------------

_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_resource_usage(text: str) -> dict:
    """Registers, stack, static shared and local bytes from ``cuobjdump --dump-resource-usage``."""
    match = _RESOURCE.search(text)
    if match is None:
        raise ValueError(f"no 'REG:.. STACK:.. SHARED:.. LOCAL:..' line in cuobjdump output:\n{text[:2000]}")
    registers, stack, shared, local = map(int, match.groups())
    return {"registers": registers, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local}


def parse_sass(text: str) -> dict:
    """Counts of HGMMA, HMMA and local-memory loads/stores (LDL/STL) in ``cuobjdump --dump-sass``."""
    opcodes = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text, flags=re.MULTILINE)
    return {"hgmma": sum(op == "HGMMA" for op in opcodes), "hmma": sum(op == "HMMA" for op in opcodes),
            "spill_instructions": sum(op in ("LDL", "STL") for op in opcodes)}


def inspect_cubin(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = str(cuda_bin("cuobjdump"))
        usage = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", str(path)], capture_output=True, text=True, check=True).stdout
    return {**parse_resource_usage(usage), **parse_sass(sass)}


def ptxas_version() -> str:
    out = subprocess.run([str(cuda_bin("ptxas")), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\S+),", out)
    return match.group(1) if match else "unknown"


# --- what to compile ------------------------------------------------------------------------------

@dataclass
class Job:
    """One kernel at one launch: a list of autotune configs, compiled in order."""

    kernel: str
    role: str
    dtype: str
    block_r: int
    dropout: float
    rank: int
    launch_index: int  # index into bench.launches.capture(...) at (rank, dtype, dropout)
    config_indices: list
    first_fit: bool  # stop at the first config that can launch
    used_by: list = field(default_factory=list)
    adapter_dtype: str = ""  # dtype of A and B; empty: the compute dtype
    pruned: int = 0  # configs the autotuner's own pruning drops for this launch
    weight_layout: str = "in_out"  # W as Conv1D stores it, or nn.Linear's transposed (bench.launches)


def _config_text(config) -> str:
    if config is None:
        return "launch arguments"
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} warps={config.num_warps} stages={config.num_stages}"


def kernel_roles() -> dict:
    """{kernel name: role}: 'gemm' for the frozen-weight GEMMs, 'skinny', 'weight-grad', 'util'."""
    from hybrid_lora.kernels import configs

    from .launches import configs_of, kernel_objects

    tuned = {"gemm": configs.gemm_configs(), "skinny": configs.down_configs(),
             "weight-grad": configs.weight_grad_configs()}
    roles = {}
    for (_, name), kernel in kernel_objects().items():
        texts = [str(c) for c in configs_of(kernel)]
        roles[name] = next((role for role, cfgs in tuned.items() if texts == [str(c) for c in cfgs]), "util")
    return roles


def chosen_configs(path) -> dict:
    """{kernel name: set of config texts} from the autotune rows of a GPU results file (bench/gpu_check)."""
    chosen = {}
    for row in read_csv(path):
        if row.get("bench", "autotune") == "autotune" and row.get("kernel"):
            chosen.setdefault(row["kernel"], set()).add(row["config"])
    if not chosen:
        raise ValueError(f"{path}: no autotune rows (bench = autotune, with kernel and config columns)")
    return chosen


def plan(ranks, dtypes, dropouts, *, M, K, N, mode="all", chosen=None, adapter_dtypes=(None,), target=None,
         device="cpu", weight_layouts=("in_out",)) -> list:
    """The distinct compiles: one Job per (kernel, JIT specialization), over ranks, dtypes and dropouts.

    adapter_dtypes: dtypes of A and B (None: the compute dtype; fp32 is what autocast training passes).
    """
    from hybrid_lora.kernels.configs import rank_block

    from .launches import candidate_configs, capture, configs_of, specialize
    from .record import dtype_name

    if mode not in ("all", "first-fit", "chosen"):
        raise ValueError(f"configs mode {mode!r}: expected 'all', 'first-fit' or 'chosen'")
    target = target or sm90()
    roles = kernel_roles()
    jobs, by_key = [], {}
    for dtype, adapter_dtype, layout in ((d, a, w) for d in dtypes for a in adapter_dtypes for w in weight_layouts):
        for dropout in dropouts:
            for rank in ranks:
                # The kernels' BLOCK_R follows the adapter width, so each rank is run as the width r_max.
                launches = capture(M, K, N, rank, dtype, dropout, r_max=rank, adapter_dtype=adapter_dtype,
                                   device=device, weight_layout=layout)
                for index, launch in enumerate(launches):
                    configs = configs_of(launch.kernel)
                    # Configs the autotuner prunes for this launch are never timed, so never chosen.
                    candidates = [i for i, c in enumerate(configs)
                                  if any(c is kept for kept in candidate_configs(launch))]
                    if mode == "chosen" and launch.name in (chosen or {}):
                        picked = [i for i in candidates if _config_text(configs[i]) in chosen[launch.name]]
                    elif mode == "chosen":
                        continue
                    else:
                        picked = candidates
                    key = (launch.name, specialize(launch, configs[0], target).key)
                    if key in by_key:
                        by_key[key].used_by.append(launch.context)
                        continue
                    job = Job(launch.name, roles.get(launch.name, "util"), dtype_name(dtype), rank_block(rank),
                              dropout, rank, index, picked, mode == "first-fit", [launch.context],
                              dtype_name(adapter_dtype or dtype), len(configs) - len(candidates), layout)
                    by_key[key] = job
                    jobs.append(job)
    return jobs


def sm90():
    from .launches import sm90 as target

    return target()


# --- compiling -------------------------------------------------------------------------------------

def can_launch(row: dict) -> bool:
    threads = 32 * int(row["num_warps"])
    return (int(row["dynamic_shared_bytes"]) + int(row["static_shared_bytes"]) <= SM90_MAX_SHARED_BYTES
            and int(row["registers"]) <= MAX_REGISTERS_PER_THREAD
            and int(row["registers"]) * threads <= SM90_REGISTERS_PER_SM)


def compile_one(launch, config, target=None) -> dict:
    """Compile one launch in one config for `target` (default sm_90) through the JIT, and inspect the cubin."""
    from .launches import compile_launch

    start = time.perf_counter()
    compiled = compile_launch(launch, config, target or sm90())
    seconds = time.perf_counter() - start
    row = {"config": _config_text(config), "num_warps": compiled.metadata.num_warps,
           "num_stages": compiled.metadata.num_stages, "dynamic_shared_bytes": compiled.metadata.shared,
           "compile_s": round(seconds, 2), **inspect_cubin(compiled.asm["cubin"])}
    row["can_launch"] = can_launch(row)
    return row


def run_job(job: Job, M, K, N, target=None, device="cpu") -> list:
    """Rows of one job (compiled in this process)."""
    from .launches import capture, configs_of

    adapter_dtype = parse_dtype(job.adapter_dtype) if job.adapter_dtype else None
    launch = capture(M, K, N, job.rank, parse_dtype(job.dtype), job.dropout, r_max=job.rank,
                     adapter_dtype=adapter_dtype, device=device, weight_layout=job.weight_layout)[job.launch_index]
    if launch.name != job.kernel:
        raise RuntimeError(f"launch {job.launch_index} is {launch.name}, expected {job.kernel}")
    configs = configs_of(launch.kernel)
    rows = []
    for index in job.config_indices:
        try:
            row = {**compile_one(launch, configs[index], target), "status": "ok"}
        except Exception as error:  # a config that does not compile is a finding, not a crash
            status = without_local_paths(f"error: {type(error).__name__}: {error}")[:300]
            row = {"config": _config_text(configs[index]), "status": status}
        rows.append({"kernel": job.kernel, "role": job.role, "dtype": job.dtype,
                     "adapter_dtype": job.adapter_dtype, "block_r": job.block_r, "pruned_configs": job.pruned,
                     "dropout": job.dropout, "used_by": "; ".join(sorted(set(job.used_by))), **row})
        if job.first_fit and row.get("can_launch"):
            break
    return rows


def _worker(job, M, K, N, target, device):
    return run_job(job, M, K, N, target, device)


def compile_all(jobs, *, M, K, N, workers=1, target=None, device="cpu", log=print) -> list:
    """Run the jobs in `workers` processes (spawned: each imports the kernels fresh).

    Compiled kernels land in Triton's on-disk cache under the same key as the
    JIT's, so compiling for the current GPU's target warms later launches.
    """
    rows = []
    if workers <= 1:
        for i, job in enumerate(jobs):
            rows += run_job(job, M, K, N, target, device)
            log(f"[{i + 1}/{len(jobs)}] {job.kernel} block_r={job.block_r} dropout={job.dropout}")
        return rows
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_worker, job, M, K, N, target, str(device)) for job in jobs]
        for i, future in enumerate(futures):
            rows += future.result()
            log(f"[{i + 1}/{len(jobs)}] {jobs[i].kernel} block_r={jobs[i].block_r} dropout={jobs[i].dropout}")
    return rows


def spills(row) -> bool:
    """Registers spilled to local memory: ptxas puts spills in the stack frame, read back with LDL/STL."""
    return any(int(row[column]) > 0 for column in ("local_bytes", "stack_bytes", "spill_instructions"))


def violations(rows) -> list:
    """Findings that fail the report: spills in a config that can launch, a GEMM kernel without HGMMA."""
    found = []
    for row in rows:
        where = f"{row['kernel']} [{row['config']}] dtype={row['dtype']} block_r={row['block_r']} " \
                f"dropout={row['dropout']}"
        if row["status"] != "ok":
            found.append(f"{where}: does not compile: {row['status']}")
            continue
        if str(row["can_launch"]) != "True":
            continue
        if spills(row):
            found.append(f"{where}: spills ({row['registers']} registers, {row['stack_bytes']} B stack, "
                         f"{row['local_bytes']} B local, {row['spill_instructions']} LDL/STL instructions)")
        if row["role"] == "gemm" and int(row["hgmma"]) == 0:
            found.append(f"{where}: no HGMMA in the SASS ({row['hmma']} HMMA): not on Hopper's wgmma path")
    return found


# --- output ------------------------------------------------------------------------------------------

def lora_share_section(header: dict, ranks=(1, 16, 64), r_max=64) -> list:
    """Markdown lines: the adapter's share of the matrix work at `ranks`, useful and as the fused kernels run it."""
    import torch

    from .providers import LayerShape, lora_share

    lines = ["", f"## The adapter's share of the matrix work (adapter width {r_max})", "",
             "The kernels read the rank on the device and are sized by the adapter width, so one compiled graph "
             "serves every rank; their rank tiles run in full, so a low rank costs what its tile costs. Share of "
             "forward + backward matrix work at the shape above (`bench.providers.lora_share`):", "",
             "| rank | useful (LoRA at rank r) | executed by the fused kernels |", "|---:|---:|---:|"]
    for rank in ranks:
        shape = LayerShape(int(header["M"]), int(header["K"]), int(header["N"]), rank, torch.bfloat16, r_max)
        lines.append(f"| {rank} | {lora_share('addmm', shape, 'fwd+bwd'):.2%} "
                     f"| {lora_share('fused', shape, 'fwd+bwd'):.2%} |")
    return lines


def markdown(rows, header: dict) -> str:
    lines = ["# Hopper (sm_90) compile report", "",
             f"Compiled without a GPU for `{header['target']}` with Triton {header['triton']}, "
             f"ptxas {header['ptxas']}; kernels sha256 `{header['kernels_sha256']}`, commit `{header['commit']}`, "
             f"{header['date']} (the commit is marked -dirty when kernels/ had uncommitted changes). "
             f"Shape: M={header['M']}, K={header['K']}, N={header['N']}. "
             f"Generated by `python -m bench.compile_report` from the CSV next to this file.", "",
             "A config *can launch* when its shared memory fits 227 KiB and its registers fit the register file; "
             "only those can be chosen by the autotuner. A config spills when ptxas gives it a stack frame or local "
             "memory, read and written with LDL/STL instructions. Compile seconds are near zero where Triton's "
             "on-disk cache already held the kernel.", "",
             "## Summary per kernel", "",
             "| kernel | role | configs compiled | pruned by the autotuner | can launch | max registers "
             "| spilling configs (can launch) | HGMMA in configs that can launch | HMMA only |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    kernels = sorted({row["kernel"] for row in rows})
    for name in kernels:
        mine = [row for row in rows if row["kernel"] == name and row["status"] == "ok"]
        ok = [row for row in mine if str(row["can_launch"]) == "True"]
        spilling = [row for row in ok if spills(row)]
        with_hgmma = [row for row in ok if int(row["hgmma"]) > 0]
        hmma_only = [row for row in ok if int(row["hgmma"]) == 0 and int(row["hmma"]) > 0]
        role = mine[0]["role"] if mine else "?"
        max_regs = max((int(row["registers"]) for row in mine), default=0)
        pruned = max((int(row["pruned_configs"] or 0) for row in mine), default=0)
        lines.append(f"| `{name}` | {role} | {len(mine)} | up to {pruned} per launch | {len(ok)} | {max_regs} "
                     f"| {len(spilling)} "
                     f"| {len(with_hgmma)}/{len(ok)} | {len(hmma_only)} |")
    found = violations(rows)
    lines += ["", "## Findings", ""]
    lines += [f"- {v}" for v in found] or ["- none: no config that can launch spills, and every GEMM kernel "
                                           "uses HGMMA."]
    cannot = [row for row in rows if row["status"] == "ok" and str(row["can_launch"]) != "True"]
    for row in cannot:
        lines.append(f"- cannot launch on sm_90 (autotune skips it): `{row['kernel']}` [{row['config']}] "
                     f"block_r={row['block_r']}: {int(row['dynamic_shared_bytes']) + int(row['static_shared_bytes'])} "
                     f"B shared memory, {row['registers']} registers x {32 * int(row['num_warps'])} threads")
    lines += lora_share_section(header)
    lines += ["", "## Every compile", "",
              "| kernel | dtype | adapters | block_r | dropout | config | regs | stack B | local B | LDL/STL "
              "| shared B | can launch | HGMMA | HMMA | compile s |",
              "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| `{row['kernel']}` | {row['dtype']} | {row['adapter_dtype']} | {row['block_r']} "
                         f"| {row['dropout']} | {row['config']} | {row['status']} ||||||||")
            continue
        shared = int(row["dynamic_shared_bytes"]) + int(row["static_shared_bytes"])
        lines.append(f"| `{row['kernel']}` | {row['dtype']} | {row['adapter_dtype']} | {row['block_r']} "
                     f"| {row['dropout']} | {row['config']} "
                     f"| {row['registers']} | {row['stack_bytes']} | {row['local_bytes']} "
                     f"| {row['spill_instructions']} | {shared} "
                     f"| {row['can_launch']} | {row['hgmma']} | {row['hmma']} | {row['compile_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="all", choices=["all", "first-fit", "chosen"],
                        help="all autotune configs; per kernel the first that can launch; or those a GPU run "
                             "chose (--chosen)")
    parser.add_argument("--chosen", default=None, help="autotune choices CSV written by bench/gpu_check")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--adapter-dtypes", nargs="+", default=["same", "fp32"],
                        help="dtypes of A and B: 'same' as x (layer benchmarks) and fp32 (autocast training)")
    parser.add_argument("--weight-layouts", nargs="+", default=["in_out", "out_in"],
                        help="W as Conv1D stores it (in_out) and as nn.Linear does (out_in, read transposed)")
    parser.add_argument("--M", type=int, default=GPT2["M"])
    parser.add_argument("--K", type=int, default=GPT2["K"])
    parser.add_argument("--N", type=int, default=GPT2["N"])
    parser.add_argument("--jobs", type=int, default=1, help="compile processes")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--name", default="compile-sm90", help="output file stem")
    args = parser.parse_args(argv)

    from .launches import require_compiled_kernels

    require_compiled_kernels()
    import triton

    if args.configs == "chosen" and not args.chosen:
        parser.error("--configs chosen needs --chosen <autotune CSV from bench/gpu_check>")
    chosen = chosen_configs(args.chosen) if args.chosen else None
    shape = dict(M=args.M, K=args.K, N=args.N)
    # Stamped before compiling: the sources read at import are the ones compiled.
    header = {"target": "cuda sm_90 (GPUTarget('cuda', 90, 32))", "triton": triton.__version__,
              "ptxas": ptxas_version(), "kernels_sha256": kernels_sha256(), "commit": commit(("kernels",)),
              "date": utc_now(),
              **shape}
    adapter_dtypes = [None if d == "same" else parse_dtype(d) for d in args.adapter_dtypes]
    jobs = plan(args.ranks, [parse_dtype(d) for d in args.dtypes], args.dropouts, mode=args.configs,
                chosen=chosen, adapter_dtypes=adapter_dtypes, weight_layouts=args.weight_layouts, **shape)
    print(f"{len(jobs)} kernel specializations, {sum(len(j.config_indices) for j in jobs)} configs at most")
    rows = compile_all(jobs, workers=args.jobs, **shape, log=lambda line: print(line, flush=True))
    full = []
    for row in rows:
        base = {column: "" for column in COLUMNS}
        base.update({k: v for k, v in header.items() if k in COLUMNS})
        base.update(row)
        full.append(base)
    out_dir = Path(args.out_dir)
    csv_path = write_csv(out_dir / f"{args.name}.csv", full, COLUMNS)
    md_path = write_text(out_dir / f"{args.name}.md", markdown(full, header))
    print(f"wrote {csv_path} and {md_path}")
    found = violations(full)
    for line in found:
        print(f"FINDING: {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
