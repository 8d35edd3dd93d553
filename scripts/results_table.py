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
import json
import os
from pathlib import Path

from hybrid_lora.experiments import study
from hybrid_lora.experiments.summary import cell, mean_std
from hybrid_lora.io.atomic import write_text
from hybrid_lora.train.config import TrainConfig
from hybrid_lora.train.rank_curve import rank_curves

START, END = "<!-- experiment:start -->", "<!-- experiment:end -->"


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def label(path):
    """The folder as the repository names it (results/...), whatever the current directory."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


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


def _time_report(path):
    """The fields of a `/usr/bin/time -v` report: {name: value}."""
    return dict(line.strip().split(": ", 1) for line in Path(path).read_text().splitlines() if ": " in line)


def cpu_seconds(path):
    """User + system seconds from a `/usr/bin/time -v` report, or None if there is none."""
    if not Path(path).is_file():
        return None
    fields = _time_report(path)
    return float(fields["User time (seconds)"]) + float(fields["System time (seconds)"])


def cpu_wall_seconds(path):
    """Elapsed seconds from a `/usr/bin/time -v` report."""
    clock = _time_report(path)["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
    return sum(float(part) * 60 ** i for i, part in enumerate(reversed(clock)))


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


def study_section(results, base):
    """The continual study's tables, made again from its runs' metrics.json (``hybrid_lora.experiments.study``)."""
    root = Path(results) / "study"
    if not (root / "study.json").is_file():
        return "No study committed."
    stored = load(root / "study.json")
    plan = study.PLANS[stored["plan"]]
    table = study.summarise(plan, study.collect(plan, root), study.collect_curves(plan, root))
    finished = sum((run.folder(root) / "metrics.json").is_file() for run in study.runs(plan, root))
    lines = [f"From `{label(root)}`: {finished} runs, {plan.train_examples} training and "
             f"{plan.eval_examples} eval examples per domain, seeds {', '.join(map(str, plan.seeds))}; "
             "mean ± sample standard deviation over seeds.", "", study.markdown(plan, table)]
    timings = sorted(Path(results).glob("study*/cpu-time*.txt"),
                     key=lambda path: (path.parent.name, path.name != "cpu-time.txt"))
    for path in timings:
        lines.append(f"`{label(path)}`: {cpu_wall_seconds(path) / 60:.1f} min wall with `--jobs 2` on the 2-core "
                     f"CPU machine, {cpu_seconds(path) / 60:.1f} min of CPU time (user + system).")
        lines.append("")
    if (root / "pareto.png").is_file():
        lines.append(f"![forgetting against new-domain accuracy]({os.path.relpath(root, base)}/pareto.png)")
    return "\n".join(lines)


# The samplers compared for the default: today's runs of the default command (results/default/compare) and
# one folder per --dylora mode under results/rank-sweep; lora_only is the reference for learning and forgetting.
TABLE_RANKS = (1, 2, 4, 8, 16, 64)


def _sampler_runs(results):
    """[(mode, folder, [metrics of each seed])]: nested from results/default/compare, the others from
    results/rank-sweep/<mode>."""
    root = Path(results)
    found = [("nested", root / "default" / "compare" / "hybrid")]
    found += [(p.name, p) for p in sorted((root / "rank-sweep").glob("*")) if p.is_dir() and p.name != "nested"]
    out = []
    for mode, folder in found:
        runs = [load(p) for p in sorted(folder.glob("seed-*/metrics.json"))]
        if runs:
            out.append((mode, folder, runs))
    return out


def _mean(values):
    return mean_std(values)["mean"]


def _curves(metrics):
    return rank_curves(metrics)


def _rank_cells(runs, stage):
    """Mean over seeds of the loss and gain kept at TABLE_RANKS after `stage`, as 'loss (gain)' cells."""
    cells = []
    for r in TABLE_RANKS:
        losses, gains = [], []
        for metrics in runs:
            curve = _curves(metrics)[stage]
            if r in curve["ranks"]:
                i = curve["ranks"].index(r)
                losses.append(curve["loss"][i])
                gains.append(curve["loss_gain_kept"][i])
        cells.append(f"{_mean(losses):.3f} ({_mean(gains):+.2f})" if losses else "-")
    return cells


def ranks_section(results, base):
    """The rank-quality curve of each sampler, and the default's targets sampler by sampler."""
    samplers = _sampler_runs(results)
    lora_only = [load(p) for p in sorted((Path(results) / "default" / "compare" / "lora_only").glob(
        "seed-*/metrics.json"))]
    if not samplers or not lora_only:
        return "No rank sweep committed."
    default = TrainConfig.dylora
    initial = samplers[0][2][0]["initial"]

    def title(mode):
        return f"`{mode}` (default)" if mode == default else f"`{mode}`"

    lines = ["Eval loss at each rank, mean over seeds, with its gain kept in brackets "
             "((base - at rank r) / (base - at the stage's final rank)); the base model scores "
             f"{initial[0]['loss']:.3f} on A and {initial[1]['loss']:.3f} on B:", "",
             "| sampler | seeds | after | " + " | ".join(f"rank {r}" for r in TABLE_RANKS) + " |",
             "|---|---|---|" + "---|" * len(TABLE_RANKS)]
    for mode, folder, runs in [*samplers, ("lora_only", None, lora_only)]:
        for stage, where in ((0, "Stage 1, on A"), (1, "Stage 2, on B")):
            lines.append(f"| {title(mode)} | {len(runs)} | {where} | " + " | ".join(_rank_cells(runs, stage)) + " |")
    lines += ["", "What each sampler gives, mean ± std over seeds (gain on B: accuracy after Stage 2 minus the "
              "base's, "
              "as a share of lora_only's; forgetting: accuracy on A lost in Stage 2; worst rank: the lowest gain "
              "kept of any swept rank after either stage, in loss; CPU time: user + system from `/usr/bin/time -v` "
              "(`cpu-time*.txt`; for nested and lora_only, their seed-42 run in `results/default`); wall time "
              "on a 2-core machine shared with other jobs, so an upper bound):", "",
              "| sampler | seeds | top-rank loss A (Stage 1) | top-rank loss B (Stage 2) | gain on B vs lora_only | "
              "forgetting A | worst rank's gain kept | AURAC A | AURAC B | CPU min per run | wall min per run |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]

    def gain_b(m):
        return m["accuracy"][1][1] - m["initial"][1]["accuracy"]

    def forgetting(m):
        return m["accuracy"][0][0] - m["accuracy"][1][0]

    def pm(values, digits=4):
        return cell(mean_std(values), digits)

    reference_gain = _mean([gain_b(m) for m in lora_only])
    stats = {}
    for mode, folder, runs in [*samplers, ("lora_only", None, lora_only)]:
        # The comparison of today's default timed no run; its seed-42 run alone was (results/default/<variant>).
        timed = folder if folder and folder.parent.name != "compare" else Path(results) / "default" / (
            "hybrid" if mode == "nested" else mode)
        cpu = [cpu_seconds(p) for p in sorted(timed.glob("cpu-time*.txt"))]
        curves = [_curves(m) for m in runs]
        row = stats[mode] = {
            "top_a": [m["loss"][0][0] for m in runs], "top_b": [m["loss"][1][1] for m in runs],
            "gain_b": [gain_b(m) / reference_gain for m in runs], "forgetting": [forgetting(m) for m in runs],
            "worst": [min(c["loss_worst_gain_kept"] for c in cs) for cs in curves],
            "above_base": [max(max(c["loss"]) - c["loss_base"] for c in cs) for cs in curves],
            "r1": [min(c["loss_gain_kept"][0] for c in cs) for cs in curves],
            "r4": [min(c["loss_gain_kept"][c["ranks"].index(4)] for c in cs) for cs in curves],
            "aurac_a": [cs[0]["loss_aurac"] for cs in curves], "aurac_b": [cs[1]["loss_aurac"] for cs in curves],
        }
        cells = [pm(row["top_a"]), pm(row["top_b"]), pm(row["gain_b"], 2), pm(row["forgetting"]),
                 pm(row["worst"], 2), pm(row["aurac_a"], 2), pm(row["aurac_b"], 2),
                 f"{_mean(cpu) / 60:.1f}" if cpu else "-", f"{_mean([m['wall_seconds'] for m in runs]) / 60:.1f}"]
        lines.append(f"| {title(mode)} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "The targets, mean over seeds after both stages (each the worse of the two stages; spread: max - min "
              "of today's default's top-rank loss over its seeds):", "",
              "| sampler | no rank worse than the base (highest loss of any rank minus the base's <= 0) | "
              "rank 4 keeps >= 90 % | "
              "rank 1 keeps >= 50 % | top-rank loss no more than today's spread above today's (A, B) | "
              "learns >= 80 % of lora_only's gain on B | forgets no more than lora_only |",
              "|---|---|---|---|---|---|---|"]
    today, reference = stats["nested"], stats["lora_only"]

    def check(text, ok):
        return f"{text}: {'yes' if ok else 'no'}"

    for mode, _, _ in samplers:
        row = {key: _mean(values) for key, values in stats[mode].items()}
        spread = {k: max(today[k]) - min(today[k]) for k in ("top_a", "top_b")}
        moved = {k: row[k] - _mean(today[k]) for k in ("top_a", "top_b")}
        top = ", ".join(f"{moved[k]:+.4f} (spread {spread[k]:.4f})" for k in ("top_a", "top_b"))
        forgets = f"{row['forgetting']:.4f} vs {_mean(reference['forgetting']):.4f}"
        cells = [check(f"{row['above_base']:+.4f}", row["above_base"] <= 0),
                 check(f"{row['r4']:.2f}", row["r4"] >= 0.9),
                 check(f"{row['r1']:+.2f}", row["r1"] >= 0.5),
                 check(top, all(moved[k] <= spread[k] for k in moved)),  # lower is better: one-sided
                 check(f"{row['gain_b']:.2f}", row["gain_b"] >= 0.8),
                 check(forgets, row["forgetting"] <= _mean(reference["forgetting"]))]
        lines.append(f"| {title(mode)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SECTIONS = [
    ("<!-- experiment:start -->", "<!-- experiment:end -->", experiment_section),
    ("<!-- ranks:start -->", "<!-- ranks:end -->", ranks_section),
    ("<!-- conditions:start -->", "<!-- conditions:end -->", conditions_section),
    ("<!-- sweep:start -->", "<!-- sweep:end -->", sweep_section),
    ("<!-- study:start -->", "<!-- study:end -->", study_section),
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
