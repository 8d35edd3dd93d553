"""The tested torch/Triton range: stated once in pyproject.toml and hybrid_lora.versions, warned about at import."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import hybrid_lora
from hybrid_lora import versions

ROOT = Path(__file__).resolve().parents[1]


def test_release_reads_local_and_dev_versions():
    assert versions.release("2.13.0+cpu") == (2, 13, 0)
    assert versions.release("3.10.0.dev20260101") == (3, 10, 0)
    assert versions.release("3.6") == (3, 6, 0)
    with pytest.raises(ValueError, match="'nightly'"):
        versions.release("nightly")


def test_untested_names_the_installed_version_and_the_tested_range():
    assert versions.untested({"torch": "2.11.0", "triton": "3.6.0"}) == []
    assert versions.untested({"torch": "2.14.1", "triton": "3.9.0"}) == []
    (message,) = versions.untested({"torch": "2.13.0+cpu", "triton": "3.5.1"})
    assert "triton 3.5.1" in message and ">=3.6,<3.10" in message and "torch 2.13.0+cpu" in message
    assert versions.untested({"torch": "2.15.0", "triton": "3.9.0"}) == []
    (message,) = versions.untested({"torch": "2.16.0", "triton": "3.9.0"})
    assert "torch 2.16.0" in message and ">=2.11,<2.16" in message
    assert len(versions.untested({"torch": "2.10.0", "triton": "3.10.0"})) == 2
    assert versions.untested({"torch": "2.13.0", "triton": None}) == []


def _import_with(triton_version):
    code = ("import importlib.metadata as md, warnings\n"
            "real = md.version\n"
            f"md.version = lambda name: {triton_version!r} if name == 'triton' else real(name)\n"
            "warnings.simplefilter('always')\n"
            "import hybrid_lora\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_import_warns_with_a_triton_outside_the_range():
    run = _import_with("3.5.0")
    assert run.returncode == 0, run.stderr
    assert "UntestedVersionWarning" in run.stderr and "triton 3.5.0" in run.stderr and ">=3.6,<3.10" in run.stderr


def test_this_stack_is_inside_the_tested_range():
    """Every stack CI runs must lie inside the range it claims: importing here warns about nothing."""
    assert versions.untested(versions.installed()) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", versions.UntestedVersionWarning)
        versions.warn_if_untested()


def test_pyproject_states_the_lower_ends_and_no_upper_pin():
    """A newer torch than the tested ones installs (and warns at import) instead of being downgraded."""
    tomllib = pytest.importorskip("tomllib")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in versions.TESTED:
        (spec,) = [d for d in dependencies if d.split(">")[0].split(";")[0].strip() == name]
        assert spec.split(";")[0].strip() == name + versions.lower_bound(name), spec


def test_source_revision_names_the_clone_or_the_release(monkeypatch):
    described = subprocess.run(["git", "describe", "--always"], cwd=ROOT, capture_output=True, text=True)
    if described.returncode == 0:
        assert versions.source_revision().removesuffix("-dirty") == described.stdout.strip()

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert versions.source_revision() == f"hybrid-lora {hybrid_lora.__version__}"
