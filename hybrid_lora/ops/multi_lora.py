"""``multi_lora``: the mixed-batch op for serving, its input checks, and its custom op.

    y_i = x_i W + b + s_i x_i A[a_i][:, :r_i] B[a_i][:r_i, :]

Every row i of x [..., K] (every token) names an adapter slot a_i (-1: none),
a rank r_i and a scale s_i, all three [M] device tensors (M = x.numel() / K);
the adapters are stacked A [slots, K, R], B [slots, R, N]. Nothing about the
call depends on their values on the host, so one compiled graph (and one CUDA
graph) serves every mix of adapters and ranks. Inference only: there is no
dropout and no backward, and a call that autograd would have to differentiate
is refused in one line.

One custom op per call, whatever the mix: the frozen product ``addmm`` and the
LoRA term of every adapter run inside it, on the Triton kernels
(``kernels/multi_lora.py``: rows grouped by adapter, each group's work
following its own ranks) or on the PyTorch path (below). The reference is
``multi_lora_reference``.
"""

from typing import Optional

import torch

from hybrid_lora.ops.backend import chosen_backend

_FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_TRITON_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32))
_INT_DTYPES = frozenset((torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8))


@torch.library.custom_op("hybrid_lora::multi_lora_forward", mutates_args=())
def multi_lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                       lora_b: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                       use_kernels: bool) -> torch.Tensor:
    """Y [M, N] = x W + b + the LoRA term of each row's adapter at its rank; x: [M, K].

    A custom op (opaque to torch.compile, called through its fake) for the
    reasons ``fused_lora_forward`` gives; with no backward registered, it is an
    inference op.
    """
    y = torch.addmm(bias, x, weight) if bias is not None else torch.mm(x, weight)
    if use_kernels:
        from hybrid_lora.kernels.multi_lora import multi_lora_add_

        return multi_lora_add_(y, x, lora_a, lora_b, slots, ranks, scales)
    return _torch_path_add_(y, x, lora_a, lora_b, slots, ranks, scales)


@multi_lora_forward.register_fake
def _forward_fake(x, weight, bias, lora_a, lora_b, slots, ranks, scales, use_kernels):
    return x.new_empty((x.shape[0], weight.shape[1]))


def _torch_path_add_(y, x, lora_a, lora_b, slots, ranks, scales):
    """y += the LoRA term, composed of PyTorch ops: every slot's adapter as one wide one, masked per row.

        y += (x [A_0 | A_1 | ...] * C) [B_0 ; B_1 ; ...],   C[i, (s, j)] = s_i if s = a_i and j < r_i else 0

    Two GEMMs with static shapes and no host read: it computes slots times the
    LoRA FLOPs of one adapter (a fallback for the CPU and fp64, where the
    kernels do not run), and the masked columns drop every adapter but the
    row's own and every component at or past its rank.
    """
    n_slots, K, R = lora_a.shape
    dtype = x.dtype
    wide_a = lora_a.permute(1, 0, 2).reshape(K, n_slots * R).to(dtype)
    column_slot = torch.arange(n_slots, device=x.device).repeat_interleave(R)
    column_rank = torch.arange(R, device=x.device).repeat(n_slots)
    keep = (slots.unsqueeze(1) == column_slot) & (column_rank < ranks.unsqueeze(1))
    coef = keep.to(dtype) * scales.to(dtype).unsqueeze(1)
    return y.addmm_(torch.mm(x, wide_a) * coef, lora_b.reshape(n_slots * R, -1).to(dtype))


def _error(what, got, expected):
    return ValueError(f"multi_lora: {what} {got}; expected {expected}")


def _check_inputs(x, weight, bias, lora_a, lora_b, slots, ranks, scales):
    for name, tensor in (("x", x), ("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b),
                         ("slots", slots), ("ranks", ranks), ("scales", scales)):
        if tensor is None and name == "bias":
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"multi_lora: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != x.device:
            raise _error(f"{name} is on", tensor.device, f"x's device {x.device}")
    for name, tensor, dtypes in (("x", x, _FLOAT_DTYPES), ("weight", weight, _FLOAT_DTYPES),
                                 ("lora_a", lora_a, _FLOAT_DTYPES), ("lora_b", lora_b, _FLOAT_DTYPES),
                                 ("slots", slots, _INT_DTYPES), ("ranks", ranks, _INT_DTYPES),
                                 ("scales", scales, _FLOAT_DTYPES)):
        if tensor.dtype not in dtypes:
            raise _error(f"{name} has dtype", tensor.dtype, f"one of {tuple(sorted(dtypes, key=str))}")
    if weight.dim() != 2:
        raise _error("weight has shape", tuple(weight.shape), "[in_features, out_features]")
    K, N = weight.shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise _error("x has shape", tuple(x.shape), f"[..., {K}] (weight's in_features)")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise _error("x, weight and bias have dtypes", (x.dtype, weight.dtype, getattr(bias, "dtype", None)),
                     "one dtype")
    if bias is not None and tuple(bias.shape) != (N,):
        raise _error("bias has shape", tuple(bias.shape), f"({N},)")
    if lora_a.dim() != 3 or lora_a.shape[1] != K:
        raise _error("lora_a has shape", tuple(lora_a.shape), f"[slots, {K}, r_max]")
    if tuple(lora_b.shape) != (lora_a.shape[0], lora_a.shape[2], N):
        raise _error("lora_b has shape", tuple(lora_b.shape), f"{(lora_a.shape[0], lora_a.shape[2], N)} "
                     "to match lora_a and weight")
    M = x.numel() // K if K else 0
    for name, tensor in (("slots", slots), ("ranks", ranks), ("scales", scales)):
        if tuple(tensor.shape) != (M,):
            raise _error(f"{name} has shape", tuple(tensor.shape), f"({M},): one value per row of x")


def multi_lora(x, weight, bias, lora_a, lora_b, *, slots, ranks, scales):
    """y = x W + b + s_i x_i A[a_i][:, :r_i] B[a_i][:r_i, :] for every row i of x; inference only.

    Args:
        x: [..., K]; weight: [K, N] frozen (Conv1D layout; nn.Linear's transposed view works);
            bias: [N] or None, all one dtype.
        lora_a: [slots, K, R]; lora_b: [slots, R, N], any float dtype (cast to x's).
        slots: [M] integers, each row's slot in [-1, slots) (-1: no adapter).
        ranks: [M] integers, each row's rank in [1, R] (any value for a row of no adapter).
        scales: [M] floats, each row's LoRA scale (its adapter's rule at its rank).
        The values of slots, ranks and scales are not checked (that would
        stop the host): ``hybrid_lora.serve.AdapterBank`` writes them.

    Runs the Triton kernels on CUDA (or the CPU with ``TRITON_INTERPRET=1``)
    for fp16, bf16 and fp32, else the PyTorch path; ``HYBRID_LORA_BACKEND``
    forces one. Compiles with ``torch.compile(fullgraph=True)``.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b)):
        raise RuntimeError("multi_lora: inference only (no backward): an input requires grad with grad enabled; "
                           "call it under torch.no_grad() or torch.inference_mode()")
    _check_inputs(x, weight, bias, lora_a, lora_b, slots, ranks, scales)
    backend, forced = chosen_backend(x.device.type)
    use_kernels = backend == "triton" and x.dtype in _TRITON_DTYPES
    if backend == "triton" and not use_kernels and forced:
        raise ValueError(f"multi_lora: HYBRID_LORA_BACKEND=triton but x has dtype {x.dtype}; "
                         f"the kernels take {tuple(sorted(_TRITON_DTYPES, key=str))}")
    flat = x.dim() == 2
    x2d = x if flat else x.reshape(-1, x.shape[-1])
    y = multi_lora_forward(x2d, weight, bias, lora_a, lora_b, slots, ranks, scales, use_kernels)
    return y if flat else y.reshape(x.shape[:-1] + (weight.shape[1],))
