"""safetensors files of tensors and string metadata: written whole, read only when whole and unaltered.

Adapters and checkpoints are stored this way and never through pickle, so
reading a file runs no code from it. A file is refused, with its path in the
message, when

  - its header does not parse or lies about sizes: safetensors checks the header
    length against the file, and each tensor's dtype x shape against its byte
    range, before anything is allocated;
  - its content was altered after writing: the metadata entry ``digest`` holds a
    sha256 over every tensor's name, dtype, shape and bytes and every other
    metadata entry, so a flipped bit or a header that still parses is caught.

A float tensor with NaN or infinity is never written: ``encode`` refuses it, so a
diverged model cannot replace a good file.
"""

import hashlib
import json
from pathlib import Path

import torch

from hybrid_lora.errors import BadValue, MissingFile

DIGEST_KEY = "digest"


class DamagedFile(BadValue):
    """A tensor file that is truncated, malformed, or altered since it was written."""


class NonFiniteTensor(BadValue):
    """A tensor to be written holds NaN or infinity."""


def content_digest(tensors, metadata):
    """sha256 over (name, dtype, shape, bytes) of every tensor and every metadata entry, in sorted order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(metadata):
        h.update(f"{key}={metadata[key]}|".encode())
    return h.hexdigest()


def non_finite(tensors):
    """The names of the floating-point tensors that hold a NaN or an infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def encode(tensors, metadata, path):
    """The bytes of a safetensors file of `tensors` (CPU, contiguous) and string `metadata`, digest added.

    Raises NonFiniteTensor, naming `path` and the tensors, if any float tensor is not finite.
    """
    from safetensors.torch import save

    bad = non_finite(tensors)
    if bad:
        raise NonFiniteTensor(f"refusing to write {str(path)!r}: {len(bad)} tensor(s) hold NaN or infinity "
                              f"({', '.join(sorted(bad)[:3])}{', ...' if len(bad) > 3 else ''}); "
                              "the previous file, if any, is kept")
    metadata = {**metadata, DIGEST_KEY: content_digest(tensors, metadata)}
    return save(tensors, metadata=metadata)


def read_bytes(path, what):
    """The bytes of the file `path`; MissingFile names it as `what` ("checkpoint", "adapter file")."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise MissingFile(f"{what} {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise BadValue(f"{what} {str(path)!r} is a folder; expected a .safetensors file") from None


def decode(data, path, what, error=DamagedFile, require_digest=True):
    """(tensors, metadata) of safetensors bytes read from `path`; raises `error` naming it unless whole and unaltered.

    The returned metadata no longer holds the digest. `require_digest`, a bool or a
    predicate on the metadata, says whether a file without one is refused (an older
    format may have none); a digest that is present is always checked.
    """
    from safetensors.torch import load

    try:
        tensors = load(data)
        header_length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_length])
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("its metadata is not a table of strings")
    # safetensors raises its own error types for a bad header; a Rust panic arrives as a BaseException.
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise error(f"{what} {str(path)!r} ({len(data)} bytes) cannot be read: {reason}; "
                    "expected a whole safetensors file (truncated or overwritten?)") from None
    stored = metadata.pop(DIGEST_KEY, None)
    if stored is None:
        if require_digest(metadata) if callable(require_digest) else require_digest:
            raise error(f"{what} {str(path)!r} has no content digest; expected one in its metadata (altered?)")
        return tensors, metadata
    actual = content_digest(tensors, metadata)
    if stored != actual:
        raise error(f"{what} {str(path)!r} is corrupt: its content digest is {actual[:16]}..., "
                    f"the digest stored at writing {stored[:16]}...")
    return tensors, metadata
