"""Write the docs' result sections from the committed runs' metrics.json and the comparisons' summary.json.

    python scripts/results_table.py [--docs docs]

Prints the sections; with --docs, replaces the text between each pair of
markers (``SECTIONS``: the runs and comparisons, the default's four conditions,
the sweep the defaults were chosen from, the continual study) in the Markdown
file of that folder that holds them, with links relative to it. Every number
comes from the JSON files under results/; nothing is typed in by hand. The CI
test tests/test_committed_results.py checks that the docs equal what this makes.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules, however it is loaded

from hybrid_lora.experiments import study  # noqa: E402
from hybrid_lora.experiments.summary import cell  # noqa: E402
from hybrid_lora.io.atomic import write_text  # noqa: E402
from result_files import cpu_seconds, cpu_wall_seconds, label, load  # noqa: E402
from sampler_tables import ranks_section  # noqa: E402

START, END = "<!-- experiment:start -->", "<!-- experiment:end -->"


def run_section(run_dir, rel):
    metrics = load(run_dir / "metrics.json")
    data = load(run_dir / "config.json")["data"]
    config = metrics["config"]
    a, b = metrics["domains"]
    acc, loss, initial = metrics["accuracy"], metrics["loss"], metrics["initial"]
    lines = [
        f"#### `{label(run_dir)}`",
        "",
        f"`{metrics['variant']}` (DyLoRA {config['dylora']}, scale {config.get('scale_rule', 'alpha/r')}, "
        f"lambda_order {config['lambda_order']:g}, "
        f"lambda_DC {config['lambda_dc']:g}), seed {metrics['seed']}, base `{metrics['model']}`, "
        f"{data['train_examples']} training and {data['eval_examples']} eval examples per domain, "
        f"lr {config['lr']:g}, {config['epochs']} epochs per stage, batch {config['batch_size']}, "
        f"r_max {config['r_max']}, Stage 2 rank schedule {' -> '.join(map(str, config['rank_schedule'])) or 'none'}; "
        f"{metrics['wall_seconds'] / 60:.1f} min on `{metrics['device']}` "
        f"({metrics['tokens_per_second']:.0f} training tokens/s).",
        "",
        f"| eval on | before training | after Stage 1 ({a}) | after Stage 2 ({b}) |",
        "|---|---|---|---|",
    ]
    for i, name in enumerate((a, b)):
        lines.append(f"| {name}: loss | {initial[i]['loss']:.4f} | {loss[0][i]:.4f} | {loss[1][i]:.4f} |")
        lines.append(f"| {name}: accuracy | {initial[i]['accuracy']:.4f} | {acc[0][i]:.4f} | {acc[1][i]:.4f} |")
    lines += [
        "",
        f"Retention of {a}: {metrics['retention'][0]:.4f} (accuracy after Stage 2 / after Stage 1); "
        f"forgetting {metrics['forgetting'][0]:.4f} accuracy; loss change {metrics['loss_change'][0]:+.4f}; "
        f"BWT {metrics['bwt']:+.4f}.",
        "",
    ]
    sweeps = metrics["rank_sweep"]
    ranks = sorted({int(r) for s in sweeps for r in s["by_rank"]})
    if ranks:
        params = metrics["params_per_rank"]
        lines += ["Rank sweep (the trained adapter evaluated at lower ranks, no retraining):", "",
                  "| rank | trainable params | " + " | ".join(f"{s['domain']} acc after Stage {s['stage'] + 1}"
                                                      for s in sweeps) + " |",
                  "|---|---|" + "---|" * len(sweeps)]
        for r in ranks:
            cells = [f"{s['by_rank'][str(r)]['accuracy']:.4f}" if str(r) in s["by_rank"] else "" for s in sweeps]
            lines.append(f"| {r} | {params.get(str(r), ''):,} | " + " | ".join(cells) + " |")
        lines.append("")
    for name in metrics.get("plots", []):
        lines.append(f"![{name}]({rel}/plots/{name})")
    lines.append("")
    return "\n".join(lines)


def compare_section(compare_dir, rel):
    summary = load(compare_dir / "summary.json")
    table, columns = summary["table"], summary["columns"]
    lines = [f"#### `{label(compare_dir)}`", "", "Comparison (mean ± sample standard deviation over seeds; "
             "forgetting = accuracy on the first domain lost by the end):", "",
             "| variant | seeds | " + " | ".join(columns.values()) + " |",
             "|---|---|" + "---|" * len(columns)]
    for variant, row in table.items():
        cells = [cell(row[key]) for key in columns]
        seeds = max(len(s["values"]) for s in row.values())
        lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + " |")
    lines.append("")
    if summary.get("curve_columns"):
        lines += ["The rank-quality curve (see above):", "",
                  "| variant | " + " | ".join(summary["curve_columns"].values()) + " |",
                  "|---|" + "---|" * len(summary["curve_columns"])]
        lines += [f"| {variant} | " + " | ".join(cell(row[key], 2) for key in summary["curve_columns"]) + " |"
                  for variant, row in table.items()]
        lines.append("")
    if (compare_dir / "comparison.png").is_file():
        lines += [f"![comparison]({rel}/comparison.png)", ""]
    if (compare_dir / "rank-curve.png").is_file():
        lines += [f"![rank curve]({rel}/rank-curve.png)", ""]
    return "\n".join(lines)


RUN_FOLDERS = ("default",)


def experiment_section(results, base):
    """Each run folder and comparison under results/<RUN_FOLDERS>, with links relative to `base`."""
    parts = []
    for folder in RUN_FOLDERS:
        root = Path(results) / folder
        # Shortest folder names first: the main run ("hybrid") before its variations.
        for run_dir in sorted(root.glob("*/seed-*"), key=lambda p: (len(p.parent.name), str(p))):
            if (run_dir / "metrics.json").is_file() and not (run_dir.parent / "summary.json").is_file():
                parts.append(run_section(run_dir, os.path.relpath(run_dir, base)))
        for compare_dir in sorted(p.parent for p in root.glob("*/summary.json")):
            parts.append(compare_section(compare_dir, os.path.relpath(compare_dir, base)))
    return "\n".join(parts)


def _gains(metrics):
    """(gain on A in Stage 1, gain on B in Stage 2, gain on B over the base, forgetting of A, rank-16 gap)."""
    acc, initial = metrics["accuracy"], metrics["initial"]
    sweep = metrics["rank_sweep"][0]["by_rank"]
    gap = abs(sweep["16"]["accuracy"] - sweep["64"]["accuracy"]) if "16" in sweep and "64" in sweep else None
    return (acc[0][0] - initial[0]["accuracy"], acc[1][1] - acc[0][1], acc[1][1] - initial[1]["accuracy"],
            acc[0][0] - acc[1][0], gap)


def _spread(compare_dir, variant):
    """max - min of the forgetting over a comparison's seeds of `variant`, and the seeds."""
    values = load(compare_dir / "summary.json")["table"][variant]["forgetting"]["values"]
    return max(values) - min(values), len(values)


def conditions_section(results, base):
    """The plain default run against lora_only, condition by condition."""
    root = Path(results) / "default"
    ours_dir, theirs_dir = root / "hybrid" / "seed-42", root / "lora_only" / "seed-42"
    if not (ours_dir / "metrics.json").is_file() or not (theirs_dir / "metrics.json").is_file():
        return "No committed run of the default and of lora_only yet."
    ours, theirs = _gains(load(ours_dir / "metrics.json")), _gains(load(theirs_dir / "metrics.json"))
    rows = ["| condition | default (`hybrid-lora train`) | `--variant lora_only` | required | met |",
            "|---|---|---|---|---|"]

    def row(name, value, reference, required, met):
        rows.append(f"| {name} | {value} | {reference} | {required} | {'yes' if met else 'no'} |")

    row("gain on A in Stage 1", f"{ours[0]:+.4f}", f"{theirs[0]:+.4f}", f">= {0.8 * theirs[0]:+.4f} (80 %)",
        ours[0] >= 0.8 * theirs[0])
    row("gain on B in Stage 2 (after Stage 1 -> after Stage 2)", f"{ours[1]:+.4f}", f"{theirs[1]:+.4f}",
        f">= {0.8 * theirs[1]:+.4f} (80 %)", ours[1] >= 0.8 * theirs[1])
    row("gain on B over the base (before training -> after Stage 2)", f"{ours[2]:+.4f}", f"{theirs[2]:+.4f}",
        f">= {0.8 * theirs[2]:+.4f} (80 %)", ours[2] >= 0.8 * theirs[2])
    compare_dir = root / "compare"
    if (compare_dir / "summary.json").is_file():
        variants = load(compare_dir / "summary.json")["table"]
        spreads = {v: _spread(compare_dir, v) for v in ("hybrid", "lora_only") if v in variants}
        spread = max(s for s, _ in spreads.values())
        seeds = min(n for _, n in spreads.values())
        title = (f"forgetting of A (accuracy lost in Stage 2); spread = largest max - min over {seeds} seeds of "
                 f"{' and '.join(sorted(spreads))} in `{label(compare_dir)}`")
        required = f"< {theirs[3] - spread:.4f} (lora_only minus spread {spread:.4f})"
        if seeds < 3:
            rows.append(f"| {title} | {ours[3]:.4f} | {theirs[3]:.4f} | {required} | not judged: {seeds} seed(s) |")
        else:
            row(title, f"{ours[3]:.4f}", f"{theirs[3]:.4f}", required, ours[3] < theirs[3] - spread)
            mean = {v: variants[v]["forgetting"]["mean"] for v in spreads}
            row(f"the same, mean over the {seeds} seeds of `{label(compare_dir)}`", f"{mean['hybrid']:.4f}",
                f"{mean['lora_only']:.4f}", f"< {mean['lora_only'] - spread:.4f}",
                mean["hybrid"] < mean["lora_only"] - spread)
    if ours[4] is not None:
        row("after Stage 1, abs(acc at rank 16 - acc at rank 64) on A", f"{ours[4]:.4f}",
            f"{theirs[4]:.4f}" if theirs[4] is not None else "", "<= 0.005", ours[4] <= 0.005)
    rows.append("")
    rows.append(f"Runs: `{label(ours_dir)}` and `{label(theirs_dir)}`.")
    for run_dir in (ours_dir, theirs_dir):
        cpu = cpu_seconds(run_dir.parent / "cpu-time.txt")
        if cpu is not None:
            rows.append(f"`{label(run_dir.parent)}`: {load(run_dir / 'metrics.json')['wall_seconds'] / 60:.1f} min "
                        f"wall on a shared machine, {cpu / 60:.1f} min of CPU time (user + system, "
                        f"`{label(run_dir.parent / 'cpu-time.txt')}`, from `/usr/bin/time -v`).")
    return "\n".join(rows)


def sweep_section(results, base):
    """One row per run under results/defaults-sweep: the settings tried and what they gave."""
    runs = sorted((Path(results) / "defaults-sweep").glob("*/seed-*/metrics.json"))
    if not runs:
        return "No sweep committed."
    lines = ["| run | DyLoRA | scale | lambda_DC | lambda_order | lr | examples | gain A (Stage 1) | "
             "gain B (Stage 2) | gain B over the base | forgetting A | rank 16 vs 64 on A |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in runs:
        metrics = load(path)
        config, data = metrics["config"], load(path.parent / "config.json")["data"]
        gain_a, gain_b, over_base, forget, gap = _gains(metrics)
        name = path.parent.parent.name
        lines.append(f"| `{name}` | {config['dylora']} | {config['scale_rule']} | "
                     f"{config['lambda_dc']:g} | {config['lambda_order']:g} | {config['lr']:g} | "
                     f"{data['train_examples']}/{data['eval_examples']} | {gain_a:+.4f} | {gain_b:+.4f} | {over_base:+.4f} | "
                     f"{forget:.4f} | {'' if gap is None else f'{gap:.4f}'} |")
    return "\n".join(lines)


def study_section(results, base, folder="study", matrices=True):
    """A study's tables (with `matrices`, its mean R matrices too), made again from its runs' metrics.json
    (``hybrid_lora.experiments.study``), and the CPU time of it and of its quick form (``<folder>-quick``)."""
    root = Path(results) / folder
    if not (root / "study.json").is_file():
        return "No study committed."
    stored = load(root / "study.json")
    plan = study.PLANS[stored["plan"]]
    table = study.summarise(plan, study.collect(plan, root), study.collect_curves(plan, root))
    finished = sum((run.folder(root) / "metrics.json").is_file() for run in study.runs(plan, root))
    lines = [f"From `{label(root)}`: {finished} runs, {plan.train_examples} training and "
             f"{plan.eval_examples} eval examples per domain, seeds {', '.join(map(str, plan.seeds))}; "
             "mean ± sample standard deviation over seeds.", "", study.markdown(plan, table, matrices)]
    for where in (folder, f"{folder}-quick"):
        path = Path(results) / where / "cpu-time.txt"
        if path.is_file():
            jobs = load(path.with_name("command.json"))["argv"]
            jobs = jobs[jobs.index("--jobs") + 1] if "--jobs" in jobs else "1"
            lines.append(f"`{label(path)}`: {cpu_wall_seconds(path) / 60:.1f} min wall with `--jobs {jobs}` on the "
                         f"2-core CPU machine, {cpu_seconds(path) / 60:.1f} min of CPU time (user + system).")
            lines.append("")
    if (root / "pareto.png").is_file():
        lines.append(f"![forgetting against new-domain accuracy]({os.path.relpath(root, base)}/pareto.png)")
    return "\n".join(lines)


SECTIONS = [
    ("<!-- experiment:start -->", "<!-- experiment:end -->", experiment_section),
    ("<!-- ranks:start -->", "<!-- ranks:end -->", ranks_section),
    ("<!-- conditions:start -->", "<!-- conditions:end -->", conditions_section),
    ("<!-- sweep:start -->", "<!-- sweep:end -->", sweep_section),
    ("<!-- study:start -->", "<!-- study:end -->", study_section),
    ("<!-- samplers-study:start -->", "<!-- samplers-study:end -->",
     lambda results, base: study_section(results, base, "study-samplers", matrices=False)),
]


def fill(text, start, end, section):
    if start not in text or end not in text:
        raise SystemExit(f"no {start} ... {end} markers to fill")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{section}\n{end}{tail}"


def holder(docs, start):
    """The Markdown file under `docs` that holds the marker `start`."""
    found = [p for p in sorted(Path(docs).glob("*.md")) if start in p.read_text(encoding="utf-8")]
    if len(found) != 1:
        raise SystemExit(f"{start}: expected one file under {docs} to hold it, found {[str(p) for p in found]}")
    return found[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--results", default=str(root / "results"))
    parser.add_argument("--docs", default=None, help="a folder whose Markdown files' markers to fill")
    args = parser.parse_args()
    for start, end, make in SECTIONS:
        if args.docs is None:
            print(make(Path(args.results), Path.cwd()))
            continue
        path = holder(args.docs, start)
        text = fill(path.read_text(encoding="utf-8"), start, end, make(Path(args.results), path.resolve().parent))
        write_text(path, text)
        print(f"filled {start} in {path}")


if __name__ == "__main__":
    main()
