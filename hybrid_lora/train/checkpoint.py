"""Checkpoints of a continual run: one safetensors file, written whole or not at all, checked when read.

The file ``<dir>/checkpoint.safetensors`` holds tensors and string metadata:

    adapter.<layer path>.lora_a [in, r] / .lora_b [r, out]   the adapters at their current width r
    optimizer.<param index>.<key>                            AdamW's per-parameter state (exp_avg, step, ...)
    rng.<name>                                               generator states (uint8): torch's CPU one (data
                                                             loading, LoRA dropout seeds on the CPU), each CUDA
                                                             device's (LoRA dropout seeds there), the
                                                             DyLoRA sampler's. Python's random and numpy are
                                                             not used in training, so not saved; the data
                                                             order is a function of (seed, stage, epoch).
    snapshot.<layer index>.a / .b, snapshot.squared_norm     the L_DC snapshot, if there is one
    totals.<name>                                            sums of the epoch in progress
    metadata: format, digest, and JSON for the config, the layers, the data, the
              optimizer's param groups and the run's progress (position, history, results)

Writing: serialise in memory, write a temporary file in the same folder, fsync
it, ``os.replace`` it onto the name and fsync the folder, so a reader sees the
previous checkpoint or the new one, never a torn one, even after SIGKILL or a
power cut. Reading: the header must parse, the digest (sha256 over every tensor
and metadata entry) must match, and the caller compares config, layers and data
with ``require_equal``, which names every difference.
"""

import json
import os
import tempfile
from pathlib import Path

import torch

from hybrid_lora.errors import BadValue
from hybrid_lora.io.tensor_files import decode, encode, read_bytes
from hybrid_lora.train.regularizers import AdapterFactors, AdapterSnapshot

FORMAT = "hybrid-lora-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.safetensors"


class CheckpointError(BadValue):
    """A checkpoint that cannot be used: unreadable, corrupt, or made by a different run."""


def checkpoint_path(directory):
    return Path(directory) / CHECKPOINT_NAME


def _write_durably(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # The rename itself lives in the folder's entry: sync it too (POSIX; Windows cannot open folders).
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint(directory, tensors, metadata):
    """Write `tensors` (name -> tensor) and `metadata` (name -> JSON-ready value) to directory/checkpoint.safetensors.

    Returns the path. The tensors are copied to the CPU; metadata values are stored as JSON.
    A tensor with NaN or infinity raises NonFiniteTensor and leaves the previous checkpoint in place.
    """
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    strings = {key: json.dumps(value) for key, value in metadata.items()}
    strings["format"] = FORMAT
    path = checkpoint_path(directory)
    _write_durably(path, encode(tensors, strings, path))
    return path


def load_checkpoint(directory):
    """(tensors, metadata) of directory/checkpoint.safetensors; raises CheckpointError if it is not whole and ours."""
    path = checkpoint_path(directory)
    try:
        data = read_bytes(path, "checkpoint")
    except FileNotFoundError as err:
        raise CheckpointError(str(err)) from None
    tensors, raw = decode(data, path, "checkpoint", error=CheckpointError)
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {raw.get('format')!r}; expected {FORMAT!r}")
    raw.pop("format")
    try:
        return tensors, {key: json.loads(value) for key, value in raw.items()}
    except ValueError as err:
        raise CheckpointError(f"checkpoint {str(path)!r} has metadata that is not JSON ({err})") from None


def require_equal(what, saved, current, path):
    """Raise CheckpointError naming every key of the dicts `saved` and `current` whose values differ."""
    keys = sorted(set(saved) | set(current), key=str)
    missing = object()
    differences = [f"{key}: checkpoint {saved.get(key, missing)!r}, now {current.get(key, missing)!r}"
                   for key in keys if saved.get(key, missing) != current.get(key, missing)]
    if differences:
        shown = "; ".join(differences[:8]).replace(repr(missing), "(absent)")
        more = f" (and {len(differences) - 8} more)" if len(differences) > 8 else ""
        raise CheckpointError(f"checkpoint {str(path)!r} was written with a different {what}: {shown}{more}")


def optimizer_to_checkpoint(optimizer):
    """(tensors, param groups) of an optimizer's state_dict, tensors named optimizer.<param index>.<key>."""
    state = optimizer.state_dict()
    tensors = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"optimizer state {index}.{key} is a {type(value).__name__}; expected tensors")
            tensors[f"optimizer.{index}.{key}"] = value
    return tensors, state["param_groups"]


def optimizer_from_checkpoint(optimizer, tensors, param_groups):
    """Load the state written by ``optimizer_to_checkpoint`` into `optimizer` (built over the same params)."""
    state = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group for group in param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_to_checkpoint(devices=()):
    """Generator states: torch's CPU one and, for each CUDA device used, that device's."""
    tensors = {"rng.torch": torch.get_rng_state()}
    for device in devices:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            tensors[f"rng.cuda.{index}"] = torch.cuda.get_rng_state(index)
    return tensors


def rng_from_checkpoint(tensors):
    torch.set_rng_state(tensors["rng.torch"])
    for name, state in tensors.items():
        if name.startswith("rng.cuda."):
            index = int(name.rsplit(".", 1)[1])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                index = torch.cuda.current_device()  # rank 0 saved its GPU's state; each process has its own GPU
            torch.cuda.set_rng_state(state, index)


def snapshot_to_checkpoint(snapshot):
    """(tensors, scales) of an AdapterSnapshot."""
    tensors = {"snapshot.squared_norm": snapshot.squared_norm}
    for index, factors in enumerate(snapshot.factors):
        tensors[f"snapshot.{index}.a"] = factors.a
        tensors[f"snapshot.{index}.b"] = factors.b
    return tensors, [factors.scale for factors in snapshot.factors]


def snapshot_from_checkpoint(tensors, scales, device):
    factors = tuple(AdapterFactors(tensors[f"snapshot.{i}.a"].to(device), tensors[f"snapshot.{i}.b"].to(device), scale)
                    for i, scale in enumerate(scales))
    return AdapterSnapshot(factors, tensors["snapshot.squared_norm"].to(device))
