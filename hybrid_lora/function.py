"""``fused_lora``: the public op, its input checks, and the autograd Function over the kernels.

    y = x W + b + s * dropout(x) A[:, :r] B[:r, :]

with x [..., K], W [K, N] frozen (``transformers`` Conv1D layout), b [N] or None,
A [K, R], B [R, N] and the active rank 1 <= r <= R given at run time. The op
is differentiable in x, A and B; W and b get no gradient.
"""

import math
import operator

import torch

from . import reference
from .backend import forced_backend, select_backend

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The kernels accumulate in fp32, so fp64 runs on the PyTorch path.
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class FusedLoRAFunction(torch.autograd.Function):
    """Autograd over the Triton kernels. Saves X and S = D(X) A_r; the dropout mask is regenerated."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed):
        from .kernels import lora_forward

        y, s_down = lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed)
        ctx.save_for_backward(x, s_down, weight, lora_a, lora_b)
        ctx.rank, ctx.scale, ctx.dropout_p, ctx.seed = rank, scale, dropout_p, seed
        return y

    @staticmethod
    def backward(ctx, grad_y):
        from .kernels import lora_backward

        x, s_down, weight, lora_a, lora_b = ctx.saved_tensors
        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        grad_x, grad_a, grad_b = lora_backward(
            grad_y, x, s_down, weight, lora_a, lora_b, ctx.rank, ctx.scale, ctx.dropout_p, ctx.seed,
            needs_grad_x=needs_x, needs_grad_a=needs_a, needs_grad_b=needs_b,
        )
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def _torch_path(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed):
    """The same op composed of PyTorch ops (autograd does the backward); dropout from torch's RNG."""
    keep = None
    if dropout_p > 0.0:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(seed)
        keep = torch.rand(x.shape, generator=generator, device=x.device) >= dropout_p
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    y, _ = reference.lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, keep, dropout_p)
    return y


def _check(name, ok, expected, got):
    if not ok:
        raise ValueError(f"fused_lora: {name} {got}; expected {expected}")


def _check_inputs(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed):
    tensors = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        tensors["bias"] = bias
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"fused_lora: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        _check(f"{name} has dtype", tensor.dtype in _FLOAT_DTYPES, f"one of {_FLOAT_DTYPES}", tensor.dtype)
        _check(f"{name} is on", tensor.device == x.device, f"x's device {x.device}", tensor.device)
    _check("weight has shape", weight.dim() == 2, "[in_features, out_features]", tuple(weight.shape))
    in_features, out_features = weight.shape
    _check("x has shape", x.dim() >= 1 and x.shape[-1] == in_features,
           f"[..., {in_features}] (weight's in_features)", tuple(x.shape))
    _check("x has dtype", x.dtype == weight.dtype, f"weight's dtype {weight.dtype}", x.dtype)
    if bias is not None:
        _check("bias has shape", tuple(bias.shape) == (out_features,), f"({out_features},)", tuple(bias.shape))
        _check("bias has dtype", bias.dtype == weight.dtype, f"weight's dtype {weight.dtype}", bias.dtype)
    _check("lora_a has shape", lora_a.dim() == 2 and lora_a.shape[0] == in_features,
           f"[{in_features}, r_max]", tuple(lora_a.shape))
    r_max = lora_a.shape[1]
    _check("lora_b has shape", tuple(lora_b.shape) == (r_max, out_features),
           f"({r_max}, {out_features}) to match lora_a and weight", tuple(lora_b.shape))
    _check("lora_b has dtype", lora_b.dtype == lora_a.dtype, f"lora_a's dtype {lora_a.dtype}", lora_b.dtype)
    _check("rank is", 1 <= rank <= r_max, f"an integer in [1, {r_max}] (r_max of lora_a)", rank)
    _check("scale is", math.isfinite(scale), "a finite number", scale)
    _check("dropout_p is", 0.0 <= dropout_p < 1.0, "in [0, 1)", dropout_p)
    if seed is not None:
        _check("seed is", 0 <= seed < 2**63, "an integer in [0, 2**63)", seed)


def fused_lora(x, weight, bias, lora_a, lora_b, *, rank, scale, dropout_p=0.0, seed=None):
    """y = x W + b + scale * dropout(x) A[:, :rank] B[:rank, :], with a runtime rank.

    Args:
        x: [..., K] input, any strides.
        weight: [K, N] frozen weight (Conv1D layout); bias: [N] or None.
        lora_a: [K, R]; lora_b: [R, N]. They may be fp32 while x is bf16 or fp16.
        rank: active rank, 1 <= rank <= R. Changing it never recompiles within
            a power-of-two bucket.
        scale: the LoRA scale, usually alpha / rank.
        dropout_p: LoRA dropout on x, in [0, 1). Pass 0 in evaluation.
        seed: seed of the dropout mask; drawn from torch's CPU generator when None.

    Under ``torch.autocast``, x, W and b are cast to the autocast dtype; A and B
    keep their dtype and their gradients come back in it.
    Runs the Triton kernels on CUDA (or the CPU with ``TRITON_INTERPRET=1``)
    for fp16, bf16 and fp32, else the PyTorch path (fp64 always takes it);
    ``HYBRID_LORA_BACKEND`` forces one.
    """
    rank = operator.index(rank)
    scale, dropout_p = float(scale), float(dropout_p)
    if seed is not None:
        seed = operator.index(seed)
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    _check_inputs(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed)
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())

    backend = select_backend(x.device)
    if backend == "triton" and x.dtype not in _TRITON_DTYPES:
        if forced_backend() == "triton":
            raise ValueError(f"fused_lora: HYBRID_LORA_BACKEND=triton but x has dtype {x.dtype}; "
                             f"the kernels take {_TRITON_DTYPES}")
        backend = "torch"

    out_shape = x.shape[:-1] + (weight.shape[1],)
    x2d = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        if backend == "triton":
            y = FusedLoRAFunction.apply(x2d, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed)
        else:
            y = _torch_path(x2d, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed)
    return y.reshape(out_shape)
