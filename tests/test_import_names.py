"""Nothing in the repository shadows an installed package when commands run from the clone.

``python -m pytest``, ``python -m hybrid_lora`` and ``torchrun -m hybrid_lora`` put the repository
root first on ``sys.path``. transformers >= 5.25 requires Hugging Face's ``kernels`` and imports it at
start-up, so the root's ``kernels/`` folder (the Triton kernels, installed as ``hybrid_lora.kernels``)
must be a namespace portion, never a regular package. Where the real ``kernels`` is not installed (the
GPU image's transformers 5.17), a stand-in distribution in a temporary site folder plays its part.
"""

import importlib.metadata as metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Enough of Hugging Face's `kernels` for transformers' start-up: any name it imports is a callable that
# accepts anything and whose attributes are callables of the same kind.
STAND_IN = textwrap.dedent('''
    """A stand-in for Hugging Face's `kernels` (tests only)."""
    STAND_IN = True


    class _Anything:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            return _Anything()

        def __getattr__(self, name):
            return _Anything()

        def __or__(self, other):
            return self

        __ror__ = __or__


    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()
''')


def site_with_kernels(tmp_path):
    """PYTHONPATH entries under which `kernels` is an installed distribution: none when the real one is."""
    try:
        metadata.version("kernels")
        return []
    except metadata.PackageNotFoundError:
        pass
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(STAND_IN)
    info = site / "kernels-0.19.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    (info / "top_level.txt").write_text("kernels\n")
    return [str(site)]


def run_from_root(code, extra_path, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(extra_path + [os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_transformers_gpt2_and_the_kernels_import_together_from_the_repository_root(tmp_path):
    run = run_from_root(textwrap.dedent("""
        import kernels
        from transformers import GPT2LMHeadModel
        import hybrid_lora.kernels.lora_forward, hybrid_lora.kernels.lora_backward
        from hybrid_lora import inject_lora
        print("kernels from", kernels.__file__)
        print("ours from", hybrid_lora.kernels.lora_forward.__file__)
    """), site_with_kernels(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    found = dict(line.split(" from ", 1) for line in run.stdout.splitlines())
    # A virtual environment may live inside the clone (CI makes .venv/ there); what matters is
    # that `kernels` is the installed distribution, not the repository's kernels/ folder.
    assert not Path(found["kernels"]).resolve().is_relative_to(ROOT / "kernels"), found
    assert Path(found["ours"]).resolve() == ROOT / "kernels" / "lora_forward.py"


def test_the_kernels_folder_is_no_regular_package():
    assert (ROOT / "kernels").is_dir() and not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "hybrid_lora" / "kernels").resolve() == ROOT / "kernels"


def test_no_installed_distribution_owns_a_name_the_repository_root_provides():
    """A regular package at the root (``bench``) would shadow an installed one of the same name, as
    ``kernels`` did; folders without ``__init__.py`` (``kernels``, ``scripts``, ``tests``) cannot."""
    ours = {path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file()}
    ours |= {path.stem for path in ROOT.glob("*.py")}
    owners = metadata.packages_distributions()
    clashes = {name: owners[name] for name in ours if name in owners
               and set(owners[name]) != {"hybrid-lora"} and set(owners[name]) != {"hybrid_lora"}}
    assert ours >= {"bench", "hybrid_lora"}
    assert not clashes, f"installed distributions own names the repository root shadows: {clashes}"


def test_the_readme_layout_names_every_package_and_module():
    """The README's layout table matches the tree: every sub-package and every module of it is named."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.splitlines() if line.startswith("| `")}
    packages = [p for p in (ROOT / "hybrid_lora").iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    packages.append(ROOT / "kernels")
    for package in packages:
        folder = f"{package.relative_to(ROOT)}/"
        assert folder in rows, f"README's layout has no row for {folder}"
        for module in package.glob("*.py"):
            if module.name != "__init__.py":
                assert f"`{module.name}`" in rows[folder], f"README's layout row {folder} does not name {module.name}"
