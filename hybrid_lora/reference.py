"""Plain PyTorch reference of every kernel in ``hybrid_lora.kernels``.

Written as simply as possible, in whatever dtype it is given (tests pass fp64),
with the dropout mask passed in explicitly. The backward is written out in
closed form, so that the kernels' gradients are compared with formulas and the
formulas with autograd. Tests and benchmarks import these functions; they are
the specification, never edited to make a kernel pass.

Layout: X [M, K], W [K, N] (``transformers`` Conv1D), b [N], A [K, R], B [R, N],
active rank r <= R, scale s = alpha / r (Hu et al., 2022, "LoRA", eq. 3):
    Y = X W + b + s D(X) A[:, :r] B[:r, :],   D(X) = X * keep / (1 - p).
"""

import torch


def dropout_input(x, keep_mask=None, dropout_p=0.0):
    """D(X) = X * keep / (1 - p); the identity when there is no mask."""
    if keep_mask is None:
        return x
    return x * keep_mask.to(x.dtype) / (1.0 - dropout_p)


def lora_down(x, lora_a, rank, keep_mask=None, dropout_p=0.0):
    """S = D(X) A[:, :r]  -> [M, r]."""
    return dropout_input(x, keep_mask, dropout_p) @ lora_a[:, :rank]


def lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, keep_mask=None, dropout_p=0.0):
    """Y = X W + b + s S B[:r, :] with S = D(X) A[:, :r]. Returns (Y [M, N], S [M, r])."""
    s_down = lora_down(x, lora_a, rank, keep_mask, dropout_p)
    y = x @ weight + scale * (s_down @ lora_b[:rank])
    if bias is not None:
        y = y + bias
    return y, s_down


def lora_backward(grad_y, x, weight, lora_a, lora_b, rank, scale, keep_mask=None, dropout_p=0.0):
    """Closed-form gradients of ``lora_forward`` with respect to X, A and B.

    dS = s dY B_r^T;  dX = dY W^T + D^T(dS A_r^T);  dA_r = D(X)^T dS;  dB_r = s S^T dY.
    dA and dB are zero past the active rank. Returns (dX [M, K], dA [K, R], dB [R, N]).
    """
    s_down = lora_down(x, lora_a, rank, keep_mask, dropout_p)
    grad_s = scale * grad_y @ lora_b[:rank].t()
    grad_x = grad_y @ weight.t() + dropout_input(grad_s @ lora_a[:, :rank].t(), keep_mask, dropout_p)
    grad_a = torch.zeros_like(lora_a)
    grad_a[:, :rank] = dropout_input(x, keep_mask, dropout_p).t() @ grad_s
    grad_b = torch.zeros_like(lora_b)
    grad_b[:rank] = scale * s_down.t() @ grad_y
    return grad_x, grad_a, grad_b


def merged_weight(weight, lora_a, lora_b, rank, scale):
    """W + s A[:, :r] B[:r, :]: the frozen weight with the adapter folded in."""
    return weight + scale * lora_a[:, :rank] @ lora_b[:rank]
