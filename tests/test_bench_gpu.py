"""CUDA correctness at GPT-2's c_attn shape in bf16 (K = 768, N = 2304, M = 8192, r up to 64), and at Llama-7B's
K = 4096 projections in nn.Linear's layout: what bench/gpu_check runs before it times anything.

Every output (Y, dX, dA, dB) is compared with the fp64 reference by its normwise relative error
||got - want|| / ||want||, under a bound tied to the compute dtype that a wrong kernel cannot meet; the
inputs are fresh random draws on every run (the seed is in each failure message), and every buffer the
kernels allocate starts as NaN, so an element they never write fails. tests/test_gpu_check_bounds.py runs
the same comparison on the CPU against deliberately broken kernels and shows each bound fail. Skipped
without CUDA; the same checks at small shapes run everywhere in tests/test_fused_lora.py.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_normwise_close

from hybrid_lora import fused_lora
from hybrid_lora.kernels.dropout import dropout_keep_mask
from hybrid_lora.ops import reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `bench`

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

M, K, N, R_MAX = 8192, 768, 2304, 64
DTYPE = torch.bfloat16


def fresh_seed() -> int:
    """A new seed on every run, so that no fixed draw can hide a wrong kernel; failures print it."""
    return int.from_bytes(os.urandom(4), "little")


def gpt2_inputs(adapter_dtype, seed, M=M, K=K, N=N, R=R_MAX, linear=False, device="cuda", dtype=DTYPE):
    """x, W [K, N], b, A, B, dY; with `linear`, W is nn.Linear's [N, K] storage seen through its transpose."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype, std):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = rand(M, K, dtype=dtype, std=1.0).requires_grad_()
    weight = rand(N, K, dtype=dtype, std=K ** -0.5).t() if linear else rand(K, N, dtype=dtype, std=K ** -0.5)
    bias = rand(N, dtype=dtype, std=0.02)
    lora_a = rand(K, R, dtype=adapter_dtype, std=K ** -0.5).requires_grad_()
    lora_b = rand(R, N, dtype=adapter_dtype, std=R ** -0.5).requires_grad_()
    grad_y = rand(M, N, dtype=dtype, std=1.0)
    return x, weight, bias, lora_a, lora_b, grad_y


def reference_gradients(x, weight, bias, lora_a, lora_b, grad_y, rank, scale, seed, dropout_p, dtype):
    """{name: fp64 reference} for Y, dX, dA, dB, from the very values the kernels saw and the kernels' mask."""
    M_x, K_x = x.shape
    keep = dropout_keep_mask(M_x, K_x, seed, dropout_p, x.device) if dropout_p > 0 else None
    d_x, d_w = x.detach().double(), weight.detach().double()
    d_bias = None if bias is None else bias.detach().double()
    # The reference sees the adapters rounded to the compute dtype, as the kernels multiply them.
    d_a, d_b = lora_a.detach().to(dtype).double(), lora_b.detach().to(dtype).double()
    want_y, _ = reference.lora_forward(d_x, d_w, d_bias, d_a, d_b, rank, scale, keep, dropout_p)
    grads = reference.lora_backward(grad_y.double(), d_x, d_w, d_a, d_b, rank, scale, keep, dropout_p)
    return dict(zip(("y", "dX", "dA", "dB"), (want_y, *grads)))


def run_fused(x, weight, bias, lora_a, lora_b, grad_y, rank, scale, seed, dropout_p):
    """{name: tensor} of Y and the dX, dA, dB its backward leaves."""
    y = fused_lora(x, weight, bias, lora_a, lora_b, rank=rank, scale=scale, dropout_p=dropout_p, seed=seed)
    y.backward(grad_y)
    return {"y": y, "dX": x.grad, "dA": lora_a.grad, "dB": lora_b.grad}


def check_against_reference(inputs, rank, scale, dropout_p, dtype=DTYPE):
    """Run the op on `inputs` (x, W, b, A, B, dY) with fresh seeds; assert every output's normwise bound."""
    seed = fresh_seed()
    got = run_fused(*inputs, rank, scale, seed, dropout_p)
    want = reference_gradients(*inputs, rank, scale, seed, dropout_p, dtype)
    for name in want:
        assert_normwise_close(name, got[name], want[name], dtype, seed)
    return got


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=["bf16-adapters", "fp32-adapters"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.05])
@pytest.mark.parametrize("rank", [16, 33, 64])
@pytest.mark.usefixtures("nan_outputs")
def test_fused_matches_the_fp64_reference_at_gpt2_shape(rank, dropout_p, adapter_dtype):
    inputs = gpt2_inputs(adapter_dtype, fresh_seed())
    got = check_against_reference(inputs, rank, 32.0 / rank, dropout_p)
    assert got["dA"].dtype == adapter_dtype and got["dB"].dtype == adapter_dtype


@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("N_llama", [4096, 11008])
@pytest.mark.usefixtures("nan_outputs")
def test_fused_matches_the_fp64_reference_at_llama_7b_shapes_in_linear_layout(N_llama, rank):
    inputs = list(gpt2_inputs(torch.float32, fresh_seed(), M=2048, K=4096, N=N_llama, linear=True))
    inputs[2] = None  # Llama's projections have no bias
    check_against_reference(inputs, rank, 32.0 / rank, 0.05)


def test_the_pytorch_path_and_the_kernels_drop_the_same_elements_on_the_device(monkeypatch):
    from test_dropout_paths import dropped_elements

    from hybrid_lora.ops import backend

    seed, masks = fresh_seed(), {}
    for path in ("triton", "torch"):
        monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
        backend.refresh()
        masks[path] = dropped_elements(torch.device("cuda"), M=M, K=64, seed=seed, p=0.05)
    for direction in ("forward", "backward"):
        assert torch.equal(masks["triton"][direction], masks["torch"][direction]), f"{direction}; seed {seed}"


def test_no_recompile_within_a_rank_bucket_on_the_device():
    from bench.launches import counting_compiles

    x, weight, bias, lora_a, lora_b, grad_y = gpt2_inputs(torch.bfloat16, fresh_seed())
    counts = {}
    with counting_compiles() as compiles:
        for rank in range(17, 33):  # one bucket: rank_block = 32
            fused_lora(x, weight, bias, lora_a, lora_b, rank=rank, scale=1.0, dropout_p=0.05).backward(grad_y)
            counts[rank] = compiles.total()
    assert len(set(counts.values())) == 1, f"kernel variants compiled per rank inside one bucket: {counts}"
