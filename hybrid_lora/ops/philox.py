"""The dropout keep mask of ``reference.philox_keep_mask`` in few, wide ops: what the PyTorch path runs.

The reference computes Philox4x32-10 (Salmon et al., SC 2011) as written: per
round two 32 x 32 -> 64-bit products, each split over 16-bit halves so that no
partial product leaves int64, and the key schedule on 0-d tensors: about 280
tensor ops per mask. At the sizes LoRA dropout sees, each op's dispatch costs
more than its arithmetic. The two versions here, each equal to the reference
bit for bit (tests/test_philox.py), do the same rounds in about 85 tensor ops,
or 40 numpy ops:

- a product of two uint32 values, taken in one 64-bit multiply that wraps (int64
  as uint64 arithmetic does), gives the high word ``(p >> 32) & 0xFFFFFFFF`` and
  the low word ``p & 0xFFFFFFFF``, whatever the sign of an int64 p;
- a round's two products are one multiply of the [2, n] "even" words (c0, c2) by
  a column of the two multipliers; the "odd" words (c1, c3) are the low words of
  the previous round's products, kept unmasked (their high bits are cleared by
  the one mask of the next round's new even words);
- the even words change places every round (c0' comes from c2's product) and the
  odd words do not, so one flip of the odd words per round lines them up (a
  strided view in numpy, a copy in torch);
- numpy has uint32 and uint64: a product viewed as uint32 words gives the high and
  low words as strided views, with nothing to mask;
- the ten round keys come from one op over the seed (from Python ints on the host).

``keep_mask`` runs the numpy version where the seed is a plain CPU tensor (or a
number), nothing traces or watches the call (a compiled graph, ``torch.jit.trace``,
a dispatch mode) and the host is little-endian: per mask, on one
thread of a shared 2-core EPYC, 100 us against the torch version's 300 (and the
reference's 890) at 8 x 64, 1.0 ms against 2.2 (5.1) at 1024 x 128. Everywhere
else (CUDA, a traced or watched call, a fake tensor) it runs the torch version,
which reads no device value on the host. A ``torch.compile``'d torch version was
measured too: about a minute to compile on that CPU, and at 1024 x 128 slower
(5.2 ms) than the eager ops, so none is used.
"""

import sys

import numpy as np
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .reference import _PHILOX_KEY_A, _PHILOX_KEY_B, _PHILOX_ROUND_A, _PHILOX_ROUND_B, _U32

_ROUNDS = 10
_CONSTANTS = {}  # {device: _constants(device)}, kept only where they are plain tensors made outside a trace


def _make_constants(device):
    """(multipliers for even words (c0, c2) [2, 1], for (c2, c0), round-key steps [10, 2], key order [10, 2]).

    Made from ``arange`` rather than ``torch.tensor``: nothing is copied from the host.
    """
    two = torch.arange(2, dtype=torch.int64, device=device)
    by_c0_c2 = (two * (_PHILOX_ROUND_B - _PHILOX_ROUND_A) + _PHILOX_ROUND_A).unsqueeze(1)  # (A, B)
    rounds = torch.arange(_ROUNDS, dtype=torch.int64, device=device).unsqueeze(1)
    steps = rounds * (two * (_PHILOX_KEY_B - _PHILOX_KEY_A) + _PHILOX_KEY_A)  # round i: i * (KEY_A, KEY_B)
    # Round i XORs its key into even words ordered (c2, c0) when i is even, (c0, c2) when odd: (k1, k0), (k0, k1).
    order = (rounds + 1 + two) % 2
    return by_c0_c2, by_c0_c2.flip(0), steps, order


def _constants(device):
    held = _CONSTANTS.get(device)
    if held is not None:
        return held
    if torch.compiler.is_compiling():
        return _make_constants(device)  # constants of the graph, not of the process
    with torch.inference_mode(False):
        held = _make_constants(device)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if type(held[0]) is torch.Tensor and not capturing:  # not a FakeTensor, nor memory of a CUDA graph's pool
        _CONSTANTS[device] = held
    return held


def keep_mask(seed, M, K, dropout_p, row_offset=0):
    """``reference.philox_keep_mask(seed, M, K, dropout_p, row_offset)``, bit for bit: the [M, K] bool keep mask.

    seed: an int or a 0-d integer tensor; row_offset: an int or a 0-d integer tensor on the seed's device.
    A tensor is read on the host only where it is a plain CPU tensor outside a trace (``host_keep_mask``).
    """
    if _on_host(seed, row_offset):
        return host_keep_mask(seed, M, K, dropout_p, row_offset)
    return tensor_keep_mask(seed, M, K, dropout_p, row_offset)


def _on_host(seed, row_offset):
    # A dispatch mode (a tracer, an op counter, FlopCounterMode) sees the torch version's ops; numpy's it would not.
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None
            or sys.byteorder != "little"):
        return False
    return all(isinstance(value, int) or (type(value) is torch.Tensor and value.device.type == "cpu")
               for value in (seed, row_offset))


def tensor_keep_mask(seed, M, K, dropout_p, row_offset=0):
    """The keep mask in about 85 torch ops on the seed's device; no device value is read on the host.

    seed: an int or a 0-d integer tensor; row_offset: an int or a 0-d integer tensor on the seed's device.
    """
    seed = torch.as_tensor(seed, dtype=torch.int64)
    device = seed.device
    by_c0_c2, by_c2_c0, steps, order = _constants(device)
    quads = (K + 3) // 4
    # (row_offset + m) * quads + q for the M * quads quads of the input, in row-major order
    counter = torch.arange(M * quads, dtype=torch.int64, device=device) + row_offset * quads
    keys = ((torch.stack((seed & _U32, (seed >> 32) & _U32)) + steps) & _U32).gather(1, order)
    keys = keys.unsqueeze(2).unbind(0)  # round i's key, [2, 1]
    # The counter words are (q low, q high, 0, 0), as Triton's randint4x takes a 64-bit offset. The first
    # round, with c2 = c3 = 0: even words (c2', c0') = (hi(A c0) ^ k1, c1 ^ k0), odd (c3', c1') = (lo(A c0), 0).
    product = (counter & _U32) * _PHILOX_ROUND_A
    even = torch.stack((product >> 32, counter >> 32))
    even ^= keys[0]
    even &= _U32
    odd = torch.stack((product, torch.zeros_like(product)))
    for i in range(1, _ROUNDS):
        # Odd rounds take even words (c2, c0) and odd (c1, c3) (flipped from the (c3, c1) they are given),
        # and give (c0, c2) and (c1, c3); even rounds take (c0, c2) and (c3, c1), and give (c2, c0) and (c3, c1).
        product = even * (by_c2_c0 if i % 2 else by_c0_c2)
        even = (product >> 32) ^ odd.flip(0)
        even ^= keys[i]
        even &= _U32
        odd = product
    # After the tenth (odd) round: even (c0, c2), odd (c1, c3).
    keep = torch.stack((even, odd & _U32), dim=1) >= min(2**32 - 1, round(dropout_p * 2**32))
    return keep.permute(2, 0, 1).reshape(M, 4 * quads)[:, :K]  # [[c0, c1], [c2, c3]] per quad: words 0..3


_HOST_BY_C0_C2 = np.array([[_PHILOX_ROUND_A], [_PHILOX_ROUND_B]], dtype=np.uint64)
_HOST_BY_C2_C0 = _HOST_BY_C0_C2[::-1].copy()


def _host_keys(seed):
    """[10, 2, 1] uint32: round i's key (k0 + i KEY_A, k1 + i KEY_B) mod 2**32, ordered as the even words it meets:
    (k1, k0) when i is even, (k0, k1) when odd."""
    k0, k1 = seed & _U32, seed >> 32
    keys = [((k0 + i * _PHILOX_KEY_A) & _U32, (k1 + i * _PHILOX_KEY_B) & _U32) for i in range(_ROUNDS)]
    return np.array([key if i % 2 else key[::-1] for i, key in enumerate(keys)], dtype=np.uint32)[:, :, None]


def host_keep_mask(seed, M, K, dropout_p, row_offset=0):
    """The keep mask in numpy on the host; seed and row_offset are ints or CPU tensors.

    The rounds of ``tensor_keep_mask`` with the words as uint32: a uint64 product viewed as
    uint32 is its (low, high) word pairs (a little-endian host), so the high and low words are
    strided views, as is the flip, and a round is three ufuncs.
    """
    seed, row_offset = int(seed) % 2**64, int(row_offset)
    quads = (K + 3) // 4
    n = M * quads
    counter = np.arange(n, dtype=np.uint64)
    counter += np.uint64(row_offset * quads % 2**64)
    counter = counter.view(np.uint32)  # [2n]: (low, high) word of each counter
    keys = _host_keys(seed)
    even = np.zeros((2, n), dtype=np.uint32)  # (c0, c2) = (q low, 0)
    even[0] = counter[0::2]
    odd = np.zeros((2, n), dtype=np.uint32)  # (c3, c1) = (0, q high)
    odd[1] = counter[1::2]
    for i in range(_ROUNDS):
        product = (even * (_HOST_BY_C2_C0 if i % 2 else _HOST_BY_C0_C2)).view(np.uint32)  # [2, 2n]
        even = np.bitwise_xor(product[:, 1::2], odd[::-1] if i else odd)
        even ^= keys[i]
        odd = product[:, 0::2]
    # After the tenth (odd) round: even (c0, c2), odd (c1, c3); word w of quad q goes to column 4q + w.
    keep = np.empty((n, 2, 2), dtype=bool)
    threshold = np.uint32(min(2**32 - 1, round(dropout_p * 2**32)))
    np.greater_equal(even, threshold, out=keep.transpose(1, 2, 0)[:, 0])
    np.greater_equal(odd, threshold, out=keep.transpose(1, 2, 0)[:, 1])
    return torch.from_numpy(keep.reshape(M, 4 * quads)[:, :K])
