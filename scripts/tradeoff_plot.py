"""Draw the learning-vs-forgetting plot of the committed two-domain runs (Biderman et al., 2024, "LoRA Learns
Less and Forgets Less", compare methods on this plane rather than by forgetting alone).

    python scripts/tradeoff_plot.py [--results results] [--out results/tradeoff.png]

One marker per comparison variant (mean ± std over its seeds, from summary.json) and per single run of the
sweep the defaults were chosen from (results/defaults-sweep). x: accuracy lost on the first domain by the end;
y: accuracy on the last domain at the end.
"""

import argparse
import json
from pathlib import Path

from hybrid_lora.experiments.plots import plot_tradeoff


def _load(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def collect(results):
    points = []
    for summary_path in sorted(Path(results).glob("*/compare/summary.json")):
        summary = _load(summary_path)
        last = summary["domains"][-1]
        for variant, row in summary["table"].items():
            f, n = row["forgetting"], row[f"acc_{last}_final"]
            points.append({"label": f"{summary_path.parent.parent.name}: {variant} ({len(f['values'])} seeds)",
                           "forgetting": (f["mean"], f["std"]), "new": (n["mean"], n["std"])})
    for metrics_path in sorted(Path(results).glob("defaults-sweep/*/seed-*/metrics.json")):
        metrics = _load(metrics_path)
        acc = metrics["accuracy"]
        points.append({"label": f"sweep: {metrics_path.parent.parent.name} (seed {metrics['seed']})",
                       "forgetting": (acc[0][0] - acc[-1][0], None), "new": (acc[-1][-1], None)})
    return points


def main():
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(root / "results"))
    parser.add_argument("--out", default=str(root / "results" / "tradeoff.png"))
    args = parser.parse_args()
    points = collect(args.results)
    if not points:
        raise SystemExit(f"no comparison or sweep runs under {args.results}")
    print(plot_tradeoff(points, args.out))


if __name__ == "__main__":
    main()
