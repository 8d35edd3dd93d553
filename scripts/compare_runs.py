"""How a run differs from another: the accuracy and loss matrices side by side, and what each ran on.

    python scripts/compare_runs.py runs/default/hybrid/seed-42 results/default/hybrid/seed-42

Each argument is a run folder (holding config.json and metrics.json). Prints,
for every (stage, domain) of R, both values and their difference, then the
largest absolute difference of each matrix and the versions and commit each
run's config.json records. Exits with status 2, naming the folder, when a run
is missing or the two runs evaluated other stages or domains.
"""

import argparse
import json
import sys
from pathlib import Path


def load(folder):
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"compare_runs: {str(folder)!r} is not a finished run folder ({err}); "
                         "expected config.json and metrics.json as hybrid-lora train writes them")
    return config, metrics


def matrix_rows(name, mine, theirs, domains):
    """Lines of one matrix (R[stage][domain]) side by side, and its largest absolute difference."""
    lines, largest = [f"{name}: stage, domain, first, second, first - second"], 0.0
    for stage, (row_a, row_b) in enumerate(zip(mine, theirs)):
        for domain, a, b in zip(domains, row_a, row_b):
            if a is None or b is None:
                continue
            largest = max(largest, abs(a - b))
            lines.append(f"  {stage}  {domain:<14} {a:.6f}  {b:.6f}  {a - b:+.2e}")
    lines.append(f"  largest |difference| of {name}: {largest:.2e}")
    return lines, largest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", help="a run folder, e.g. runs/default/hybrid/seed-42")
    parser.add_argument("second", help="the run folder to compare it with, e.g. results/default/hybrid/seed-42")
    args = parser.parse_args(argv)
    try:
        return compare(args)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2


def compare(args):
    (config_a, metrics_a), (config_b, metrics_b) = load(args.first), load(args.second)
    domains = config_a["data"]["domains"]
    if domains != config_b["data"]["domains"] or len(metrics_a["accuracy"]) != len(metrics_b["accuracy"]):
        raise ValueError(f"compare_runs: {args.first!r} ran domains {domains} over {len(metrics_a['accuracy'])} "
                         f"rows of R; {args.second!r} ran {config_b['data']['domains']} over "
                         f"{len(metrics_b['accuracy'])}: expected the same")
    for key in ("accuracy", "loss"):
        lines, _ = matrix_rows(key, metrics_a[key], metrics_b[key], domains)
        print("\n".join(lines))
    for label, config in (("first", config_a), ("second", config_b)):
        versions = config.get("versions", {})
        described = ", ".join(f"{name} {value}" for name, value in versions.items())
        print(f"{label}: {described or 'no versions recorded'}")
        if "commit" not in versions:
            print(f"{label}: no commit recorded (a run folder from before run folders recorded it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
