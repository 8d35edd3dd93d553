"""``fused_lora_4bit``: the fused LoRA op over a bitsandbytes 4-bit frozen weight (QLoRA), its checks and custom ops.

    y = x W^T + b + s * dropout(x) A[:, :r] B[:r, :]

with x [..., K], W the 4-bit [N, K] weight (nn.Linear's layout; NF4 or FP4,
nested absmax or not, any blocksize bitsandbytes makes, uint8 storage) held
as a ``Quant4bit``, b [N] or None, A [K, R], B [R, N] and the runtime rank,
scale, dropout seed and row offset of ``fused_lora``. Differentiable in x, A
and B.

The Triton path decodes W tile by tile inside the forward GEMM and the dX
GEMM (``kernels.qlora_forward``, ``kernels.qlora_backward``): no full-size W
is written. The PyTorch path (CPUs, fp64, ``HYBRID_LORA_BACKEND=torch``)
dequantizes W with ``nf4_reference.dequantize`` (equal to bitsandbytes'
``dequantize_4bit``) and runs ``fused_lora``'s PyTorch path
(``torch_path.TorchPath``) on it.
W is dequantized to x's dtype (the compute dtype), as bitsandbytes'
``Linear4bit`` does with its ``compute_dtype``.

Both paths share ``fused_lora``'s edges: dS = dY B^T unscaled with s on the
fp32 sums that consume it (fp16 backward), the rank, scale and row offset a
forward read kept for its backward (``set_rank`` between a forward and its
backward), a bias read through its stride, and one line for double backward.
"""

import operator
from contextlib import nullcontext
from typing import Optional

import torch

from hybrid_lora.ops.backend import chosen_backend
from hybrid_lora.ops.fused_lora import _check_inputs, _device_scalar
from hybrid_lora.ops.torch_path import TorchPath, refuse_double_backward
from hybrid_lora.ops.nf4_reference import BLOCKSIZES, QUANT_TYPES, Quant4bit, dequantize

_TRITON_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32))


def _quant(packed, code, absmax, absmax2, code2, offset, blocksize, out_features, in_features):
    # The kernels never read the quant type: the codebook tensor is the type.
    return Quant4bit(packed=packed, shape=(out_features, in_features), quant_type="", blocksize=blocksize,
                     code=code, absmax=absmax, absmax2=absmax2, code2=code2, offset=offset)


@torch.library.custom_op("hybrid_lora::fused_lora_4bit_forward", mutates_args=())
def fused_lora_4bit_forward(x: torch.Tensor, packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                            absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor],
                            offset: Optional[torch.Tensor], blocksize: int, out_features: int,
                            bias: Optional[torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor,
                            rank: torch.Tensor, scale: torch.Tensor, seed: torch.Tensor, dropout_p: float,
                            row_offset: Optional[torch.Tensor] = None,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Y [M, N], S [M, R], rank, scale, row offset) of the 4-bit forward kernels, as ``fused_lora_forward``
    returns them (the last three: 0-d copies of what the kernels read, for the backward)."""
    from hybrid_lora.kernels.qlora_forward import qlora_forward

    quant = _quant(packed, code, absmax, absmax2, code2, offset, blocksize, out_features, x.shape[1])
    y, s_down, snapshot = qlora_forward(x, quant, bias, lora_a, lora_b, rank, scale, dropout_p, seed, row_offset,
                                        snapshot=True)
    return y, s_down, *snapshot


@fused_lora_4bit_forward.register_fake
def _forward_fake(x, packed, code, absmax, absmax2, code2, offset, blocksize, out_features, bias, lora_a, lora_b,
                  rank, scale, seed, dropout_p, row_offset=None):
    return (x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], lora_a.shape[1])),
            *(x.new_empty((), dtype=dtype) for dtype in (torch.int32, torch.float32, torch.int64)))


@torch.library.custom_op("hybrid_lora::fused_lora_4bit_backward", mutates_args=())
def fused_lora_4bit_backward(grad_y: torch.Tensor, x: torch.Tensor, s_down: torch.Tensor, packed: torch.Tensor,
                             code: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
                             code2: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
                             lora_a: torch.Tensor, lora_b: torch.Tensor, rank: torch.Tensor, scale: torch.Tensor,
                             seed: torch.Tensor, dropout_p: float, needs_grad_x: bool, needs_grad_a: bool,
                             needs_grad_b: bool, row_offset: Optional[torch.Tensor] = None,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX, dA, dB) of the 4-bit backward kernels; a gradient not asked for is an empty [0] tensor."""
    from hybrid_lora.kernels.qlora_backward import qlora_backward

    quant = _quant(packed, code, absmax, absmax2, code2, offset, blocksize, grad_y.shape[1], x.shape[1])
    grads = qlora_backward(grad_y, x, s_down, quant, lora_a, lora_b, rank, scale, dropout_p, seed,
                           needs_grad_x, needs_grad_a, needs_grad_b, row_offset)
    return tuple(g if g is not None else like.new_empty((0,)) for g, like in zip(grads, (x, lora_a, lora_b)))


@fused_lora_4bit_backward.register_fake
def _backward_fake(grad_y, x, s_down, packed, code, absmax, absmax2, code2, offset, blocksize, lora_a, lora_b,
                   rank, scale, seed, dropout_p, needs_grad_x, needs_grad_a, needs_grad_b, row_offset=None):
    return tuple(like.new_empty(like.shape if needed else (0,))
                 for like, needed in ((x, needs_grad_x), (lora_a, needs_grad_a), (lora_b, needs_grad_b)))


def _setup_context(ctx, inputs, output):
    (x, packed, code, absmax, absmax2, code2, offset, blocksize, _, _, lora_a, lora_b, _, _, seed,
     dropout_p, _) = inputs
    _, s_down, *snapshot = output
    # The forward's copies of rank, scale and row offset, as fused_lora's _setup_context saves them.
    rank, scale, row_offset = snapshot
    # Without dropout the seed is never read, and may be the caller's rank tensor: the copy stands in.
    seed, row_offset = (seed, row_offset) if dropout_p > 0.0 else (rank, None)
    ctx.save_for_backward(x, s_down, packed, code, absmax, absmax2, code2, offset, lora_a, lora_b, rank, scale,
                          seed, row_offset)
    ctx.blocksize, ctx.dropout_p = blocksize, dropout_p
    ctx.mark_non_differentiable(s_down, *snapshot)


def _backward(ctx, grad_y, grad_s, *grad_snapshot):
    refuse_double_backward("fused_lora_4bit")
    x, s_down, packed, code, absmax, absmax2, code2, offset, lora_a, lora_b, rank, scale, seed, row_offset = \
        ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_a, grad_b = fused_lora_4bit_backward(
        grad_y, x, s_down, packed, code, absmax, absmax2, code2, offset, ctx.blocksize, lora_a, lora_b, rank, scale,
        seed, ctx.dropout_p, needs[0], needs[10], needs[11], row_offset)
    return ((grad_x if needs[0] else None,) + (None,) * 9 + (grad_a if needs[10] else None,
                                                               grad_b if needs[11] else None) + (None,) * 5)


fused_lora_4bit_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerKernels(torch.autograd.Function):
    """Eager calls: the launchers behind a plain autograd.Function (the custom op is what a traced call records;
    called eagerly its dispatch costs about as much host time as the launches, as for ``fused_lora``)."""

    @staticmethod
    def forward(ctx, x, quant, bias, lora_a, lora_b, rank, scale, seed, dropout_p, row_offset):
        from hybrid_lora.kernels.qlora_forward import qlora_forward

        needs = ctx.needs_input_grad
        if not (needs[0] or needs[3] or needs[4]):  # no backward: nothing to keep
            return qlora_forward(x, quant, bias, lora_a, lora_b, rank, scale, dropout_p, seed, row_offset)[0]
        y, s_down, (rank, scale, offset) = qlora_forward(x, quant, bias, lora_a, lora_b, rank, scale, dropout_p,
                                                         seed, row_offset, snapshot=True)
        # The forward's copies, as the custom op saves them (_setup_context).
        seed, offset = (seed, offset) if dropout_p > 0.0 else (rank, None)
        ctx.save_for_backward(x, s_down, lora_a, lora_b, rank, scale, seed, offset)
        ctx.quant, ctx.dropout_p = quant, dropout_p  # frozen tensors, not outputs or inputs needing grad
        return y

    @staticmethod
    def backward(ctx, grad_y):
        from hybrid_lora.kernels.qlora_backward import qlora_backward

        refuse_double_backward("fused_lora_4bit")
        x, s_down, lora_a, lora_b, rank, scale, seed, row_offset = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x, grad_a, grad_b = qlora_backward(grad_y, x, s_down, ctx.quant, lora_a, lora_b, rank, scale,
                                                ctx.dropout_p, seed, needs[0], needs[3], needs[4], row_offset)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None


def _error(what, got, expected):
    return ValueError(f"fused_lora_4bit: {what} {got}; expected {expected}")


def check_quant(quant, device=None):
    """Raise one line unless `quant` is a 4-bit weight the op runs: NF4/FP4, a bitsandbytes blocksize, uint8 storage."""
    if not isinstance(quant, Quant4bit):
        raise TypeError(f"fused_lora_4bit: quant must be a Quant4bit, got {type(quant).__name__}")
    if quant.quant_type not in QUANT_TYPES:
        raise _error("quant_type is", repr(quant.quant_type), f"one of {QUANT_TYPES}")
    if quant.packed.dtype != torch.uint8:
        raise _error("the packed weight (quant_storage) has dtype", quant.packed.dtype,
                     "torch.uint8 (bnb_4bit_quant_storage other than uint8 is not supported)")
    if quant.blocksize not in BLOCKSIZES:
        raise _error("blocksize is", quant.blocksize, f"one of {BLOCKSIZES}")
    if len(quant.shape) != 2:
        raise _error("the weight has shape", tuple(quant.shape), "[out_features, in_features]")
    numel = quant.shape[0] * quant.shape[1]
    if quant.packed.numel() != (numel + 1) // 2:
        raise _error("the packed weight has", f"{quant.packed.numel()} bytes",
                     f"{(numel + 1) // 2} for shape {tuple(quant.shape)}")
    if quant.code.numel() != 16 or quant.code.dtype != torch.float32:
        raise _error("code has", f"{quant.code.numel()} {quant.code.dtype} entries", "16 torch.float32")
    blocks = -(-numel // quant.blocksize)
    if quant.absmax.numel() != blocks:
        raise _error("absmax has", f"{quant.absmax.numel()} entries", f"{blocks} (one per block)")
    if quant.nested:
        if quant.blocksize2 != 256:
            raise _error("the nested blocksize is", quant.blocksize2, "256 (what bitsandbytes makes)")
        if quant.absmax.dtype != torch.uint8 or quant.code2 is None or quant.offset is None:
            raise _error("a nested absmax has dtype", quant.absmax.dtype, "torch.uint8 with code2 and offset")
    elif quant.absmax.dtype != torch.float32:
        raise _error("absmax has dtype", quant.absmax.dtype, "torch.float32")
    for name in ("packed", "code", "absmax", "absmax2", "code2", "offset"):
        tensor = getattr(quant, name)
        if device is not None and tensor is not None and tensor.device != device:
            raise _error(f"{name} is on", tensor.device, f"x's device {device}")
        if tensor is not None and not tensor.is_contiguous():  # the kernels index them as flat arrays
            raise _error(f"{name} has strides", tuple(tensor.stride()), "a contiguous tensor")


def fused_lora_4bit(x, quant, bias, lora_a, lora_b, *, rank, scale, dropout_p=0.0, seed=None, row_offset=0):
    """y = x W^T + b + scale * dropout(x) A[:, :rank] B[:rank, :] over a 4-bit W, with a runtime rank.

    Args as ``fused_lora``, except: quant: a ``Quant4bit`` of shape [N, K]
    (``Quant4bit.from_bnb(param, param.quant_state)`` for a bitsandbytes
    ``Params4bit``); bias in x's dtype. W is decoded to x's dtype.
    """
    if not isinstance(rank, torch.Tensor):
        rank = operator.index(rank)
    if not isinstance(scale, torch.Tensor):
        scale = float(scale)
    dropout_p = float(dropout_p)
    if seed is not None and not isinstance(seed, torch.Tensor):
        seed = operator.index(seed)
    if not isinstance(row_offset, torch.Tensor):
        row_offset = operator.index(row_offset)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fused_lora_4bit: x must be a torch.Tensor, got {type(x).__name__}")
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    check_quant(quant, x.device)
    out_features, in_features = quant.shape
    # fused_lora's checks of x, bias and the adapter, against a stand-in W [K, N]: one element, expanded.
    _check_inputs(x, x.new_empty(()).expand(in_features, out_features), bias, lora_a, lora_b, rank, scale,
                  dropout_p, seed, row_offset)
    device = x.device
    rank = _device_scalar(rank, torch.int64, device)
    scale = scale if isinstance(scale, torch.Tensor) else torch.tensor(scale, dtype=torch.float64, device=device)
    if seed is None:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=device) if dropout_p > 0.0 else rank
    seed = _device_scalar(seed, torch.int64, device)
    row_offset = _device_scalar(row_offset, torch.int64, device) if dropout_p > 0.0 else None

    backend, forced = chosen_backend(device.type)
    if backend == "triton" and x.dtype not in _TRITON_DTYPES:
        if forced:
            raise ValueError(f"fused_lora_4bit: HYBRID_LORA_BACKEND=triton but x has dtype {x.dtype}; "
                             "the kernels take torch.bfloat16, torch.float16 or torch.float32")
        backend = "torch"
    flat = x.dim() == 2
    x2d = x if flat else x.reshape(-1, x.shape[-1])
    with torch.autocast(device.type, enabled=False) if autocast else nullcontext():
        if backend == "torch":
            weight = dequantize(quant, x.dtype)  # [N, K]
            # Without dropout the seed is the rank tensor, and Dynamo cannot trace an autograd.Function given
            # one tensor twice; the path never reads it then (as in fused_lora).
            y = TorchPath.apply(x2d, weight.t(), bias, lora_a, lora_b, rank, scale,
                                seed if dropout_p > 0.0 else None, dropout_p, row_offset)
        elif torch.compiler.is_compiling():  # a constant to Dynamo: a traced call records the custom op
            q = quant
            y = fused_lora_4bit_forward(x2d, q.packed, q.code, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize,
                                        out_features, bias, lora_a, lora_b, rank, scale, seed, dropout_p,
                                        row_offset)[0]
        else:
            y = _EagerKernels.apply(x2d, quant, bias, lora_a, lora_b, rank, scale, seed, dropout_p, row_offset)
    return y if flat else y.reshape(x.shape[:-1] + (out_features,))
