"""Markdown tables and PNG plots, generated from result CSV files only.

A results file of ``bench/gpu_check`` holds every benchmark, one row per
measurement, with a ``bench`` column (layer, rank_sweep, memory, e2e,
autotune); files of a single benchmark module are read too. Nothing here
measures anything. CPU results are headed "CPU timings" and their speed
targets are not judged.

    python -m bench.report bench/results/nvidia-h200-2026-01-01.csv       # writes the .md and PNGs beside it
    python -m bench.report --readme                                       # refresh bench/README.md's results
"""

import argparse
import math
import os
import re
from collections import defaultdict
from pathlib import Path

from hybrid_lora.io.atomic import write_text

from .record import REPO_ROOT, RESULTS_DIR, read_csv

README = REPO_ROOT / "bench" / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
BENCHES = ("layer", "rank_sweep", "memory", "e2e", "checkpointing", "autotune")
PROVIDER_ORDER = ("base", "peft", "addmm", "compiled", "fused", "peft+accelerate")
MODE_ORDER = ("fwd", "bwd", "fwd+bwd")
TARGET_DTYPE, TARGET_M = "bf16", 8192
TARGET_GPT2_KN = (768, 2304)  # the shape the layer targets name; other shapes are reported, not judged


def _bench_of(row, path):
    if row.get("bench"):
        return row["bench"]
    columns = set(row)
    if "provider" in columns and "mode" in columns:
        return "layer"
    if "predicted_variants" in columns:
        return "rank_sweep"
    if "saved_bytes" in columns:
        return "memory"
    if "checkpointing" in columns:
        return "checkpointing"
    if "pipeline" in columns:
        return "e2e"
    raise ValueError(f"{path}: cannot tell which benchmark a row with columns {sorted(columns)} comes from")


def load(paths) -> dict:
    """{bench: rows} from result CSV files."""
    results = defaultdict(list)
    for path in paths:
        for row in read_csv(path):
            results[_bench_of(row, path)].append(row)
    return dict(results)


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value, digits=3):
    value = _num(value)
    if math.isnan(value):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


def is_cpu(rows) -> bool:
    return any("CPU" in row.get("timer", "") or row.get("device", "").startswith("CPU") for row in rows)


def _header(rows) -> str:
    devices = sorted({row["device"] for row in rows})
    commits = sorted({row["commit"] for row in rows})
    dates = sorted({row["date"] for row in rows})
    label = "**CPU timings**, not comparable with GPU timings. " if is_cpu(rows) else ""
    return f"{label}Device: {', '.join(devices)}; commit {', '.join(commits)}; {dates[0]} to {dates[-1]}."


# --- tables --------------------------------------------------------------------------------------

def layer_markdown(rows) -> str:
    out = []
    groups = sorted({(row["dtype"], int(row["M"]), int(row["K"]), int(row["N"])) for row in rows},
                    key=lambda g: (g[0] != TARGET_DTYPE, g[0], g[1]))
    for dtype, M, K, N in groups:
        mine = [row for row in rows if (row["dtype"], int(row["M"]), int(row["K"]), int(row["N"])) == (dtype, M, K, N)]
        out += [f"**{dtype}, M = {M}, K = {K}, N = {N}**: median ms (ratio to `base`); TFLOP/s and GB/s "
                "(traffic model) of fwd+bwd", "",
                "| r | provider | fwd | bwd | fwd+bwd | TFLOP/s | GB/s |", "|---:|---|---:|---:|---:|---:|---:|"]
        by_key = {(int(row["r"]), row["provider"], row["mode"]): row for row in mine}
        ranks = sorted({int(row["r"]) for row in mine})
        for r in ranks:
            for provider in PROVIDER_ORDER:
                cells = []
                for mode in MODE_ORDER:
                    row = by_key.get((r, provider, mode))
                    if row is None:
                        cells.append(None)
                    elif row["status"] != "ok":
                        cells.append(row["status"][:60])
                    else:
                        cells.append(f"{_fmt(row['median_ms'], 4)} ({_fmt(row['ratio_to_base'], 3)}x)")
                if all(cell is None for cell in cells):
                    continue
                both = by_key.get((r, provider, "fwd+bwd"), {})
                out.append(f"| {r} | {provider} | " + " | ".join(cell or "-" for cell in cells) +
                           f" | {_fmt(both.get('tflops'))} | {_fmt(both.get('gbps'))} |")
        out.append("")
    return "\n".join(out)


def rank_sweep_markdown(rows) -> str:
    out = ["| r | rank bucket | mode | median ms | compiled variants | predicted variants |",
           "|---:|---:|---|---:|---:|---:|"]
    for row in sorted(rows, key=lambda row: (row["mode"], int(row["r"]))):
        out.append(f"| {row['r']} | {row['block_r']} | {row['mode']} | {_fmt(row['median_ms'], 4)} "
                   f"| {_fmt(row['compiled_variants'])} | {_fmt(row['predicted_variants'])} |")
    notes = sorted({row["note"] for row in rows if row.get("note")})
    return "\n".join(out + [""] + [f"Note: {note}." for note in notes])


def memory_markdown(rows) -> str:
    out = ["| provider | M | K | N | r | dtype | dropout | saved bytes | / (X + S) | saved tensors "
           "| peak fwd+bwd bytes |",
           "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|"]
    for row in rows:
        out.append(f"| {row['provider']} | {row['M']} | {row['K']} | {row['N']} | {row['r']} | {row['dtype']} "
                   f"| {row['dropout']} | {int(row['saved_bytes']):,} | {_fmt(row['saved_over_x_plus_s'])} "
                   f"| {row['saved_tensors']} | {_fmt(row['peak_fwd_bwd_bytes'])} |")
    return "\n".join(out)


def checkpointing_markdown(rows) -> str:
    out = ["| model | seq | batch | r | dtype | dropout | checkpointing | peak fwd+bwd bytes | / without "
           "| max grad diff |", "|---|---:|---:|---:|---|---:|---|---:|---:|---:|"]
    for row in rows:
        out.append(f"| {row['model']} | {row['seq_len']} | {row['batch']} | {row['r']} | {row['dtype']} "
                   f"| {row['dropout']} | {row['checkpointing']} | {_fmt(row['peak_fwd_bwd_bytes'])} "
                   f"| {_fmt(row['peak_over_plain'])} | {_fmt(row['max_grad_diff'])} |")
    return "\n".join(out)


def e2e_markdown(rows) -> str:
    out = ["| pipeline | model | seq | batch | ms/step | tokens/s | peak memory bytes | projected stage s "
           "| speedup vs original |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["status"] != "ok":
            out.append(f"| {row['pipeline']} | {row['model']} | {row['seq_len']} | {row['batch']} | {row['status']} "
                       "|||||")
            continue
        out.append(f"| {row['pipeline']} | {row['model']} | {row['seq_len']} | {row['batch']} "
                   f"| {_fmt(row['step_ms'], 4)} | {_fmt(row['tokens_per_s'], 4)} | {_fmt(row['peak_mem_bytes'])} "
                   f"| {_fmt(row['projected_stage_s'], 4)} | {_fmt(row['speedup_vs_original'])} |")
    return "\n".join(out)


def autotune_markdown(rows) -> str:
    out = ["| kernel | autotune key | chosen config |", "|---|---|---|"]
    out += [f"| `{row['kernel']}` | {row['key']} | {row['config']} |" for row in rows]
    return "\n".join(out)


# --- targets ---------------------------------------------------------------------------------------

def _verdict(ok):
    return "met" if ok else "**not met**"


def targets(results) -> list:
    """[(target, measured, verdict)] for the issue's targets that the results can judge."""
    found = []
    layer = [row for row in results.get("layer", []) if row["status"] == "ok"]
    cpu_layer = is_cpu(layer)
    at = {(row["provider"], row["mode"], int(row["r"])): row for row in layer
          if row["dtype"] == TARGET_DTYPE and int(row["M"]) == TARGET_M
          and (int(row["K"]), int(row["N"])) == TARGET_GPT2_KN}

    def speed(target, measured, ok):
        found.append((target, measured, "n/a: CPU timing" if cpu_layer else _verdict(ok)))

    for r, bound in ((64, 1.10), (16, 1.05)):
        row = at.get(("fused", "fwd", r))
        if row:
            ratio = _num(row["ratio_to_base"])
            speed(f"fused fwd <= {bound:.2f}x base at r = {r} ({TARGET_DTYPE}, M = {TARGET_M})", f"{ratio:.3f}x",
                  ratio <= bound)
    for peer, bound, strict in (("peft", 2.0, False), ("addmm", 1.3, False), ("compiled", 1.0, True)):
        for r in sorted({key[2] for key in at if key[0] == "fused"}):
            fused, other = at.get(("fused", "fwd+bwd", r)), at.get((peer, "fwd+bwd", r))
            if fused and other:
                gain = _num(other["median_ms"]) / _num(fused["median_ms"])
                word = "faster than" if strict else f">= {bound:.1f}x faster than"
                speed(f"fused fwd+bwd {word} {peer} at r = {r}", f"{gain:.2f}x",
                      gain > bound if strict else gain >= bound)
    # Llama-7B's projections (nn.Linear layout): LoRAFusion reports 1.27x over peft at K >= 4096.
    llama = {(row["provider"], int(row["N"])): row for row in layer
             if row["dtype"] == TARGET_DTYPE and int(row["M"]) == TARGET_M and int(row["K"]) == 4096
             and int(row["r"]) in (0, 16) and row["mode"] == "fwd+bwd"}
    for N in sorted({key[1] for key in llama}):
        fused, peft = llama.get(("fused", N)), llama.get(("peft", N))
        if fused and peft:
            gain = _num(peft["median_ms"]) / _num(fused["median_ms"])
            speed(f"fused fwd+bwd >= 1.4x faster than peft at K = 4096, N = {N}, r = 16", f"{gain:.2f}x",
                  gain >= 1.4)
    sweep = results.get("rank_sweep", [])
    if sweep:
        from .rank_sweep import recompiles_within_buckets

        mode = sweep[0]["mode"]
        mine = [row for row in sweep if row["mode"] == mode]
        measured = [row for row in mine if not math.isnan(_num(row["compiled_variants"]))]
        if measured:
            bad = recompiles_within_buckets(measured, "compiled_variants")
            found.append(("no recompile within a rank bucket (compiled)", f"new variants at r = {bad}" if bad else
                          "none", _verdict(not bad)))
        bad = recompiles_within_buckets(mine, "predicted_variants")
        found.append(("no recompile within a rank bucket (predicted from JIT keys)",
                      f"new variants at r = {bad}" if bad else "none", _verdict(not bad)))
    e2e = [row for row in results.get("e2e", []) if row["status"] == "ok"]
    cpu_e2e = is_cpu(e2e)
    for seq in sorted({int(row["seq_len"]) for row in e2e}):
        by = {row["pipeline"]: _num(row["step_ms"]) for row in e2e if int(row["seq_len"]) == seq}
        for ours in ("ours-engine", "ours-layer"):
            for peer, bound in (("original", 3.0), ("peft-bf16", 1.3)):
                if ours in by and peer in by:
                    gain = by[peer] / by[ours]
                    found.append((f"end to end {ours} >= {bound:.1f}x faster than {peer}, seq {seq}", f"{gain:.2f}x",
                                  "n/a: CPU timing" if cpu_e2e else _verdict(gain >= bound)))
    for row in results.get("memory", []):
        if row["provider"] == "fused":
            ratio = _num(row["saved_over_x_plus_s"])
            found.append((f"fused saved activations <= X + S with dropout {row['dropout']} ({row['dtype']}, "
                          f"M = {row['M']}, r = {row['r']})", f"{ratio:.3f} (X + S)", _verdict(ratio <= 1.0)))
    return found


def targets_markdown(results) -> str:
    rows = targets(results)
    if not rows:
        return "No result here can judge a target."
    return "\n".join(["| target | measured | verdict |", "|---|---|---|"] +
                     [f"| {t} | {m} | {v} |" for t, m, v in rows])


# --- plots -------------------------------------------------------------------------------------------

def plots(results, out_dir, stem, log=print) -> list:
    """PNG plots beside the markdown; none (and one line saying so) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e .[plots]): no plots drawn")
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = out_dir / f"{stem}-{name}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
        plt.close(fig)
        written.append(path)

    cpu_note = " (CPU timings)"
    layer = [row for row in results.get("layer", []) if row["status"] == "ok"]
    if layer:
        groups = sorted({(row["dtype"], int(row["M"])) for row in layer})
        fig, axes = plt.subplots(len(groups), len(MODE_ORDER), figsize=(4.2 * len(MODE_ORDER), 3.2 * len(groups)),
                                 squeeze=False)
        for i, (dtype, M) in enumerate(groups):
            for j, mode in enumerate(MODE_ORDER):
                ax = axes[i][j]
                for provider in PROVIDER_ORDER[1:]:
                    points = sorted((int(row["r"]), _num(row["ratio_to_base"])) for row in layer
                                    if (row["dtype"], int(row["M"]), row["mode"], row["provider"])
                                    == (dtype, M, mode, provider))
                    if points:
                        ax.plot(*zip(*points), marker="o", label=provider)
                ax.axhline(1.0, color="gray", linewidth=0.8)
                ax.set_title(f"{dtype} M={M} {mode}", fontsize=9)
                ax.set_xlabel("rank r")
                ax.set_ylabel("time / base")
        axes[0][0].legend(fontsize=8)
        fig.suptitle("LoRA layer time relative to the frozen GEMM" + (cpu_note if is_cpu(layer) else ""))
        fig.tight_layout()
        save(fig, "layer")
    sweep = results.get("rank_sweep", [])
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for mode in sorted({row["mode"] for row in sweep}):
            points = sorted((int(row["r"]), _num(row["median_ms"])) for row in sweep if row["mode"] == mode)
            ax.plot(*zip(*points), marker=".", label=mode)
        for edge in (16.5, 32.5):
            ax.axvline(edge, color="gray", linestyle=":", linewidth=0.8)
        ax.set_xlabel("rank r (dotted: rank buckets)")
        ax.set_ylabel("fused layer, median ms")
        ax.set_title("Rank sweep" + (cpu_note if is_cpu(sweep) else ""))
        ax.legend(fontsize=8)
        fig.tight_layout()
        save(fig, "rank-sweep")
    e2e = [row for row in results.get("e2e", []) if row["status"] == "ok"]
    if e2e:
        seqs = sorted({int(row["seq_len"]) for row in e2e})
        pipelines = list(dict.fromkeys(row["pipeline"] for row in e2e))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(pipelines)
        for k, name in enumerate(pipelines):
            values = [next((_num(row["tokens_per_s"]) for row in e2e if row["pipeline"] == name
                            and int(row["seq_len"]) == seq), math.nan) for seq in seqs]
            ax.bar([i + k * width for i in range(len(seqs))], values, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(seqs))], [f"seq {s}" for s in seqs])
        ax.set_ylabel("training tokens/s")
        ax.set_title("End-to-end training throughput" + (cpu_note if is_cpu(e2e) else ""))
        ax.legend(fontsize=8)
        fig.tight_layout()
        save(fig, "e2e")
    return written


# --- documents ---------------------------------------------------------------------------------------

SECTIONS = (("layer", "Layer microbenchmarks", layer_markdown),
            ("rank_sweep", "Rank sweep (fused layer)", rank_sweep_markdown),
            ("memory", "Saved activations per layer call", memory_markdown),
            ("e2e", "End-to-end training", e2e_markdown),
            ("checkpointing", "Activation checkpointing: one training step", checkpointing_markdown),
            ("autotune", "Configs the autotuner chose", autotune_markdown))


def markdown(results, title, images=(), heading="#") -> str:
    every = [row for rows in results.values() for row in rows]
    out = [f"{heading} {title}", "", _header(every), "",
           f"{heading}# Targets", "", targets_markdown(results), ""]
    for key, name, render in SECTIONS:
        if results.get(key):
            out += [f"{heading}# {name}", "", render(results[key]), ""]
    out += [f"![{Path(image).stem}]({Path(image).name})" for image in images]
    return "\n".join(out).rstrip() + "\n"


def write_report(csv_paths, md_path, title=None, log=print) -> Path:
    results = load(csv_paths)
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    images = plots(results, md_path.parent, md_path.stem, log=log)
    return write_text(md_path, markdown(results, title or md_path.stem, images))


_RESULT_FILE = re.compile(r"^(?P<device>.+)-(?P<date>\d{4}-\d{2}-\d{2})\.csv$")


def gpu_result_files(results_dir=RESULTS_DIR) -> list:
    """Committed gpu_check results (``<device>-<date>.csv``) that come from a GPU, oldest first."""
    files = []
    for path in sorted(Path(results_dir).glob("*.csv")):
        match = _RESULT_FILE.match(path.name)
        if not match or match["device"].startswith("cpu"):
            continue
        rows = read_csv(path)
        if rows and "bench" in rows[0] and not is_cpu(rows):
            files.append(path)
    return sorted(files, key=lambda p: _RESULT_FILE.match(p.name)["date"])


def readme_section(results_dir=RESULTS_DIR, readme_dir=README.parent) -> str:
    files = gpu_result_files(results_dir)
    if not files:
        return ("No GPU result has been committed yet, so there is no performance table: nothing here has been "
                "timed on a GPU. Run `bench/gpu_check` on a CUDA machine and commit `bench/results/` to fill it. "
                "The Hopper compile report (`bench/results/compile-sm90.md`: registers, spills, shared memory and "
                "HGMMA of every kernel config, compiled for sm_90 without a GPU) is real.")
    latest = files[-1]
    results = load([latest])
    body = markdown(results, "Latest GPU results", heading="###").split("\n", 2)[2]
    pngs = [Path(results_dir) / f"{latest.stem}-{name}.png" for name in ("layer", "rank-sweep", "e2e")]
    images = [f"![{png.stem}]({os.path.relpath(png, readme_dir)})" for png in pngs if png.exists()]
    return (f"Generated by `python -m bench.report --readme` from `bench/results/{latest.name}` "
            f"(the latest of {len(files)} GPU result file(s)).\n\n{body}" + "\n".join(images))


def update_readme(readme=README, results_dir=RESULTS_DIR) -> Path:
    text = Path(readme).read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no '{BEGIN}' ... '{END}' markers to put the results between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    section = readme_section(results_dir, Path(readme).resolve().parent)
    return write_text(readme, f"{head}{BEGIN}\n{section}\n{END}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="*", help="result CSV files")
    parser.add_argument("--md", default=None, help="markdown path (default: the first CSV with .md)")
    parser.add_argument("--readme", nargs="*", default=None, metavar="README",
                        help=f"refresh the results section between {BEGIN} and {END} of these files "
                             "(default: bench/README.md)")
    args = parser.parse_args(argv)
    if args.readme is not None:
        for readme in args.readme or [README]:
            print(f"updated {update_readme(readme)}")
    if args.csv:
        md = args.md or Path(args.csv[0]).with_suffix(".md")
        print(f"wrote {write_report(args.csv, md)}")
    if args.readme is None and not args.csv:
        parser.error("give result CSV files, --readme, or both")


if __name__ == "__main__":
    main()
