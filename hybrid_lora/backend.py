"""One place that decides whether an op runs the Triton kernels or the PyTorch path.

Triton runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1``
(set before Triton is imported). ``HYBRID_LORA_BACKEND=triton|torch`` forces
one path; forcing Triton where it cannot run is an error, not a fallback.
"""

import importlib.util
import os

import torch

BACKENDS = ("triton", "torch")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


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
    """'triton' or 'torch' for tensors on `device`."""
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
