"""Writing output files whole or not at all: write to a temporary file in the same folder, then rename.

A reader (or a resumed run) therefore sees either the previous file or the
complete new one, never a half-written file, even if the process is killed.
"""

import json
import math
import os
import tempfile
from pathlib import Path

from hybrid_lora.errors import BadValue, MissingFile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call write(tmp_path) for a temporary path next to `path`, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _json_ready(value):
    """NaN and infinities become None (JSON has no such numbers); tuples become lists; keys become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write_json(path, obj):
    text = json.dumps(_json_ready(obj), indent=1, sort_keys=False) + "\n"

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def read_json(path):
    """The JSON value in `path`; MissingFile or BadValue, naming the file, if it is absent or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise MissingFile(f"{str(path)!r} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadValue(f"{str(path)!r} is not a JSON file ({err}); expected the file as hybrid-lora wrote it "
                       "(edited or truncated?)") from None
