"""The committed results: portable (no path of the machine they ran on), and the README's tables equal to what
the repository's own script makes of them (in docs/)."""

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


def test_docs_tables_equal_the_committed_metrics():
    table = _results_table()
    for start, end, make in table.SECTIONS:
        path = table.holder(ROOT / "docs", start)
        text = path.read_text(encoding="utf-8")
        assert end in text, f"{path.name} lacks the marker {end}"
        shown = text.split(start, 1)[1].split(end, 1)[0].strip()
        assert shown == make(ROOT / "results", path.parent).strip(), (
            f"docs/{path.name} between {start} and {end} differs from the committed results; "
            "run python scripts/results_table.py --docs docs")


def test_the_quick_study_repeats_the_full_studys_runs():
    quick, full = RESULTS / "study-quick", RESULTS / "study"
    runs = sorted(quick.glob("*/a-b-c/seed-42/metrics.json"))
    if not runs or not full.is_dir():
        pytest.skip("no committed study")
    for path in runs:
        twin = full / path.relative_to(quick)
        assert json.loads(path.read_text())["accuracy"] == json.loads(twin.read_text())["accuracy"], path


def test_compare_runs_shows_a_run_equal_to_its_twin_and_refuses_a_missing_folder(capsys):
    spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "scripts" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main_run, twin = RESULTS / "default" / "hybrid" / "seed-42", RESULTS / "default" / "compare" / "hybrid" / "seed-42"
    if not main_run.is_dir() or not twin.is_dir():
        pytest.skip("no committed default runs")
    assert module.main([str(main_run), str(twin)]) == 0
    printed = capsys.readouterr().out
    assert "largest |difference| of accuracy: 0.00e+00" in printed and "torch 2.13.0+cpu" in printed
    assert module.main([str(main_run), str(RESULTS / "no-such-run")]) == 2
    assert "no-such-run' is not a finished run folder" in capsys.readouterr().err
