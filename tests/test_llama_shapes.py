"""The fused op at Llama-7B's layer shapes (K = 4096; N = 4096, 11008 and a GQA-sized 1024), few rows.

The weight is given as ``nn.Linear`` holds it, [N, K], read through its
transposed view (strides (1, K)), as ``LoRALinear`` passes it. Every output
and gradient is compared with the fp64 reference.

Under the Triton interpreter each tile step costs milliseconds whatever its
size, so the 16-wide interpreter tiles would take tens of minutes at K = 4096.
Here the kernels run with one config of large tiles instead (still masked at
N = 11008, which no power-of-two tile divides): what is tested is the kernels'
code at these sizes, not the autotune configs (``bench.compile_report`` covers
those at K = 4096 for sm_90).
"""

import importlib

import pytest
import torch
import triton
from helpers import assert_close
from test_fused_lora import make_inputs, reference_outputs
from triton.runtime.autotuner import Autotuner

from hybrid_lora import fused_lora
from hybrid_lora.kernels.dropout import dropout_keep_mask

KERNEL_MODULES = ("hybrid_lora.kernels.skinny", "hybrid_lora.kernels.lora_forward",
                  "hybrid_lora.kernels.lora_backward")
# Reduction and output tiles large enough that K = 4096 takes a few steps; BLOCK_M stays small as M is.
LARGE_TILES = {"BLOCK_M": 16, "BLOCK_N": 1024, "BLOCK_K": 512, "BLOCK_C": 1024, "GROUP_M": 1}

K = 4096
CASES = [  # M, N, R, rank, dropout: q/o (4096), MLP up (11008), GQA k/v (1024)
    (5, 4096, 64, 16, 0.0),
    (9, 11008, 64, 64, 0.0),
    (3, 1024, 64, 5, 0.1),
]


@pytest.fixture
def large_interpreter_tiles(monkeypatch):
    if not torch.cuda.is_available():
        for name in KERNEL_MODULES:
            for kernel in vars(importlib.import_module(name)).values():
                if isinstance(kernel, Autotuner):
                    blocks = {key: LARGE_TILES[key] for key in kernel.configs[0].kwargs}
                    monkeypatch.setattr(kernel, "configs", [triton.Config(blocks, num_warps=1, num_stages=1)])


@pytest.mark.parametrize("M, N, R, rank, dropout_p", CASES)
def test_fused_op_at_llama_7b_shapes(M, N, R, rank, dropout_p, large_interpreter_tiles, device):
    dtype = torch.float32
    x, weight, bias, lora_a, lora_b = make_inputs(M, K, N, R, dtype, device, bias=False)
    weight = weight.t().contiguous().t()  # nn.Linear's [N, K] storage, seen as [K, N]
    assert weight.stride() == (1, K)
    seed, scale = 1234, 32.0 / rank
    y = fused_lora(x, weight, bias, lora_a, lora_b, rank=rank, scale=scale, dropout_p=dropout_p, seed=seed)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(y, (x, lora_a, lora_b), grad_y)
    keep = dropout_keep_mask(M, K, seed, dropout_p, device).cpu() if dropout_p > 0 else None
    want = reference_outputs(x, weight, bias, lora_a, lora_b, rank, scale, grad_y, keep, dropout_p)
    for name, got, ref in zip(("y", "grad_x", "grad_a", "grad_b"), (y, *grads), want):
        assert_close(name, got, ref, dtype)
    assert (grads[1][:, rank:] == 0).all() and (grads[2][rank:] == 0).all()
