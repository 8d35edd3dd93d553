"""bench/serving.py at toy sizes: every provider computes the same mixed batch, and every row is written."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `bench`

from bench import serving  # noqa: E402

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
