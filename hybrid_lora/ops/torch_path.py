"""The op's PyTorch path: ``fused_lora`` composed of PyTorch ops, with the kernels' placement of the scale.

    y = addmm(b, x, W) + S (c B),   S = D(x) A,   c_j = s if j < rank else 0

Forward: nothing is sliced by the rank: row j of B is multiplied by c_j, zero
at or past the rank, which gives the product and the gradients of A and B
zeros there, as the slice would (for finite adapters). The scale goes on B,
not on S: S is as large as x times A and, in fp16, s S can overflow where the
output does not.

Backward, with upstream gradient dY (what autograd of the forward would give,
with the scale kept out of every product in x's dtype, as in the kernels):

    dS = dY B^T                        x's dtype, unscaled
    dX = dY W^T + D^T(dS (c A)^T)      c on A, as the forward puts it on B
    dA = (D(x)^T dS) c                 the product in A's dtype, then c
    dB = c (S^T dY)                    the product in B's dtype

Autograd of the forward alone forms dS = dY (c B)^T in x's dtype: with fp16
x, a scale of 32 and large upstream gradients that leaves fp16's range while
dX and dA do not. dA and dB are computed in the adapters' dtype (peft runs
its whole LoRA term there), so fp32 adapters get fp32 sums, as the kernels
give them.

c and the dropout mask are computed in the forward and saved, so a layer
that writes its rank, scale or row offset in place (``set_rank``) before this
backward runs changes neither. A compiled graph's partitioner would instead
recompute them in the backward from those 0-d inputs (saving them is cheaper):
there the forward first copies them with an opaque op (``scalar_copies``),
which it cannot recompute. The dropout mask is the kernels' Philox mask
(``philox.keep_mask``, equal to ``reference.philox_keep_mask``), computed from the seed tensor on the device,
so no generator object and no host read enters a graph, and both paths drop
the same elements for the same seed.

Only fp16 needs the hand-written backward (``TorchPath``): bf16, fp32 and
fp64 hold s dY B^T with room to spare. They run ``composite``, the same
forward under autograd's own backward, because a Python autograd.Function
costs about 30 us of host time per call on the CPU, where this path is the
default: enough to make a small layer slower than peft's. Autograd's backward
is itself differentiable, so there a double backward (a gradient penalty)
works; the kernels and fp16 refuse it in one line.
"""

from typing import Optional

import torch

from hybrid_lora.ops import philox, reference

_NO_DOUBLE_BACKWARD = ("{op}: double backward (a backward with create_graph=True through the op, as a "
                       "gradient penalty takes) is not supported")


def refuse_double_backward(op="fused_lora"):
    """Raise one clear line when a backward of the op runs with create_graph=True.

    Autograd runs a backward with grad mode on only then; the op's gradients
    would otherwise come back without a graph of their own, and a second
    derivative through them would be silently zero.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(_NO_DOUBLE_BACKWARD.format(op=op))


@torch.library.custom_op("hybrid_lora::scalar_copies", mutates_args=())
def scalar_copies(rank: torch.Tensor, scale: torch.Tensor,
                  row_offset: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of the 0-d rank, scale and row offset (the rank again for a row offset of None)."""
    return rank.clone(), scale.clone(), (row_offset if row_offset is not None else rank).clone()


@scalar_copies.register_fake
def _scalar_copies_fake(rank, scale, row_offset):
    return rank.new_empty(()), scale.new_empty(()), (row_offset if row_offset is not None else rank).new_empty(())


def _snapshot(rank, scale, row_offset):
    """rank, scale, row_offset, copied by an opaque op while compiling (see the module docstring)."""
    if torch.compiler.is_compiling():
        rank, scale, offset = scalar_copies(rank, scale, row_offset)
        row_offset = offset if row_offset is not None else None
    return rank, scale, row_offset


def _forward(x, weight, bias, lora_a, lora_b, rank, scale, seed, dropout_p, row_offset):
    """y and what TorchPath's backward keeps: (y, dropout(x), c, s_down, keep mask or None)."""
    dtype = x.dtype
    rank, scale, row_offset = _snapshot(rank, scale, row_offset)
    # c in B's dtype: a 0-d scale does not promote it.
    coef = torch.lt(torch.arange(lora_a.shape[1], device=rank.device), rank).to(lora_b.dtype) * scale
    b_scaled = lora_b * coef.unsqueeze(1)
    a = lora_a
    if b_scaled.dtype != dtype:  # a .to() that changes nothing is still a dispatch
        a, b_scaled = lora_a.to(dtype), b_scaled.to(dtype)
    keep = None
    if dropout_p > 0.0:
        keep = philox.keep_mask(seed, *x.shape, dropout_p, 0 if row_offset is None else row_offset)
        x_dropped = reference.dropout_input(x, keep, dropout_p)
    else:
        x_dropped = x
    s_down = torch.mm(x_dropped, a)
    y = torch.addmm(bias, x, weight) if bias is not None else torch.mm(x, weight)
    return torch.addmm(y, s_down, b_scaled), x_dropped, coef, s_down, keep


def composite(x, weight, bias, lora_a, lora_b, rank, scale, seed, dropout_p, row_offset=None):
    """The forward of ``TorchPath`` for bf16, fp32 and fp64 x, differentiated by autograd itself."""
    return _forward(x, weight, bias, lora_a, lora_b, rank, scale, seed, dropout_p, row_offset)[0]


def torch_path_op(dtype):
    """The PyTorch path for x of `dtype`: ``TorchPath.apply`` for fp16, ``composite`` otherwise."""
    return TorchPath.apply if dtype == torch.float16 else composite


class TorchPath(torch.autograd.Function):
    """fused_lora's PyTorch path (see the module docstring); rank, scale, seed, row_offset are 0-d device tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, rank, scale, seed, dropout_p, row_offset=None):
        y, x_dropped, coef, s_down, keep = _forward(x, weight, bias, lora_a, lora_b, rank, scale, seed, dropout_p,
                                                    row_offset)
        ctx.save_for_backward(x_dropped, weight, lora_a, lora_b, coef, s_down, keep)
        ctx.dropout_p = dropout_p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        refuse_double_backward()
        x_dropped, weight, lora_a, lora_b, coef, s_down, keep = ctx.saved_tensors
        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        dtype = grad_y.dtype
        grad_x = grad_a = grad_b = None
        if needs_x or needs_a:
            # linear(u, v) = u v^T: one dispatch where mm would take a transpose first.
            grad_s = torch.nn.functional.linear(grad_y, lora_b if lora_b.dtype == dtype else lora_b.to(dtype))
        if needs_x:
            a_scaled = lora_a * coef
            lora_x = torch.nn.functional.linear(grad_s, a_scaled if a_scaled.dtype == dtype else a_scaled.to(dtype))
            if keep is not None:  # D^T: the same mask and 1 / (1 - p)
                lora_x = reference.dropout_input(lora_x, keep, ctx.dropout_p)
            grad_x = torch.addmm(lora_x, grad_y, weight.t())
        if needs_a:
            if lora_a.dtype == dtype:
                grad_a = torch.mm(x_dropped.t(), grad_s)
            else:
                grad_a = torch.mm(x_dropped.t().to(lora_a.dtype), grad_s.to(lora_a.dtype))
            grad_a = grad_a * coef
        if needs_b:
            if lora_b.dtype == dtype:
                grad_b = torch.mm(s_down.t(), grad_y)
            else:
                grad_b = torch.mm(s_down.t().to(lora_b.dtype), grad_y.to(lora_b.dtype))
            grad_b = grad_b * coef.unsqueeze(1)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None
