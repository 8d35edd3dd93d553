"""One run per output folder: a lock file that names the process holding it.

``hold_folder(path)`` creates ``path/.hybrid-lora.lock`` and locks it with
``fcntl.flock`` for as long as the run lasts. The kernel drops the lock when
the process ends, however it ends (SIGKILL included), so the lock of a dead
run is stale by construction and the next run takes it over. A second run
while the first lives is refused with FolderInUse, naming the first run's
pid, host and start time, which the lock file holds as JSON.

Where ``fcntl`` is missing (Windows), the file is created exclusively instead,
and a file left by a process that no longer exists on this host is taken over.
"""

import contextlib
import datetime
import json
import os
import socket
import sys
from pathlib import Path

from hybrid_lora.errors import BadValue, UserError

LOCK_NAME = ".hybrid-lora.lock"

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class FolderInUse(UserError):
    """The output folder is being written by another run."""


def lock_path(folder):
    return Path(folder) / LOCK_NAME


def _holder_text():
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv)[:300]}) + "\n"


def _read_holder(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _refuse(folder, holder):
    who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
           if holder else "a process that has not written its name yet")
    return FolderInUse(f"output folder {str(folder)!r} is in use by another hybrid-lora run ({who}); wait for it, "
                       f"or choose another --out (if that process is gone, delete {str(lock_path(folder))!r})")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _acquire_flock(folder, path):
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refuse(folder, _read_holder(path)) from None
        # The previous holder may have removed the file between our open and our lock:
        # then we hold a lock on a name that no longer exists, and must start over.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _acquire_exclusive(folder, path):
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            stale = holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                and not _alive(holder["pid"])
            if not stale:
                raise _refuse(folder, holder) from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@contextlib.contextmanager
def hold_folder(folder):
    """Hold the lock of `folder` (created if needed) for the block; FolderInUse if another live run holds it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BadValue(f"output folder {str(folder)!r} is a file; expected a folder (or a name not yet used)") \
            from None
    except OSError as err:
        raise BadValue(f"output folder {str(folder)!r} cannot be created ({err.strerror}); expected a "
                       "writable place") from None
    path = lock_path(folder)
    fd = _acquire_flock(folder, path) if fcntl is not None else _acquire_exclusive(folder, path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, _holder_text().encode())
        yield path
    finally:
        # Remove the name while still holding the lock, so that no one locks the old file in between.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
