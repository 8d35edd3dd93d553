"""Host time per layer call (bench/host_overhead.py): the bench runs, and our layer costs no more than peft's LoRA.

A ratio of timings taken in turns in this one process, on the PyTorch path,
with one torch thread and the thread's CPU time: it holds on a loaded
machine, and says nothing of absolute speed.
"""

import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `bench`

from bench import host_overhead  # noqa: E402

pytest.importorskip("peft")

# Our layer measured 1.05x to 1.14x peft (median of paired rounds) on a loaded 2-core CPU, where the
# op before the backend was chosen once and its checks made free was 1.7x to 2.0x: the bound catches
# per-call host work coming back, with room for the noise of a shared machine.
MAX_OVER_PEFT = 1.3


def test_the_bench_writes_one_row_per_provider(tmp_path):
    out = tmp_path / "host.csv"
    host_overhead.main(["--device", "cpu", "--calls", "5", "--rounds", "2", "--out", str(out)])
    text = out.read_text()
    assert text.splitlines()[0].split(",") == host_overhead.COLUMNS
    assert [line.split(",")[0] for line in text.splitlines()[1:]] == list(host_overhead.PROVIDERS)
    assert str(Path.cwd()) not in text and "/tmp" not in text


def test_the_autotune_rows_time_a_new_bucket_then_the_same_bucket():
    rows = host_overhead.autotune_cost(torch.device("cpu"), first_M=20, second_M=30, K=16, N=16, r=4)
    assert [(row["call"], row["M"]) for row in rows] == [
        ("first, new M bucket", 20), ("first, same M bucket", 30), ("steady", 30)]
    assert all(row["us_per_call"] > 0 and set(row) == set(host_overhead.COLUMNS) for row in rows)


def test_our_layer_costs_no_more_host_time_per_call_than_peft():
    cpu = torch.device("cpu")
    with host_overhead.cpu_threads(1):
        times = host_overhead.measure(cpu, providers=("peft", "ours"), calls=30, rounds=41, backend="torch")
    # Rounds of the two layers run back to back: the ratio within a round cancels the machine's drift.
    ratio = statistics.median(ours / peft for ours, peft in zip(times["ours"], times["peft"]))
    assert ratio <= MAX_OVER_PEFT, f"LoRALinear takes {ratio:.2f}x peft's host time per fwd+bwd call"
