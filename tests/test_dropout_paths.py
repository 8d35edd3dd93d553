"""The PyTorch path and the kernels drop the same elements of x for the same seed, forward and backward.

With W = 0, no bias, A = B = I (K = R = N), rank K and scale 1, the op is
y = D(x) = x * keep / (1 - p): the zeros of y are the elements the forward
dropped, and with dY = 1 the zeros of dX = D^T(dY) those the backward
dropped. The comparison is exact, element by element, on both paths.
"""

import pytest
import torch

from hybrid_lora import fused_lora
from hybrid_lora.ops import backend


def dropped_elements(device, M, K, seed, p, row_offset=0):
    """{'forward', 'backward'}: [M, K] bool masks of the elements the op drops on the backend path in use, for
    rows [row_offset, row_offset + M) of a batch."""
    x = (torch.rand(M, K, generator=torch.Generator().manual_seed(seed % 2**31)) + 0.5).to(device)
    x.requires_grad_()
    eye = torch.eye(K, device=device)
    y = fused_lora(x, torch.zeros(K, K, device=device), None, eye, eye, rank=K, scale=1.0, dropout_p=p, seed=seed,
                   row_offset=row_offset)
    (grad_x,) = torch.autograd.grad(y, x, torch.ones_like(y))
    forward, backward = y == 0, grad_x == 0
    # Kept elements are x / (1 - p), and dropout drops about p of them.
    torch.testing.assert_close(y[~forward], x.detach()[~forward] / (1 - p))
    assert 0 < forward.sum() < forward.numel()
    return {"forward": forward, "backward": backward}


@pytest.mark.parametrize("seed", [5, 2**40 + 3])
def test_both_paths_drop_the_same_elements(seed, device, monkeypatch):
    if device.type == "cpu":
        monkeypatch.setenv("HYBRID_LORA_BACKEND", "triton")
        if backend.select_backend(device) != "triton":
            pytest.skip("Triton cannot run here")
    masks = {}
    for path in ("triton", "torch"):
        monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
        backend.refresh()
        masks[path] = dropped_elements(device, M=24, K=32, seed=seed, p=0.3)
    for direction in ("forward", "backward"):
        assert torch.equal(masks["triton"][direction], masks["torch"][direction]), direction
    assert torch.equal(masks["triton"]["forward"], masks["triton"]["backward"])
