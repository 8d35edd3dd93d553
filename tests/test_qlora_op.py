"""``fused_lora_4bit`` (both paths) against the fp64 reference over the dequantized 4-bit weight."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed (extra qlora)")

from test_fused_lora import assert_close, reference_outputs  # noqa: E402

from hybrid_lora.kernels.dropout import dropout_keep_mask  # noqa: E402
from hybrid_lora.ops import backend  # noqa: E402
from hybrid_lora.ops.fused_lora_4bit import fused_lora_4bit  # noqa: E402
from hybrid_lora.ops.nf4_reference import Quant4bit, dequantize  # noqa: E402


def quantized_weight(N, K, quant_type="nf4", nested=False, blocksize=64, seed=0):
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) / K ** 0.25
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested)
    return Quant4bit.from_bnb(packed, state)


def make_inputs(M, K, N, R, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed + 1)

    def rand(*shape, dt):
        return (torch.randn(*shape, generator=g) / shape[0] ** 0.25).to(dtype=dt)

    x = rand(M, K, dt=dtype).requires_grad_()
    b = rand(N, dt=dtype) if bias else None
    lora_a = rand(K, R, dt=torch.float32).requires_grad_()
    lora_b = rand(R, N, dt=torch.float32).requires_grad_()
    return x, b, lora_a, lora_b


def run_and_compare(M, K, N, R, rank, dtype, quant_type="nf4", nested=False, blocksize=64, dropout_p=0.0,
                    scale=0.75, bias=True):
    quant = quantized_weight(N, K, quant_type, nested, blocksize)
    x, b, lora_a, lora_b = make_inputs(M, K, N, R, dtype, bias)
    seed = 77
    y = fused_lora_4bit(x, quant, b, lora_a, lora_b, rank=rank, scale=scale, dropout_p=dropout_p, seed=seed)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grad_x, grad_a, grad_b = torch.autograd.grad(y, (x, lora_a, lora_b), grad_y)
    keep = dropout_keep_mask(M, K, seed, dropout_p, x.device) if dropout_p > 0 else None
    # The reference multiplies by W as the op sees it: decoded, rounded to the compute dtype.
    weight = dequantize(quant, dtype).t()
    want = reference_outputs(x, weight, b, lora_a, lora_b, rank, scale, grad_y, keep, dropout_p)
    assert y.dtype == dtype and y.shape == (M, N)
    for name, got, ref in zip(("y", "grad_x", "grad_a", "grad_b"), (y, grad_x, grad_a, grad_b), want):
        assert_close(name, got, ref, dtype)
    assert (grad_a[:, rank:] == 0).all() and (grad_b[rank:] == 0).all()


CASES = [  # M, K, N, R, rank, quant_type, nested, blocksize
    (1, 32, 48, 16, 16, "nf4", False, 64),     # a single row; rank = R
    (17, 40, 72, 24, 19, "fp4", True, 128),    # nothing a multiple of a block; rank not a power of two
    (5, 33, 21, 8, 1, "nf4", True, 32),        # an odd element count (the last byte half used); rank 1
    (20, 24, 40, 80, 70, "fp4", False, 64),    # rank above 64: two rank chunks
    (13, 64, 40, 16, 9, "nf4", True, 32),      # K a multiple of the blocksize: one scale per row of a tile
    (3, 128, 24, 8, 8, "fp4", False, 64),      # the same, plain absmax, two blocks per row
]


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", request.param)
    backend.refresh()
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-K{}-N{}-R{}-r{}-{}-{}-b{}".format(*c))
def test_matches_reference(case, dtype, path, nan_outputs):
    M, K, N, R, rank, quant_type, nested, blocksize = case
    run_and_compare(M, K, N, R, rank, dtype, quant_type, nested, blocksize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropout_matches_reference(dtype, path, nan_outputs):
    run_and_compare(19, 48, 40, 20, 12, dtype, "nf4", True, 64, dropout_p=0.3)


def test_no_bias_and_a_batch_dimension(path):
    quant = quantized_weight(24, 32)
    x, _, lora_a, lora_b = make_inputs(6, 32, 24, 16, torch.float32, bias=False)
    y = fused_lora_4bit(x.reshape(2, 3, 32), quant, None, lora_a, lora_b, rank=5, scale=2.0)
    flat = fused_lora_4bit(x, quant, None, lora_a, lora_b, rank=5, scale=2.0)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y.reshape(6, 24), flat)


class _LargeAllocations(TorchDispatchMode):
    """Records every floating-point tensor an aten op returns whose storage holds >= `limit` elements (views of
    smaller storage, such as an expanded scalar, allocate nothing and are not counted)."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() \
                    and t.untyped_storage().nbytes() >= self.limit * t.element_size():
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_triton_path_makes_no_full_size_weight(dropout_p, monkeypatch):
    """Forward and backward allocate nothing of W's size on the Triton path; the PyTorch path does (the check
    sees it)."""
    M, K, N = 4, 48, 64
    quant = quantized_weight(N, K, "nf4", True, 64)
    for forced, expect_full_size in (("triton", False), ("torch", True)):
        monkeypatch.setenv("HYBRID_LORA_BACKEND", forced)
        backend.refresh()
        x, b, lora_a, lora_b = make_inputs(M, K, N, 16, torch.float32)
        with _LargeAllocations(N * K) as mode:
            y = fused_lora_4bit(x, quant, b, lora_a, lora_b, rank=7, scale=1.5, dropout_p=dropout_p, seed=3)
            y.sum().backward()
        assert bool(mode.seen) == expect_full_size, f"{forced}: {mode.seen}"


@pytest.mark.parametrize("change, message", [
    (dict(quant_type="int4"), "quant_type is 'int4'"),
    (dict(blocksize=96), "blocksize is 96"),
    (dict(packed=torch.zeros(1536 // 2, dtype=torch.bfloat16)), "quant_storage"),
    (dict(packed=torch.zeros(10, 1, dtype=torch.uint8)), "10 bytes"),
])
def test_unsupported_weights_are_refused_in_one_line(change, message):
    import dataclasses

    quant = dataclasses.replace(quantized_weight(32, 48), **change)
    x, b, lora_a, lora_b = make_inputs(2, 48, 32, 16, torch.float32)
    with pytest.raises(ValueError, match=message) as info:
        fused_lora_4bit(x, quant, b, lora_a, lora_b, rank=4, scale=1.0)
    assert "\n" not in str(info.value)


def test_wrong_input_width_is_refused():
    quant = quantized_weight(32, 48)
    x, b, lora_a, lora_b = make_inputs(2, 40, 32, 16, torch.float32)
    with pytest.raises(ValueError, match=r"x has shape \(2, 40\)"):
        fused_lora_4bit(x, quant, b, lora_a, lora_b, rank=4, scale=1.0)


def test_compiled_fullgraph_serves_every_rank(fresh_dynamo):
    from torch._dynamo.testing import CompileCounter

    quant = quantized_weight(24, 32, "nf4", True)
    x, b, lora_a, lora_b = make_inputs(5, 32, 24, 16, torch.float32)
    rank, scale, seed = torch.tensor(4), torch.tensor(0.5), torch.tensor(3)

    def layer(x, lora_a, lora_b):
        return fused_lora_4bit(x, quant, b, lora_a, lora_b, rank=rank, scale=scale, dropout_p=0.1, seed=seed)

    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    for r in (4, 7, 16):
        rank.fill_(r)
        got = compiled(x, lora_a, lora_b)
        got_grads = torch.autograd.grad(got.sum(), (x, lora_a, lora_b))
        want = layer(x, lora_a, lora_b)
        want_grads = torch.autograd.grad(want.sum(), (x, lora_a, lora_b))
        torch.testing.assert_close(got, want)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w)
    assert counter.frame_count == 1


def test_bf16_compute_on_the_pytorch_path(monkeypatch):
    """bf16 (the interpreter has no bf16 arithmetic: the kernels' bf16 runs are GPU tests)."""
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    backend.refresh()
    run_and_compare(9, 40, 24, 16, 11, torch.bfloat16, "nf4", True, 64, dropout_p=0.1)
