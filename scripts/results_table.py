"""Write the README's results section from a committed run's metrics.json and a comparison's summary.json.

    python scripts/results_table.py [--results results/embedded-default] [--readme README.md]

Prints the section; with --readme, replaces the text between the markers
``<!-- experiment:start -->`` and ``<!-- experiment:end -->`` in that file. Every
number comes from the JSON files; nothing is typed in by hand.
"""

import argparse
import json
import os
from pathlib import Path

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
        f"`{metrics['variant']}` (DyLoRA {config['dylora']}, lambda_order {config['lambda_order']:g}, "
        f"lambda_DC {config['lambda_dc']:g}), seed {metrics['seed']}, base `{metrics['model']}`, "
        f"{data['train_examples']} training and {data['eval_examples']} eval examples per domain, "
        f"lr {config['lr']:g}, {config['epochs']} epochs per stage, batch {config['batch_size']}, "
        f"r_max {config['r_max']}, Stage 2 rank schedule {' -> '.join(map(str, config['rank_schedule']))}; "
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
        cells = []
        for key in columns:
            stats = row[key]
            cells.append("n/a" if stats["mean"] is None else
                         f"{stats['mean']:.4f}" + (f" ± {stats['std']:.4f}" if stats["std"] is not None else ""))
        seeds = max(len(s["values"]) for s in row.values())
        lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + " |")
    lines.append("")
    if (compare_dir / "comparison.png").is_file():
        lines += [f"![comparison]({rel}/comparison.png)", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--results", default=str(root / "results" / "embedded-default"))
    parser.add_argument("--readme", default=None, help="a Markdown file whose results markers to fill")
    args = parser.parse_args()
    results = Path(args.results)
    base = Path(args.readme).resolve().parent if args.readme else Path.cwd()
    parts = []
    # Shortest folder names first: the main run ("hybrid") before its variations.
    for run_dir in sorted(results.glob("*/seed-*"), key=lambda p: (len(p.parent.name), str(p))):
        if (run_dir / "metrics.json").is_file() and not (run_dir.parent / "summary.json").is_file():
            parts.append(run_section(run_dir, os.path.relpath(run_dir, base)))
    for compare_dir in sorted(p.parent for p in results.glob("*/summary.json")):
        parts.append(compare_section(compare_dir, os.path.relpath(compare_dir, base)))
    section = "\n".join(parts)
    print(section)
    if args.readme:
        text = Path(args.readme).read_text(encoding="utf-8")
        if START not in text or END not in text:
            raise SystemExit(f"{args.readme}: no {START} ... {END} markers to fill")
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        tmp = Path(args.readme).with_suffix(".tmp")
        tmp.write_text(f"{head}{START}\n{section}\n{END}{tail}", encoding="utf-8")
        os.replace(tmp, args.readme)


if __name__ == "__main__":
    main()
