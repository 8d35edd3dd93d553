"""What every result row carries (device, commit, date) and how result files are written.

Result files are plain CSV: one row per measurement, the same columns in every
row. They are written to a temporary file and renamed, so a reader never sees
half a file. Tables and plots are generated from these files only (``bench/report.py``).
"""

import csv
import datetime
import io
import os
import platform
import re
from pathlib import Path

import torch

from hybrid_lora.io.atomic import write_text
from hybrid_lora.versions import source_revision

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"

# Paths whose uncommitted changes make a measurement not reproducible from the commit alone.
_CODE_PATHS = ("kernels", "hybrid_lora", "bench")


def pick_device(name=None) -> torch.device:
    """The device named by `name`, or CUDA when available, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine; expected 'cpu' or no device")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device {name!r}: expected 'cuda', 'cuda:<index>' or 'cpu'")
    return device


def device_name(device: torch.device) -> str:
    """A human name of the device the timings come from; CPU names say 'CPU' plainly."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} threads)"


def slug(text: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': a file-name-safe form of a device name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def commit(paths=_CODE_PATHS) -> str:
    """The commit, with '-dirty' when `paths` (the code under measurement) have uncommitted changes."""
    return source_revision(paths)


def without_local_paths(text: str) -> str:
    """`text` with this checkout's root and the Python installation's folders written as placeholders."""
    import sys

    for path, name in sorted({(str(REPO_ROOT), "."), (sys.prefix, "<python>"), (sys.base_prefix, "<python>"),
                              (str(Path.home()), "~")}, key=lambda pair: -len(pair[0])):
        text = text.replace(path + "/", "" if name == "." else name + "/").replace(path, name)
    return text


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stamp(device: torch.device) -> dict:
    """The columns every row carries: device, commit, date."""
    return {"device": device_name(device), "commit": commit(), "date": utc_now()}


def write_csv(path, rows: list[dict], columns: list[str]) -> Path:
    """Write `rows` (dicts with exactly `columns` as keys) as CSV, atomically."""
    for i, row in enumerate(rows):
        if set(row) != set(columns):
            missing, extra = sorted(set(columns) - set(row)), sorted(set(row) - set(columns))
            raise ValueError(f"row {i} of {path}: missing columns {missing}, unexpected columns {extra}")
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, text.getvalue())


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype}: expected one of {list(DTYPES.values())}")
