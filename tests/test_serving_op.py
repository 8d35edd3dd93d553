"""The mixed-batch op (``multi_lora``) against its fp64 reference: kernels under the interpreter, the PyTorch path.

Awkward shapes: one row, sizes that are no multiple of any block, ranks that
are no power of two, rank 1 and the full width, a width above one rank block,
rows of no adapter, one adapter only. Outputs start as NaN (``nan_outputs``),
so an element a kernel forgot to write fails.
"""

import pytest
import torch
from conftest import TOLERANCES

from hybrid_lora.kernels.multi_lora import segment_shrink, segments
from hybrid_lora.ops.multi_lora import multi_lora
from hybrid_lora.ops.multi_lora_reference import multi_lora_down, multi_lora_forward


def make_inputs(M, K, N, slots, R, dtype, seed=0, bias=True, slot_range=None):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) / shape[-2 if len(shape) > 1 else 0] ** 0.25).to(dtype)

    low, high = slot_range or (-1, slots)
    rows = dict(slots=torch.randint(low, high, (M,), generator=g, dtype=torch.int32),
                ranks=torch.randint(1, R + 1, (M,), generator=g),
                scales=torch.rand(M, generator=g, dtype=torch.float64).float() * 4)
    rows["ranks"][0] = R  # the full width and rank 1 in every batch of two rows or more
    rows["ranks"][-1] = 1 if M > 1 else R
    lora_a, lora_b = rand(slots, K, R).float(), rand(slots, R, N).float()
    return rand(M, K), rand(K, N), rand(N) if bias else None, lora_a, lora_b, rows


def check(got, x, weight, bias, lora_a, lora_b, rows, dtype):
    d = [t.double() if t is not None else None for t in (x, weight, bias, lora_a, lora_b)]
    want = multi_lora_forward(*d, rows["slots"], rows["ranks"], rows["scales"].double())
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.isfinite(got).all(), "non-finite values (an element the kernels never wrote?)"
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol["atol"] * max(1.0, want.abs().max().item()),
                               rtol=tol["rtol"])


SHAPES = [  # M, K, N, slots, R
    (1, 24, 40, 3, 7),
    (37, 40, 24, 3, 20),
    (50, 33, 70, 5, 16),
    (19, 48, 17, 2, 80),  # a width of two rank blocks (64 + 16)
]


@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("M, K, N, slots, R", SHAPES)
def test_op_matches_the_reference(path, M, K, N, slots, R, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    x, weight, bias, lora_a, lora_b, rows = make_inputs(M, K, N, slots, R, torch.float32)
    check(multi_lora(x, weight, bias, lora_a, lora_b, **rows), x, weight, bias, lora_a, lora_b, rows, torch.float32)


@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("slot_range, bias, dtype", [((-1, 0), True, torch.float32),  # no row has an adapter
                                                     ((2, 3), False, torch.float32),  # every row the last slot
                                                     ((-1, 3), True, torch.float16)])
def test_kernels_with_one_segment_no_bias_and_fp16(slot_range, bias, dtype, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "triton")
    x, weight, b, lora_a, lora_b, rows = make_inputs(21, 40, 36, 3, 12, dtype, bias=bias, slot_range=slot_range)
    check(multi_lora(x, weight, b, lora_a, lora_b, **rows), x, weight, b, lora_a, lora_b, rows, dtype)


def test_the_kernels_never_read_adapter_columns_past_a_tiles_ranks(monkeypatch):
    """NaN past every rank a row asks for changes nothing: the work follows the ranks, not R."""
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "triton")
    x, weight, bias, lora_a, lora_b, rows = make_inputs(30, 40, 36, 3, 40, torch.float32)
    rows["ranks"] = torch.randint(1, 13, (30,), generator=torch.Generator().manual_seed(3))
    want = multi_lora(x, weight, bias, lora_a, lora_b, **rows)
    poisoned_a, poisoned_b = lora_a.clone(), lora_b.clone()
    poisoned_a[:, :, 12:] = float("nan")
    poisoned_b[:, 12:] = float("nan")
    got = multi_lora(x, weight, bias, poisoned_a, poisoned_b, **rows)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("M, slots, block_m", [(1, 1, 16), (37, 3, 16), (64, 5, 16), (100, 8, 64)])
def test_segments_cover_every_row_once_with_one_adapter_per_tile_and_the_shrink_matches(M, slots, block_m):
    g = torch.Generator().manual_seed(M)
    slot_of_row = torch.randint(-1, slots, (M,), generator=g)
    order, tile_slot, begin, end = segments(slot_of_row, slots, block_m)
    covered = torch.cat([torch.arange(int(b), int(e)) for b, e in zip(begin, end)])
    assert sorted(covered.tolist()) == list(range(M))
    assert ((end - begin) <= block_m).all()
    for t in range(tile_slot.shape[0]):
        assert (slot_of_row[order[begin[t]:end[t]]] == tile_slot[t]).all()
    K, R = 20, 9
    x, lora_a = torch.randn(M, K, generator=g), torch.randn(slots, K, R, generator=g)
    ranks = torch.randint(1, R + 1, (M,), generator=g)
    got = segment_shrink(x, lora_a, ranks, order, tile_slot, begin, end, block_m)
    want = multi_lora_down(x.double(), lora_a.double(), slot_of_row, ranks)[order]
    torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.float32])


def test_bad_inputs_get_one_line_each():
    x, weight, bias, lora_a, lora_b, rows = make_inputs(4, 8, 6, 2, 3, torch.float32)
    cases = [
        (dict(lora_a=lora_a[:, :7]), "lora_a has shape (2, 7, 3); expected [slots, 8, r_max]"),
        (dict(lora_b=lora_b[:1]), "lora_b has shape (1, 3, 6)"),
        (dict(slots=rows["slots"][:3]), "slots has shape (3,); expected (4,)"),
        (dict(ranks=rows["ranks"].float()), "ranks has dtype torch.float32"),
        (dict(x=x[:, :5]), "x has shape (4, 5); expected [..., 8]"),
    ]
    for change, fragment in cases:
        args = dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, **rows)
        args.update(change)
        with pytest.raises(ValueError) as err:
            multi_lora(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("lora_a"), args.pop("lora_b"),
                       **args)
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)
