"""The committed results: portable (no path of the machine they ran on), and the README's tables equal to what
the repository's own script makes of them."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield key
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def _run_files():
    return sorted(p for p in RESULTS.rglob("*.json") if p.name in ("config.json", "metrics.json", "summary.json"))


def test_committed_runs_record_no_absolute_path():
    files = _run_files()
    if not files:
        pytest.skip("no committed results")
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        bad = [s for s in _strings(data) if s.startswith(("/", "~")) or s[1:3] in (":\\", ":/")]
        assert not bad, f"{path.relative_to(ROOT)} records machine paths: {bad[:3]}"
        for key in ("train_config", "config"):
            if isinstance(data.get(key), dict) and "model_name" in data[key]:
                name = data[key]["model_name"]
                assert name in ("embedded", "gpt2") or not Path(name).is_absolute(), f"{path}: model {name!r}"


def _results_table():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_equal_the_committed_metrics():
    table = _results_table()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for start, end, make in table.SECTIONS:
        assert start in readme and end in readme, f"README.md lacks the markers {start} ... {end}"
        shown = readme.split(start, 1)[1].split(end, 1)[0].strip()
        assert shown == make(ROOT / "results", ROOT).strip(), (
            f"README.md between {start} and {end} differs from the committed results; "
            "run python scripts/results_table.py --readme README.md")


def test_the_quick_study_repeats_the_full_studys_runs():
    quick, full = RESULTS / "study-quick", RESULTS / "study"
    runs = sorted(quick.glob("*/a-b-c/seed-42/metrics.json"))
    if not runs or not full.is_dir():
        pytest.skip("no committed study")
    for path in runs:
        twin = full / path.relative_to(quick)
        assert json.loads(path.read_text())["accuracy"] == json.loads(twin.read_text())["accuracy"], path
