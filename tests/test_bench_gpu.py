"""CUDA correctness at GPT-2's c_attn shape in bf16 (K = 768, N = 2304, M = 8192, r up to 64), and at Llama-7B's
K = 4096 projections in nn.Linear's layout: what bench/gpu_check runs before it times anything. Skipped without CUDA; the same checks at small shapes run everywhere in
tests/test_fused_lora.py.
"""

import sys
from pathlib import Path

import pytest
import torch

from hybrid_lora import fused_lora, reference
from hybrid_lora.kernels.dropout import dropout_keep_mask

from conftest import TOLERANCES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `bench`

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

M, K, N, R_MAX = 8192, 768, 2304, 64
DTYPE = torch.bfloat16


def gpt2_inputs(adapter_dtype, seed=0, M=M, K=K, N=N, linear=False):
    """x, W [K, N], b, A, B, dY; with `linear`, W is nn.Linear's [N, K] storage seen through its transpose."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype, std):
        return (torch.randn(*shape, generator=g) * std).to(device="cuda", dtype=dtype)

    x = rand(M, K, dtype=DTYPE, std=1.0).requires_grad_()
    weight = rand(N, K, dtype=DTYPE, std=K ** -0.5).t() if linear else rand(K, N, dtype=DTYPE, std=K ** -0.5)
    bias = rand(N, dtype=DTYPE, std=0.02)
    lora_a = rand(K, R_MAX, dtype=adapter_dtype, std=K ** -0.5).requires_grad_()
    lora_b = rand(R_MAX, N, dtype=adapter_dtype, std=R_MAX ** -0.5).requires_grad_()
    grad_y = rand(M, N, dtype=DTYPE, std=1.0)
    return x, weight, bias, lora_a, lora_b, grad_y


def assert_close(name, got, want):
    tol = TOLERANCES[DTYPE]
    got = got.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    bound = tol["atol"] * max(1.0, scale) + tol["rtol"] * scale
    assert err <= bound, f"{name}: max |diff| {err:.3e} > {bound:.3e} (max |want| {scale:.3e})"


def assert_matches_reference(y, x, weight, bias, lora_a, lora_b, grad_y, rank, scale, seed, dropout_p):
    """y, and the dX, dA, dB its backward left, against the fp64 reference with the same dropout mask."""
    M_x, K_x = x.shape
    keep = dropout_keep_mask(M_x, K_x, seed, dropout_p, "cuda") if dropout_p > 0 else None
    d_x, d_w = x.detach().double(), weight.detach().double()
    d_bias = None if bias is None else bias.detach().double()
    # The reference sees the bf16-rounded adapters the kernel multiplies with.
    d_a, d_b = lora_a.detach().to(DTYPE).double(), lora_b.detach().to(DTYPE).double()
    want_y, _ = reference.lora_forward(d_x, d_w, d_bias, d_a, d_b, rank, scale, keep, dropout_p)
    want_dx, want_da, want_db = reference.lora_backward(grad_y.double(), d_x, d_w, d_a, d_b, rank, scale,
                                                        keep, dropout_p)
    assert_close("y", y, want_y)
    assert_close("dX", x.grad, want_dx)
    assert_close("dA", lora_a.grad, want_da)
    assert_close("dB", lora_b.grad, want_db)


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=["bf16-adapters", "fp32-adapters"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.05])
@pytest.mark.parametrize("rank", [16, 33, 64])
def test_fused_matches_the_fp64_reference_at_gpt2_shape(rank, dropout_p, adapter_dtype):
    x, weight, bias, lora_a, lora_b, grad_y = gpt2_inputs(adapter_dtype)
    scale, seed = 32.0 / rank, 1234
    y = fused_lora(x, weight, bias, lora_a, lora_b, rank=rank, scale=scale, dropout_p=dropout_p, seed=seed)
    y.backward(grad_y)
    assert_matches_reference(y, x, weight, bias, lora_a, lora_b, grad_y, rank, scale, seed, dropout_p)
    assert lora_a.grad.dtype == adapter_dtype and lora_b.grad.dtype == adapter_dtype


@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("N_llama", [4096, 11008])
def test_fused_matches_the_fp64_reference_at_llama_7b_shapes_in_linear_layout(N_llama, rank):
    M_llama, K_llama = 2048, 4096
    x, weight, bias, lora_a, lora_b, grad_y = gpt2_inputs(torch.float32, M=M_llama, K=K_llama, N=N_llama,
                                                          linear=True)
    scale, seed, dropout_p = 32.0 / rank, 1234, 0.05
    y = fused_lora(x, weight, None, lora_a, lora_b, rank=rank, scale=scale, dropout_p=dropout_p, seed=seed)
    y.backward(grad_y)
    assert_matches_reference(y, x, weight, None, lora_a, lora_b, grad_y, rank, scale, seed, dropout_p)


def test_no_recompile_within_a_rank_bucket_on_the_device():
    from bench.launches import counting_compiles

    x, weight, bias, lora_a, lora_b, grad_y = gpt2_inputs(torch.bfloat16)
    counts = {}
    with counting_compiles() as compiles:
        for rank in range(17, 33):  # one bucket: rank_block = 32
            fused_lora(x, weight, bias, lora_a, lora_b, rank=rank, scale=1.0, dropout_p=0.05).backward(grad_y)
            counts[rank] = compiles.total()
    assert len(set(counts.values())) == 1, f"kernel variants compiled per rank inside one bucket: {counts}"
