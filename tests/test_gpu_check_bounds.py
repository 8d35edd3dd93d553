"""The GPU checks' bounds fail wrong kernels: tests/test_bench_gpu.py's comparison, on the CPU, against broken ones.

Each broken variant is the real kernels with one mistake patched into their
launchers: the forward or the dX kernel without the 1 / (1 - p) of inverted
dropout, the dA reduction without it, and the dA reduction with one of its row
splits lost. They run in fp32 under the interpreter (it has no bf16); the
bound they must break is bf16's, the loosest the GPU checks use, with the
GPU checks' input sizes relative to each other (x ~ 1, W and A ~ K^-1/2,
B ~ R^-1/2, scale 32 / r, p = 0.05). The correct kernels pass the same
comparison, so a failure is the mistake's.
"""

import importlib

import pytest
import torch
from helpers import assert_normwise_close
from test_bench_gpu import gpt2_inputs, reference_gradients, run_fused

from hybrid_lora.ops import backend

forward_module = importlib.import_module("hybrid_lora.kernels.lora_forward")
backward_module = importlib.import_module("hybrid_lora.kernels.lora_backward")

# 260 rows: two row splits of the dA reduction on a CPU (lora_backward._row_splits).
M, K, N, R, RANK, P = 260, 32, 16, 16, 16, 0.05


class _PatchedLaunch:
    """Stands for a kernel in its launcher: ``kernel[grid](*args)`` runs `change(named_args, launch)`."""

    def __init__(self, kernel, change):
        self.kernel, self.change = kernel, change

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args))
            return self.change(named, lambda **new: self.kernel[grid](*{**named, **new}.values(), **kwargs))
        return launch


def forward_without_keep_scale(monkeypatch):
    real = forward_module.skinny_product
    monkeypatch.setattr(forward_module, "skinny_product",
                        lambda x, a, rank, out_factor, *rest, **kwargs: real(x, a, rank, 1.0, *rest, **kwargs))


def grad_x_without_keep_scale(monkeypatch):
    kernel = backward_module._fused_grad_x_kernel
    monkeypatch.setattr(backward_module, "_fused_grad_x_kernel",
                        _PatchedLaunch(kernel, lambda named, run: run(keep_scale=1.0)))


def grad_a_without_keep_scale(monkeypatch):
    real = backward_module._weight_grad

    def weight_grad(u, g, rank, keep_scale, *rest, transpose_out, **kwargs):
        return real(u, g, rank, 1.0 if not transpose_out else keep_scale, *rest, transpose_out=transpose_out,
                    **kwargs)

    monkeypatch.setattr(backward_module, "_weight_grad", weight_grad)


def grad_a_losing_a_split(monkeypatch):
    kernel = backward_module._lora_grad_weight_kernel

    def drop_last_split(named, run):
        run()
        if named["C"] == K:  # dA's reduction (dB's runs over N)
            partial = named["out_ptr"]
            assert partial.shape[0] > 1, "one split only: nothing to lose"
            partial[-1].zero_()

    monkeypatch.setattr(backward_module, "_lora_grad_weight_kernel", _PatchedLaunch(kernel, drop_last_split))


BROKEN = {  # variant: the outputs its mistake reaches
    "forward without 1/(1-p)": (forward_without_keep_scale, {"y", "dB"}),
    "dX without 1/(1-p)": (grad_x_without_keep_scale, {"dX"}),
    "dA without 1/(1-p)": (grad_a_without_keep_scale, {"dA"}),
    "dA losing a row split": (grad_a_losing_a_split, {"dA"}),
}


def failing_outputs(seed=0):
    """The outputs whose bf16 bound the kernels in use break, on the GPU checks' comparison."""
    inputs = gpt2_inputs(torch.float32, seed, M=M, K=K, N=N, R=R, device="cpu", dtype=torch.float32)
    got = run_fused(*inputs, RANK, 32.0 / RANK, seed, P)
    want = reference_gradients(*inputs, RANK, 32.0 / RANK, seed, P, torch.float32)
    failing = set()
    for name in want:
        try:
            assert_normwise_close(name, got[name], want[name], torch.bfloat16, seed)
        except AssertionError:
            failing.add(name)
    return failing


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "triton")
    backend.refresh()
    if backend.select_backend(torch.device("cpu")) != "triton":
        pytest.skip("Triton cannot run here")


def test_the_correct_kernels_pass():
    assert failing_outputs() == set()


@pytest.mark.parametrize("variant", list(BROKEN))
def test_a_broken_kernel_fails_the_bound_of_each_output_it_reaches(variant, monkeypatch):
    breaks, reached = BROKEN[variant]
    breaks(monkeypatch)
    assert failing_outputs() == reached
