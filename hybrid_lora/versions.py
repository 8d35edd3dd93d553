"""The torch and Triton releases the package is tested with, and the warning given at import outside them.

``.ci/run`` tests both ends of each range. ``pyproject.toml`` states only the
lower ends: a newer release installs, with one warning at import, instead of a
resolver downgrading (or refusing) the torch a user already has. Another
release may work; nothing has checked it.
"""

import importlib.metadata
import re
import subprocess
import warnings
from pathlib import Path

# [lowest, first untested) release of each, as (major, minor)
TESTED = {"torch": ((2, 11), (2, 16)), "triton": ((3, 6), (3, 10))}


class UntestedVersionWarning(UserWarning):
    """An installed torch or Triton outside the tested range."""


def release(version: str) -> tuple:
    """'2.13.0+cpu' -> (2, 13, 0); '3.10.0.dev20260101' -> (3, 10, 0)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"version {version!r}: expected a release like '3.6.0'")
    return tuple(int(part or 0) for part in match.groups())


def range_text(name: str) -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = TESTED[name]
    return f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"


def lower_bound(name: str) -> str:
    """The requirement ``pyproject.toml`` states for `name`: the tested range's lower end, e.g. '>=2.11'."""
    major, minor = TESTED[name][0]
    return f">={major}.{minor}"


def untested(versions: dict) -> list:
    """Messages for the packages of `versions` ({name: version or None}) outside their tested range."""
    messages = []
    for name, version in versions.items():
        if version is None:
            continue
        low, high = TESTED[name]
        if not low <= release(version)[:2] < high:
            others = ", ".join(f"{other} {v}" for other, v in versions.items() if other != name and v)
            messages.append(f"hybrid_lora is tested with {name} {range_text(name)}, but {name} {version} is "
                            f"installed (with {others}): the kernels and benchmarks may fail on it; docs/install.md "
                            "lists the tested releases")
    return messages


def installed() -> dict:
    """{'torch': version, 'triton': version or None}, read from the installed distributions."""
    import torch

    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {"torch": torch.__version__, "triton": triton}


def warn_if_untested():
    for message in untested(installed()):
        warnings.warn(message, UntestedVersionWarning, stacklevel=3)


# The package's code: what '-dirty' is about. Results written into the clone's results/ (as the
# committed runs are) change tracked files too, and must not mark the run that writes them.
PACKAGE_PATHS = ("hybrid_lora", "kernels", "pyproject.toml")


def source_revision(paths=PACKAGE_PATHS) -> str:
    """Which code made a result: ``git describe --always`` of the clone the package runs from, with
    '-dirty' when tracked files under `paths` have uncommitted changes; 'hybrid-lora <version>' when
    the package is not run from a git clone."""
    root = Path(__file__).resolve().parents[1]

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            raise ValueError("installed inside another repository")
        head = git("describe", "--always")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    except (OSError, ValueError, subprocess.CalledProcessError):
        from hybrid_lora import __version__

        return f"hybrid-lora {__version__}"
    return head + ("-dirty" if dirty else "")
