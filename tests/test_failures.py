"""What a user meets when something goes wrong, through the command line in a subprocess: one line naming the
file or value, exit status 2, no traceback, nothing non-finite written, the previous checkpoint intact."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = ["--train-examples", "16", "--eval-examples", "8", "--epochs", "2", "--r-max", "8", "--batch-size", "4",
        "--log-every", "0", "--backend", "torch", "--device", "cpu", "--no-plots"]
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HYBRID_LORA_BACKEND": "torch", "OMP_NUM_THREADS": "1"}


def cli(*argv, timeout=240):
    return subprocess.run([sys.executable, "-m", "hybrid_lora", *argv], capture_output=True, text=True,
                          env={**os.environ, **ENV}, timeout=timeout)


def cli_in_process(monkeypatch, capsys, *argv):
    """`cli` for cases that fail before training: ``main`` in this process (a subprocess costs seconds of imports)."""
    from hybrid_lora.cli import main

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    try:
        code = main(list(argv)) or 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["hybrid-lora", *argv], code, captured.out, captured.err)


def user_error(done, command="train"):
    """The one error line of a run that failed on the user's input (exit 2, no traceback)."""
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-4000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-4000:]
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], done.stderr[-4000:]
    assert lines[-1].startswith(f"hybrid-lora {command}: error: ")
    return lines[-1]


def assert_all_finite(folder):
    """Every float tensor of every safetensors file under `folder` is finite (read with safetensors itself)."""
    from safetensors import safe_open

    for path in Path(folder).rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), (path, key)


@pytest.mark.parametrize("name, content, expected", [
    ("binary.txt", b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "is not UTF-8 text: byte 0x89 at offset 0 (line 1)"),
    ("empty.txt", b"", "holds no text (0 bytes)"),
    ("blank.jsonl", b"\n  \n", "holds no text"),
    ("rows.jsonl", b'{"text": "one"}\n{"body": "two"}\n', "line 2: has ['body']; expected an object with a 'text'"),
    ("broken.jsonl", b'{"text": "one"}\n{"text": "tw\n', "line 2: not JSON"),
    ("rows.csv", b"id,body\n1,hello\n2,world\n", "has columns ['id', 'body']; expected a 'text' column"),
    ("small.txt", b"one\ntwo\nthree\n", "has 3 non-empty texts; 8 eval + 16 train were asked for"),
])
def test_a_bad_data_file_is_named_in_one_line_and_nothing_is_written(tmp_path, name, content, expected,
                                                                     monkeypatch, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "run"
    argv = ("train", *TINY, "--domains", str(path), "embedded-b", "--out", str(out))
    # The first case through the real entry point, the others through main() in this process.
    done = cli(*argv) if name == "binary.txt" else cli_in_process(monkeypatch, capsys, *argv)
    line = user_error(done)
    assert repr(str(path)) in line and expected in line
    assert not out.exists()  # the data is read before anything is written


def test_lines_longer_than_max_length_train_on_their_first_max_length_tokens(tmp_path):
    """The documented behaviour for long lines: truncation, not an error."""
    path = tmp_path / "long.txt"
    path.write_text("\n".join([" ".join(["Anna lives in Dunmore."] * 400)] + [f"Ida keeps {i} cats." for i in range(7)]))
    out = tmp_path / "run"
    done = cli("train", "--domains", str(path), "--train-examples", "4", "--eval-examples", "4", "--epochs", "1",
               "--r-max", "2", "--max-length", "16", "--sweep-ranks", "--backend", "torch", "--device", "cpu",
               "--no-plots", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "seed-42" / "metrics.json").read_text())
    assert metrics["accuracy"][0][0] is not None and metrics["loss"][0][0] > 0
    assert_all_finite(out)


def test_the_hub_out_of_reach_says_how_to_proceed(tmp_path):
    line = user_error(cli("train", *TINY, "--domains", "imdb", "yelp_polarity", "--out", str(tmp_path / "run")))
    assert "dataset 'imdb'" in line
    assert "HF_DATASETS_OFFLINE=1" in line or "pip install datasets" in line
    assert "local .txt/.jsonl/.csv file" in line
    assert not (tmp_path / "run").exists()


def test_a_model_that_cannot_be_had_is_named(tmp_path):
    line = user_error(cli("train", *TINY, "--model", "nobody/no-such-gpt2", "--out", str(tmp_path / "run")))
    assert "model 'nobody/no-such-gpt2' could not be loaded" in line and "HF_HUB_OFFLINE=1" in line


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    done = cli("train", *TINY, "--domains", str(path), "embedded-b", "--out", str(tmp_path / "run"), "--debug")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "BadValue" in done.stderr and "holds no text" in done.stderr


def test_divergence_stops_before_a_non_finite_update_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    line = user_error(cli("train", *TINY, "--lr", "1e9", "--checkpoint-every", "1", "--out", str(out)))
    assert "training diverged at stage 1 (embedded-a), epoch 1, step " in line
    assert "try a lower --lr (now 1e+09)" in line
    step = int(line.split("(global step ")[1].split(")")[0])
    run_dir = out / "seed-42"
    assert not (run_dir / "adapters").exists() and not (run_dir / "metrics.json").exists()
    assert_all_finite(out)
    # The checkpoint left is the one written after the last good step, whole and loadable.
    from hybrid_lora.train.checkpoint import load_checkpoint

    _, meta = load_checkpoint(run_dir)
    assert meta["progress"]["global_step"] == step - 1 >= 1
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".hybrid-lora.lock"))


def test_skipping_non_finite_steps_still_stops_when_the_model_itself_diverged(tmp_path):
    out = tmp_path / "run"
    line = user_error(cli("train", *TINY, "--lr", "1e9", "--on-nonfinite", "skip", "--out", str(out)))
    assert "training diverged at stage 1 (embedded-a), epoch 1: the evaluation loss after the epoch is nan" in line
    assert not (out / "seed-42" / "adapters").exists()
    assert_all_finite(out)


def test_a_damaged_checkpoint_is_refused_on_resume_and_left_as_it_was(tmp_path):
    run_dir = tmp_path / "run" / "seed-42"
    run_dir.mkdir(parents=True)
    checkpoint = run_dir / "checkpoint.safetensors"
    checkpoint.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}  ")
    line = user_error(cli("train", *TINY, "--resume", "--out", str(tmp_path / "run")))
    assert f"checkpoint {str(checkpoint)!r} (24 bytes) cannot be read" in line
    assert checkpoint.read_bytes() == b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}  "


def test_a_damaged_adapter_is_refused_by_eval(tmp_path):
    adapter = tmp_path / "stage1.safetensors"
    adapter.write_bytes(b"\xff" * 64)
    line = user_error(cli("eval", str(adapter), "--eval-examples", "8"), command="eval")
    assert f"adapter file {str(adapter)!r} (64 bytes) cannot be read" in line


HOLDER = """
import sys, time
from hybrid_lora.io.folder_lock import hold_folder
with hold_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


def hold(folder):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **ENV})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    holder = hold(out / "seed-42")  # a run training into run/seed-42
    try:
        line = user_error(cli("train", *TINY, "--out", str(out)))
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert f"output folder {str(out / 'seed-42')!r} is in use by another hybrid-lora run (pid {holder.pid} on " in line
    assert ", started 20" in line
    # Refused before writing anything: the first run's folder untouched, no command.json over its own.
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["seed-42", "seed-42/.hybrid-lora.lock"]


def test_the_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = hold(out / "seed-42")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    lock = out / "seed-42" / ".hybrid-lora.lock"
    assert json.loads(lock.read_text())["pid"] == holder.pid  # left behind by the killed run
    # A run that gets past the lock, then stops at a damaged checkpoint: the lock was taken over, then released.
    (out / "seed-42" / "checkpoint.safetensors").write_bytes(b"")
    line = user_error(cli("train", *TINY, "--resume", "--out", str(out)))
    assert "checkpoint" in line and "cannot be read" in line and "in use" not in line
    assert not lock.exists()
