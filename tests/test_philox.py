"""``ops.philox``: the PyTorch path's dropout mask equals ``reference.philox_keep_mask`` bit for bit, in both its
versions (numpy on the host, torch ops elsewhere), which ``keep_mask`` picks; and it takes far fewer ops."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hybrid_lora.ops import philox, reference

VERSIONS = {"tensor": philox.tensor_keep_mask, "host": philox.host_keep_mask, "picked": philox.keep_mask}
SEEDS = [0, 1, 2**31 + 5, 2**40 + 7, 2**63 - 1]
# (M, K, row offset): one row, one column, K not a multiple of 4, counters past 2**32 and past 2**63
SHAPES = [(1, 1, 0), (3, 10, 0), (5, 13, 7), (8, 64, 2**28 - 1), (4, 37, 2**31), (2, 21, 2**40 + 3), (3, 8, 2**63 - 2)]


@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize("M, K, row_offset", SHAPES)
def test_every_version_is_the_reference_mask(version, M, K, row_offset):
    for seed in SEEDS:
        for p in (0.05, 0.5):
            want = reference.philox_keep_mask(seed, M, K, p, row_offset)
            for as_value in (int, torch.tensor):
                got = VERSIONS[version](as_value(seed), M, K, p, as_value(row_offset))
                assert got.shape == (M, K) and got.dtype == torch.bool
                assert torch.equal(got, want), (version, seed, p, as_value)


@pytest.mark.parametrize("version", list(VERSIONS))
def test_an_empty_input_has_an_empty_mask(version):
    for M, K in ((0, 5), (3, 0)):
        assert VERSIONS[version](3, M, K, 0.1).shape == (M, K)


def test_the_mask_is_the_reference_in_a_full_graph_with_device_tensors():
    """In a compiled graph the torch version runs: the numpy one would read the seed on the host (a graph break)."""
    seed, offset = torch.tensor(2**40 + 1), torch.tensor(2**30 + 7)
    compiled = torch.compile(philox.keep_mask, backend="eager", fullgraph=True)
    assert torch.equal(compiled(seed, 6, 19, 0.2, offset), reference.philox_keep_mask(seed, 6, 19, 0.2, offset))


def test_fake_tensors_get_the_torch_version_and_leave_no_constant_behind():
    from torch._subclasses.fake_tensor import FakeTensorMode

    philox._CONSTANTS.clear()
    with FakeTensorMode():
        mask = philox.keep_mask(torch.tensor(3), 4, 9, 0.1, torch.tensor(2))
    assert mask.shape == (4, 9) and mask.dtype == torch.bool
    assert philox._CONSTANTS == {}
    philox.tensor_keep_mask(3, 4, 9, 0.1)
    assert all(type(t) is torch.Tensor for held in philox._CONSTANTS.values() for t in held)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops(function, *args):
    function(*args)  # constants made once per device
    with _Ops() as ops:
        function(*args)
    return ops.count


def test_the_fast_versions_take_a_third_of_the_references_ops_or_fewer():
    seed, offset = torch.tensor(2**40 + 1), torch.tensor(3)
    spec = _ops(reference.philox_keep_mask, seed, 8, 64, 0.1, offset)
    assert spec > 250  # the plain specification: two 16-bit-split products and the key schedule per round
    fast = _ops(philox.tensor_keep_mask, seed, 8, 64, 0.1, offset)
    assert fast <= spec // 3
    assert _ops(philox.host_keep_mask, seed, 8, 64, 0.1, offset) <= 3  # numpy's ops are not torch's
    # Under a dispatch mode (this counter, a tracer) keep_mask runs the torch version, whose ops the mode sees.
    assert _ops(philox.keep_mask, seed, 8, 64, 0.1, offset) == fast
