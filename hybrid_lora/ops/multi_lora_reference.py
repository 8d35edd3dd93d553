"""Plain PyTorch reference of the mixed-batch op (``kernels/multi_lora.py``), one row at a time.

Written as simply as possible, in whatever dtype it is given (tests pass
fp64); the specification, never edited to make a kernel pass. Layout as in
``reference``: X [M, K], W [K, N], b [N], adapters stacked A [slots, K, R],
B [slots, R, N]; row i names a slot a_i (-1: none), a rank r_i and a scale s_i:

    Y[i] = X[i] W + b + s_i X[i] A[a_i][:, :r_i] B[a_i][:r_i, :]
"""

import torch


def multi_lora_forward(x, weight, bias, lora_a, lora_b, slots, ranks, scales):
    """Y [M, N] of the mixed batch; slots, ranks, scales: [M] tensors (read on the host, row by row)."""
    y = x @ weight
    if bias is not None:
        y = y + bias
    rows = []
    for i in range(x.shape[0]):
        slot, rank = int(slots[i]), int(ranks[i])
        row = y[i]
        if slot >= 0:
            row = row + scales[i].to(x.dtype) * (x[i] @ lora_a[slot, :, :rank].to(x.dtype)) @ lora_b[slot, :rank].to(
                x.dtype)
        rows.append(row)
    return torch.stack(rows) if rows else y


def multi_lora_down(x, lora_a, slots, ranks):
    """S [M, R]: S[i, :r_i] = X[i] A[a_i][:, :r_i], zero past r_i and for rows of no adapter (row order of X)."""
    s_down = torch.zeros(x.shape[0], lora_a.shape[2], dtype=x.dtype, device=x.device)
    for i in range(x.shape[0]):
        slot, rank = int(slots[i]), int(ranks[i])
        if slot >= 0:
            s_down[i, :rank] = x[i] @ lora_a[slot, :, :rank].to(x.dtype)
    return s_down
