"""The dropout mask's Philox counter is 64-bit: rows past 2**32 groups of four elements draw new masks, the same
in the reference, the kernels and both paths of the op, and every mask below 2**32 is the 32-bit counter's."""

import pytest
import torch
from test_dropout_paths import dropped_elements

from hybrid_lora.kernels.dropout import dropout_keep_mask
from hybrid_lora.ops import backend, reference


def _bits(mask):
    return sum(int(b) << i for i, b in enumerate(mask.flatten().tolist()))


def test_masks_of_counters_below_2_32_are_those_of_the_32_bit_counter():
    # K = 64 is 16 quads a row: rows 2**28 - 2 and 2**28 - 1 hold the last 32 counters below 2**32. The figure
    # is the reference's mask there when its counter was 32-bit (commit d623c54).
    assert _bits(reference.philox_keep_mask(2**40 + 7, 2, 64, 0.3, 2**28 - 2)) == 0xd75816bdaff37f1b8bb77b7730ffdefd


# (K, first row, the row whose 32-bit counter the first row's wraps to): 2**28 rows of 16 quads are 2**32 quads.
PAST = [(64, 2**28, 0), (61, 2**28 + 3, 3), (8, 2**31 + 5, 5), (20, 2**32 + 1, 1)]


@pytest.mark.parametrize("K, row, wrapped_row", PAST)
def test_rows_past_2_32_quads_draw_new_masks_in_the_reference_and_the_kernel(K, row, wrapped_row):
    quads = (K + 3) // 4
    assert row * quads >= 2**32 and (row * quads) % 2**32 == wrapped_row * quads
    seed, M, p = 2**33 + 9, 3, 0.5
    past = reference.philox_keep_mask(seed, M, K, p, row)
    assert not torch.equal(past, reference.philox_keep_mask(seed, M, K, p, wrapped_row))
    assert torch.equal(dropout_keep_mask(M, K, seed, p, "cpu", row_offset=row), past)
    # a counter past 2**63 (an offset near the top of its range) wraps at 2**64 in both
    top = 2**63 - 1
    assert torch.equal(dropout_keep_mask(M, K, seed, p, "cpu", row_offset=top),
                       reference.philox_keep_mask(seed, M, K, p, top))


@pytest.mark.parametrize("offset_as", [int, torch.tensor])
def test_both_paths_drop_the_same_new_elements_past_2_32_quads(offset_as, monkeypatch):
    M, K, seed, p = 6, 32, 2**40 + 3, 0.3  # 8 quads a row: row 2**29 + 1 is quad 2**32 + 8, once quad 8 (row 1)
    row, wrapped_row = 2**29 + 1, 1
    masks = {}
    for path in ("triton", "torch"):
        monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
        backend.refresh()
        if backend.select_backend(torch.device("cpu")) != path:
            pytest.skip(f"the {path} path cannot run here")
        masks[path] = dropped_elements("cpu", M, K, seed, p, row_offset=offset_as(row))
        wrapped = dropped_elements("cpu", M, K, seed, p, row_offset=offset_as(wrapped_row))
        assert not torch.equal(masks[path]["forward"], wrapped["forward"]), path
        assert torch.equal(masks[path]["forward"], masks[path]["backward"]), path
        # the elements dropped are the reference mask's
        assert torch.equal(~masks[path]["forward"], reference.philox_keep_mask(seed, M, K, p, row)), path
    for direction in ("forward", "backward"):
        assert torch.equal(masks["triton"][direction], masks["torch"][direction]), direction
