"""The fused kernels (through ``fused_lora``) against the fp64 reference: outputs and all gradients."""

import pytest
import torch
from helpers import assert_close, assert_normwise_close

from hybrid_lora import fused_lora
from hybrid_lora.kernels.dropout import dropout_keep_mask
from hybrid_lora.ops import reference


def make_inputs(M, K, N, R, dtype, device, adapter_dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dt):
        return (torch.randn(*shape, generator=g) / shape[0] ** 0.25).to(device=device, dtype=dt)

    x = rand(M, K, dt=dtype).requires_grad_()
    weight = rand(K, N, dt=dtype)
    b = rand(N, dt=dtype) if bias else None
    lora_a = rand(K, R, dt=adapter_dtype).requires_grad_()
    lora_b = rand(R, N, dt=adapter_dtype).requires_grad_()
    return x, weight, b, lora_a, lora_b


def reference_outputs(x, weight, bias, lora_a, lora_b, rank, scale, grad_y, keep=None, p=0.0):
    """fp64 reference from the very values the kernel saw."""
    d = [t.detach().double().cpu() if t is not None else None for t in (x, weight, bias, lora_a, lora_b)]
    y, _ = reference.lora_forward(*d, rank, scale, keep, p)
    grads = reference.lora_backward(grad_y.double().cpu(), d[0], d[1], d[3], d[4], rank, scale, keep, p)
    return (y, *grads)


def run_and_compare(M, K, N, R, rank, dtype, device, dropout_p=0.0, bias=True, adapter_dtype=torch.float32,
                    scale=0.75, compare=assert_close):
    """compare(name, got, want, dtype) for Y and each gradient: by default, the tolerance table's bound."""
    x, weight, b, lora_a, lora_b = make_inputs(M, K, N, R, dtype, device, adapter_dtype, bias)
    seed = 1234
    y = fused_lora(x, weight, b, lora_a, lora_b, rank=rank, scale=scale, dropout_p=dropout_p, seed=seed)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    grad_x, grad_a, grad_b = torch.autograd.grad(y, (x, lora_a, lora_b), grad_y)
    keep = dropout_keep_mask(M, K, seed, dropout_p, device).cpu() if dropout_p > 0 else None
    want = reference_outputs(x, weight, b, lora_a, lora_b, rank, scale, grad_y, keep, dropout_p)
    assert y.dtype == dtype and grad_a.dtype == adapter_dtype and grad_b.dtype == adapter_dtype
    for name, got, ref in zip(("y", "grad_x", "grad_a", "grad_b"), (y, grad_x, grad_a, grad_b), want):
        compare(name, got, ref, dtype)
    # Components past the active rank get exactly zero gradient.
    assert (grad_a[:, rank:] == 0).all() and (grad_b[rank:] == 0).all()


SHAPES = [  # M, K, N, R, rank
    (1, 32, 48, 16, 16),    # a single row; rank = R
    (17, 40, 72, 24, 19),   # nothing a multiple of a block; rank not a power of two
    (33, 64, 80, 8, 1),     # rank 1
    (20, 24, 40, 80, 70),   # rank above 64: several rank chunks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-R{}-r{}".format(*s))
def test_matches_reference(shape, dtype, device, nan_outputs):
    run_and_compare(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropout_matches_reference_given_the_kernel_mask(dtype, device, nan_outputs):
    run_and_compare(19, 48, 40, 20, 12, dtype, device, dropout_p=0.3)


def test_no_bias_and_adapters_in_input_dtype(device, nan_outputs):
    run_and_compare(9, 32, 24, 16, 5, torch.float16, device, bias=False, adapter_dtype=torch.float16)


def test_non_contiguous_and_batched_input(device):
    x, weight, b, lora_a, lora_b = make_inputs(12, 40, 24, 16, torch.float32, device)
    wide = torch.randn(3, 4, 80, device=device)
    x_strided = wide[..., ::2].requires_grad_()  # [3, 4, 40], last-dim stride 2
    assert not x_strided.is_contiguous()
    y = fused_lora(x_strided, weight, b, lora_a, lora_b, rank=9, scale=2.0)
    assert y.shape == (3, 4, 24)
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, (x_strided, lora_a, lora_b), grad_y)
    want = reference_outputs(x_strided.reshape(12, 40), weight, b, lora_a, lora_b, 9, 2.0, grad_y.reshape(12, 24))
    assert_close("y", y.reshape(12, 24), want[0], torch.float32)
    assert_close("grad_x", got[0].reshape(12, 40), want[1], torch.float32)
    assert_close("grad_a", got[1], want[2], torch.float32)
    assert_close("grad_b", got[2], want[3], torch.float32)


def test_empty_batch(device):
    _, weight, b, lora_a, lora_b = make_inputs(1, 16, 24, 8, torch.float32, device)
    x = torch.zeros(0, 16, device=device, requires_grad=True)
    y = fused_lora(x, weight, b, lora_a, lora_b, rank=8, scale=1.0, dropout_p=0.1)
    assert y.shape == (0, 24)
    grad_x, grad_a, grad_b = torch.autograd.grad(y.sum(), (x, lora_a, lora_b))
    assert grad_x.shape == (0, 16) and (grad_a == 0).all() and (grad_b == 0).all()


def test_frozen_input_skips_its_gradient(device):
    x, weight, b, lora_a, lora_b = make_inputs(6, 16, 24, 8, torch.float32, device)
    y = fused_lora(x.detach(), weight, b, lora_a, lora_b, rank=4, scale=1.0)
    grad_a, grad_b = torch.autograd.grad(y.sum(), (lora_a, lora_b))
    want = reference_outputs(x, weight, b, lora_a, lora_b, 4, 1.0, torch.ones_like(y))
    assert_close("grad_a", grad_a, want[2], torch.float32)
    assert_close("grad_b", grad_b, want[3], torch.float32)


def test_autocast_fp16_base_with_fp32_adapters(device):
    """As in training: autocast casts x, W, b; A and B stay fp32 and get fp32 gradients."""
    x, weight, b, lora_a, lora_b = make_inputs(10, 32, 40, 16, torch.float32, device)
    with torch.autocast(device.type, dtype=torch.float16):
        y = fused_lora(x, weight, b, lora_a, lora_b, rank=16, scale=0.5)
    assert y.dtype == torch.float16
    grad_y = torch.randn_like(y)
    grad_x, grad_a, grad_b = torch.autograd.grad(y, (x, lora_a, lora_b), grad_y)
    assert grad_x.dtype == torch.float32 and grad_a.dtype == torch.float32 and grad_b.dtype == torch.float32
    half = [t.half() if t is not None else None for t in (x, weight, b)]
    want = reference_outputs(*half, lora_a.half(), lora_b.half(), 16, 0.5, grad_y)
    for name, got, ref in zip(("y", "grad_x", "grad_a", "grad_b"), (y, grad_x, grad_a, grad_b), want):
        assert_close(name, got, ref, torch.float16)


def assert_normwise_close_seed_0(name, got, want, dtype):
    assert_normwise_close(name, got, want, dtype, seed=0)


def test_bf16_on_cuda_at_the_gpt2_shape():
    """Normwise, not the tolerance table's 0.15 * max |want| for bf16, which a LoRA term 10% off passes."""
    if not torch.cuda.is_available():
        pytest.skip("bf16 kernels need a CUDA device (the CPU interpreter has no bf16 arithmetic)")
    run_and_compare(8192, 768, 2304, 64, 64, torch.bfloat16, torch.device("cuda"), dropout_p=0.05, scale=0.5,
                    compare=assert_normwise_close_seed_0)


def test_the_bf16_bound_fails_a_missing_dropout_rescale():
    """The CUDA test's bound, on its inputs' distribution (fewer rows, as small as M = 8192's): a LoRA term
    without its 1 / (1 - p), i.e. scaled by 1 - p = 0.95, is out of bounds in Y and every gradient."""
    M, K, N, R, p, scale = 32, 768, 2304, 64, 0.05, 0.5
    x, weight, b, lora_a, lora_b = make_inputs(M, K, N, R, torch.float32, torch.device("cpu"))
    x = x.detach() * (M / 8192) ** 0.25
    keep = dropout_keep_mask(M, K, 1234, p, torch.device("cpu"))
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(1))
    want = reference_outputs(x, weight, b, lora_a, lora_b, R, scale, grad_y, keep, p)
    wrong = reference_outputs(x, weight, b, lora_a, lora_b, R, scale * (1 - p), grad_y, keep, p)
    for name, w, bad in zip(("y", "grad_x", "grad_a", "grad_b"), want, wrong):
        with pytest.raises(AssertionError, match="normwise relative error"):
            assert_normwise_close(name, bad, w, torch.bfloat16, seed=0)
