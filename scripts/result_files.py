"""Reading the committed results: JSON files, folder names as the repository gives them, `/usr/bin/time -v`
reports. Shared by the scripts that write the docs' tables."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def label(path):
    """The folder as the repository names it (results/...), whatever the current directory."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


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
