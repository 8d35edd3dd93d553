"""One run per output folder: a live holder is named and refused; the lock of a dead one is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from hybrid_lora.io import folder_lock
from hybrid_lora.io.folder_lock import FolderInUse, hold_folder, lock_path


def dead_pid():
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


@pytest.fixture(params=["flock", "exclusive-file"])
def mechanism(request, monkeypatch):
    if request.param == "exclusive-file":
        monkeypatch.setattr(folder_lock, "fcntl", None)  # as on Windows
    elif folder_lock.fcntl is None:
        pytest.skip("fcntl is not available on this system")
    return request.param


def test_a_held_folder_refuses_a_second_holder_naming_the_first(tmp_path, mechanism):
    with hold_folder(tmp_path / "out") as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(FolderInUse, match=rf"is in use by another hybrid-lora run \(pid {os.getpid()} on "
                                              rf"{socket.gethostname()}, started 20"):
            with hold_folder(tmp_path / "out"):
                pass
        assert path.exists()  # the refused attempt left the holder's lock alone
    assert not lock_path(tmp_path / "out").exists()
    with hold_folder(tmp_path / "out"):  # released: free again
        pass


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path, mechanism):
    folder = tmp_path / "out"
    folder.mkdir()
    lock_path(folder).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(),
                                             "started": "2026-01-01T00:00:00+00:00"}))
    with hold_folder(folder) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_without_flock_a_lock_of_another_host_is_not_guessed_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_lock, "fcntl", None)
    folder = tmp_path / "out"
    folder.mkdir()
    lock_path(folder).write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere", "started": "2026-01-01"}))
    with pytest.raises(FolderInUse, match=r"on elsewhere, started 2026-01-01\).*delete"):
        with hold_folder(folder):
            pass


def test_an_output_folder_that_is_a_file_is_refused_by_name(tmp_path):
    from hybrid_lora.errors import UserError

    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UserError, match=r"output folder '.*taken' is a file; expected a folder"):
        with hold_folder(tmp_path / "taken"):
            pass
    with pytest.raises(UserError, match=r"output folder '.*taken/inside' cannot be created"):
        with hold_folder(tmp_path / "taken" / "inside"):
            pass
