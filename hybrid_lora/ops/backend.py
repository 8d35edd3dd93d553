"""One place that decides whether an op runs the Triton kernels or the PyTorch path.

Triton runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1``
(set before Triton is imported). ``HYBRID_LORA_BACKEND=triton|torch`` forces
one path; forcing Triton where it cannot run is an error, not a fallback.

The op asks ``chosen_backend`` on every call, and the answer is decided once
per device type, at the first call, and kept: the call path reads no
environment and finds no module spec, and ``torch.compile`` takes the answer
as a constant (``assume_constant_result``) instead of tracing the decision,
which calls functions Dynamo refuses (``importlib.util.find_spec`` on torch
2.11). Code that changes ``HYBRID_LORA_BACKEND`` while it runs (the command
line, tests) calls ``refresh()`` after the change. Graphs already compiled
keep the path they were traced with.
"""

import importlib.util
import os

import torch

from hybrid_lora.kernels.interpreter import interpreter_enabled

BACKENDS = ("triton", "torch")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def forced_backend():
    """The backend named by ``HYBRID_LORA_BACKEND``, or None when it is unset."""
    value = os.environ.get("HYBRID_LORA_BACKEND", "").strip().lower()
    if value == "":
        return None
    if value not in BACKENDS:
        raise ValueError(f"HYBRID_LORA_BACKEND={value!r}: expected one of {BACKENDS} or unset")
    return value


def triton_can_run(device: torch.device) -> bool:
    return triton_installed() and (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()))


def select_backend(device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`, decided now from the environment."""
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "triton" and not triton_can_run(device):
        if not triton_installed():
            raise RuntimeError("HYBRID_LORA_BACKEND=triton but triton is not installed")
        raise RuntimeError(
            f"HYBRID_LORA_BACKEND=triton but the tensors are on {device.type!r}: Triton runs on CUDA "
            "devices, or on the CPU only with TRITON_INTERPRET=1 set before triton is imported"
        )
    return "triton" if triton_can_run(device) else "torch"


_CHOSEN: dict = {}  # device type -> (backend, whether HYBRID_LORA_BACKEND named it)


@torch.compiler.assume_constant_result
def chosen_backend(device_type: str) -> tuple:
    """(backend, forced) for tensors on `device_type`: ``select_backend`` at the first call, then kept."""
    choice = _CHOSEN.get(device_type)
    if choice is None:
        choice = (select_backend(torch.device(device_type)), forced_backend() is not None)
        _CHOSEN[device_type] = choice
    return choice


def refresh():
    """Forget the kept choices: the next call decides again from the environment."""
    _CHOSEN.clear()
