"""bench/serving.py at toy sizes: every provider computes the same mixed batch, and every row is written."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `bench`

from bench import serving  # noqa: E402
from bench.record import read_csv  # noqa: E402

CONFIG = serving.tiny_config()


@pytest.mark.parametrize("shape", CONFIG.shapes)
def test_the_mixed_batch_providers_compute_one_function(shape):
    _, K, N, layout = shape
    layer = serving.Layer(K, N, layout, CONFIG, torch.device("cpu"), torch.float32)
    x = torch.randn(CONFIG.batch, 3, K)
    slots, ranks = serving.requests(CONFIG, (1, 2, 5, 8))
    assert len(set(ranks.tolist())) > 1 and len(set(slots.tolist())) == CONFIG.adapters
    with torch.no_grad():
        want = serving.padded_bmm(layer, x, slots, ranks)().reshape(-1, N)
        for provider in ("ours", "peft-mixed"):
            got = serving.BUILDERS[provider](layer, x, slots, ranks)().reshape(-1, N)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the LoRA term is there: the floor differs
        assert (serving.merged(layer, x, slots, ranks)() - want).abs().max() > 1e-3


def test_run_writes_a_row_per_provider_mix_phase_and_shape_and_a_table(tmp_path):
    rows = serving.run(CONFIG, torch.device("cpu"), log=lambda *args: None)
    expected = {(s[0], phase, mix, p) for s in CONFIG.shapes for phase in ("prefill", "decode")
                for mix in CONFIG.mixes for p in serving.PROVIDERS if p != "ours-native-r8" or mix == "all-8"}
    assert {(r["shape"], r["phase"], r["mix"], r["provider"]) for r in rows} == expected
    for row in rows:
        assert row["status"] == "ok" and row["median_ms"] > 0 and float(row["max_diff"]) < 1e-4, row
        assert row["M"] == CONFIG.batch * (CONFIG.prefill_len if row["phase"] == "prefill" else 1)
    text = serving.table(rows)
    assert "**CPU timings**" in text and "n/a: CPU timing" in text and "nested / native" in text


def test_a_wrong_mixed_batch_is_marked_and_fails_the_command(tmp_path, monkeypatch):
    real = serving.ours

    def off_by_a_tenth(*args):
        run = real(*args)
        return lambda: run() * 1.1

    monkeypatch.setattr(serving, "ours", off_by_a_tenth)
    monkeypatch.setattr(serving, "tiny_config", lambda: serving.ServingConfig(
        shapes=(("tiny", 16, 32, "in_out"),), batch=4, adapters=3, r_max=8, prefill_len=2, mixes={"all-8": (8,)},
        dtype="fp32", rounds=1))
    assert serving.main(["--device", "cpu", "--tiny", "--out-dir", str(tmp_path)]) == 1
    (csv_path,) = tmp_path.glob("*-serving.csv")
    statuses = {(row["provider"], row["status"]) for row in read_csv(csv_path)}
    assert ("ours", "wrong") in statuses and ("ours-native-r8", "wrong") not in statuses
    assert ("padded-bmm", "ok") in statuses
