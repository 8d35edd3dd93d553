"""``fused_lora``: the public op, its input checks, and the custom ops over the kernels.

    y = x W + b + s * dropout(x) A[:, :r] B[:r, :]

with x [..., K], W [K, N] frozen (``transformers`` Conv1D layout), b [N] or None,
A [K, R], B [R, N] and the active rank 1 <= r <= R given at run time. The op
is differentiable in x, A and B; W and b get no gradient.

The rank r, the scale s and the dropout seed may be 0-d device tensors (a
layer keeps rank and scale as buffers, and draws no seed on the host): then nothing about the call depends on their
values on the host, and one compiled graph, and one CUDA graph, serves every
rank, scale and seed. Python numbers are accepted too and converted.
"""

import math
import operator
from typing import Optional

import torch

from hybrid_lora.ops.backend import chosen_backend
from hybrid_lora.ops.torch_path import torch_path_op
from hybrid_lora.ops.torch_path import refuse_double_backward as _refuse_double_backward

# Sets: a membership test hashes once instead of comparing with each in turn.
_FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
# The kernels accumulate in fp32, so fp64 runs on the PyTorch path.
_TRITON_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32))
_INT_DTYPES = frozenset((torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8))


@torch.library.custom_op("hybrid_lora::fused_lora_forward", mutates_args=())
def fused_lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       lora_a: torch.Tensor, lora_b: torch.Tensor, rank: torch.Tensor, scale: torch.Tensor,
                       seed: torch.Tensor, dropout_p: float,
                       row_offset: Optional[torch.Tensor] = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Y [M, N], S [M, R], rank, scale, row offset) of the fused forward kernels, for the backward:
    S = D(X) A_r (unscaled, zero past the rank), and 0-d copies (int32, fp32, int64) of the rank, scale and
    row offset the kernels read (see ``_setup_context``).

    x: [M, K]; rank, scale, seed, row_offset (None: 0): 0-d tensors on x's device, read by the kernels.

    Why ``torch.library.custom_op`` and not ``torch.library.triton_op``: a
    custom op is opaque to torch.compile, which calls it through its fake
    implementation (shapes from x, weight and the adapter width R only) and
    its registered autograd, so it joins a ``fullgraph=True`` graph under
    every backend, and it runs, and is tested in CI, under the Triton CPU
    interpreter. ``triton_op`` would let Inductor see into the kernels, but
    its compile path cannot run under the interpreter (pytorch#152868), and
    these kernels are GEMMs Inductor would not fuse into anyway: the gain
    would be a launch wrapper, the cost untested code. Inductor also passes
    Python floats to kernels it launches as fp64; here the scale is a device
    tensor (fp32 in the layer, fp64 for an fp64 adapter) and the kernels convert
    every float they load or take to fp32 before using it.
    """
    from hybrid_lora.kernels.lora_forward import lora_forward

    y, s_down, snapshot = lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed, row_offset,
                                       snapshot=True)
    return y, s_down, *snapshot


@fused_lora_forward.register_fake
def _forward_fake(x, weight, bias, lora_a, lora_b, rank, scale, seed, dropout_p, row_offset=None):
    return (x.new_empty((x.shape[0], weight.shape[1])), x.new_empty((x.shape[0], lora_a.shape[1])),
            *(x.new_empty((), dtype=dtype) for dtype in (torch.int32, torch.float32, torch.int64)))


@torch.library.custom_op("hybrid_lora::fused_lora_backward", mutates_args=())
def fused_lora_backward(grad_y: torch.Tensor, x: torch.Tensor, s_down: torch.Tensor, weight: torch.Tensor,
                        lora_a: torch.Tensor, lora_b: torch.Tensor, rank: torch.Tensor, scale: torch.Tensor,
                        seed: torch.Tensor, dropout_p: float, needs_grad_x: bool, needs_grad_a: bool,
                        needs_grad_b: bool, row_offset: Optional[torch.Tensor] = None,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX [M, K], dA [K, R], dB [R, N]) of the backward kernels; dA and dB are zero past the rank.

    A gradient not asked for comes back as an empty [0] tensor (an op returns no None).
    """
    from hybrid_lora.kernels.lora_backward import lora_backward

    grads = lora_backward(grad_y, x, s_down, weight, lora_a, lora_b, rank, scale, dropout_p, seed,
                          needs_grad_x=needs_grad_x, needs_grad_a=needs_grad_a, needs_grad_b=needs_grad_b,
                          row_offset=row_offset)
    return tuple(g if g is not None else like.new_empty((0,)) for g, like in zip(grads, (x, lora_a, lora_b)))


@fused_lora_backward.register_fake
def _backward_fake(grad_y, x, s_down, weight, lora_a, lora_b, rank, scale, seed, dropout_p,
                   needs_grad_x, needs_grad_a, needs_grad_b, row_offset=None):
    return tuple(like.new_empty(like.shape if needed else (0,))
                 for like, needed in ((x, needs_grad_x), (lora_a, needs_grad_a), (lora_b, needs_grad_b)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, rank, scale, seed, dropout_p, row_offset = inputs
    _, s_down, *snapshot = output
    # X and S are saved; the dropout mask is regenerated from the seed and the row offset. The rank, scale
    # and row offset are the forward's copies: a layer writes its own in place (set_rank) between a
    # forward and its backward when one step sums the losses of several ranks.
    rank, scale, row_offset = snapshot
    # Without dropout the seed is never read, and may be the caller's rank tensor: the copy stands in.
    seed, row_offset = (seed, row_offset) if dropout_p > 0.0 else (rank, None)
    ctx.save_for_backward(x, s_down, weight, lora_a, lora_b, rank, scale, seed, row_offset)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(s_down, *snapshot)


def _backward(ctx, grad_y, grad_s, *grad_snapshot):
    _refuse_double_backward()
    x, s_down, weight, lora_a, lora_b, rank, scale, seed, row_offset = ctx.saved_tensors
    needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
    grad_x, grad_a, grad_b = fused_lora_backward(grad_y, x, s_down, weight, lora_a, lora_b, rank, scale, seed,
                                                 ctx.dropout_p, needs_x, needs_a, needs_b, row_offset)
    return (grad_x if needs_x else None, None, None, grad_a if needs_a else None, grad_b if needs_b else None,
            None, None, None, None, None)


fused_lora_forward.register_autograd(_backward, setup_context=_setup_context)


def _traced_kernels(x, weight, bias, lora_a, lora_b, rank, scale, seed, dropout_p, row_offset=None):
    """Y of the custom op: what a traced call (torch.compile, torch.export) records in its graph."""
    return fused_lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, seed, dropout_p, row_offset)[0]


class _EagerKernels(torch.autograd.Function):
    """Eager calls of the kernels: the launchers behind a plain autograd.Function, with the custom op's
    forward and backward.

    The custom op is what a traced call records; called eagerly, its dispatch
    adds Python of its own to every call (binding the arguments to the schema,
    a Dynamo-disabled wrapper around each implementation, a generated
    autograd.Function around ours), about as much host time as the kernels'
    launches, on a path that runs hundreds of times a step.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, rank, scale, seed, dropout_p, row_offset=None):
        from hybrid_lora.kernels.lora_forward import lora_forward

        needs = ctx.needs_input_grad
        if not (needs[0] or needs[3] or needs[4]):  # no backward: nothing to keep
            return lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed, row_offset)[0]
        y, s_down, (rank, scale, offset) = lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed,
                                                        row_offset, snapshot=True)
        # The forward's copies of rank, scale and row offset, as the custom op saves them (_setup_context).
        # Without dropout the seed is never read, and may be the caller's rank tensor: the copy stands in.
        seed, offset = (seed, offset) if dropout_p > 0.0 else (rank, None)
        ctx.save_for_backward(x, s_down, weight, lora_a, lora_b, rank, scale, seed, offset)
        ctx.dropout_p = dropout_p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        from hybrid_lora.kernels.lora_backward import lora_backward

        _refuse_double_backward()
        x, s_down, weight, lora_a, lora_b, rank, scale, seed, row_offset = ctx.saved_tensors
        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        grad_x, grad_a, grad_b = lora_backward(grad_y, x, s_down, weight, lora_a, lora_b, rank, scale, ctx.dropout_p,
                                               seed, needs_grad_x=needs_x, needs_grad_a=needs_a, needs_grad_b=needs_b,
                                               row_offset=row_offset)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None


def _error(what, got, expected):
    return ValueError(f"fused_lora: {what} {got}; expected {expected}")


# Every check below is a plain comparison, and its message is formatted only
# when it fails: the op runs hundreds of times per step, and a passing check
# should cost the host nothing more than the comparison.


def _check_scalar_tensor(name, value, dtypes, device):
    if value.ndim != 0:
        raise _error(f"{name} has shape", tuple(value.shape), "() (a 0-d tensor)")
    if value.dtype not in dtypes:
        raise _error(f"{name} has dtype", value.dtype, f"one of {_names(dtypes)}")
    if value.device != device:
        raise _error(f"{name} is on", value.device, f"x's device {device}")


def _names(dtypes):
    return tuple(sorted(dtypes, key=str))


def _check_inputs(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed, row_offset=0):
    device = x.device if isinstance(x, torch.Tensor) else None
    for name, tensor in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if not isinstance(tensor, torch.Tensor):
            if tensor is None and name == "bias":
                continue
            raise TypeError(f"fused_lora: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise _error(f"{name} has dtype", tensor.dtype, f"one of {_names(_FLOAT_DTYPES)}")
        if tensor.device != device:
            raise _error(f"{name} is on", tensor.device, f"x's device {device}")
    x_shape, w_shape, a_shape, b_shape = x.shape, weight.shape, lora_a.shape, lora_b.shape
    if len(w_shape) != 2:
        raise _error("weight has shape", tuple(w_shape), "[in_features, out_features]")
    in_features, out_features = w_shape
    if not x_shape or x_shape[-1] != in_features:
        raise _error("x has shape", tuple(x_shape), f"[..., {in_features}] (weight's in_features)")
    if x.dtype != weight.dtype:
        raise _error("x has dtype", x.dtype, f"weight's dtype {weight.dtype}")
    if bias is not None:
        if bias.shape != (out_features,):
            raise _error("bias has shape", tuple(bias.shape), f"({out_features},)")
        if bias.dtype != weight.dtype:
            raise _error("bias has dtype", bias.dtype, f"weight's dtype {weight.dtype}")
    if len(a_shape) != 2 or a_shape[0] != in_features:
        raise _error("lora_a has shape", tuple(a_shape), f"[{in_features}, r_max]")
    r_max = a_shape[1]
    if b_shape != (r_max, out_features):
        raise _error("lora_b has shape", tuple(b_shape), f"({r_max}, {out_features}) to match lora_a and weight")
    if lora_b.dtype != lora_a.dtype:
        raise _error("lora_b has dtype", lora_b.dtype, f"lora_a's dtype {lora_a.dtype}")
    # Device tensors are checked for shape, dtype and device only: reading their
    # values would stop the host (and break a compiled graph). Their owner (the
    # layer) checks the values when it writes them.
    if isinstance(rank, torch.Tensor):
        _check_scalar_tensor("rank", rank, _INT_DTYPES, device)
    elif not 1 <= rank <= r_max:
        raise _error("rank is", rank, f"an integer in [1, {r_max}] (r_max of lora_a)")
    if isinstance(scale, torch.Tensor):
        _check_scalar_tensor("scale", scale, _FLOAT_DTYPES, device)
    elif not math.isfinite(scale):
        raise _error("scale is", scale, "a finite number")
    if not 0.0 <= dropout_p < 1.0:
        raise _error("dropout_p is", dropout_p, "in [0, 1)")
    if isinstance(seed, torch.Tensor):
        _check_scalar_tensor("seed", seed, _INT_DTYPES, device)
    elif seed is not None and not 0 <= seed < 2**63:
        raise _error("seed is", seed, "an integer in [0, 2**63)")
    if isinstance(row_offset, torch.Tensor):
        _check_scalar_tensor("row_offset", row_offset, _INT_DTYPES, device)
    elif not 0 <= row_offset < 2**63:
        raise _error("row_offset is", row_offset, "an integer in [0, 2**63)")


def _device_scalar(value, dtype, device):
    """`value` as a 0-d `dtype` tensor on `device`; a tensor of that dtype already is one and passes as it is."""
    if isinstance(value, torch.Tensor):
        return value if value.dtype == dtype else value.to(dtype)
    return torch.tensor(value, dtype=dtype, device=device)


def fused_lora(x, weight, bias, lora_a, lora_b, *, rank, scale, dropout_p=0.0, seed=None, row_offset=0):
    """y = x W + b + scale * dropout(x) A[:, :rank] B[:rank, :], with a runtime rank.

    Args:
        x: [..., K] input, any strides.
        weight: [K, N] frozen weight (Conv1D layout); bias: [N] or None.
        lora_a: [K, R]; lora_b: [R, N]. They may be fp32 while x is bf16 or fp16.
        rank: active rank, 1 <= rank <= R: an int, or a 0-d integer tensor on
            x's device (its value is then not checked, to keep the host out).
            Nothing is recompiled for a new rank: shapes follow R only.
        scale: the LoRA scale, usually alpha / rank: a float or a 0-d float
            tensor on x's device (the kernels read it as fp32).
        dropout_p: LoRA dropout on x, in [0, 1). Pass 0 in evaluation.
        seed: seed of the dropout mask: an int in [0, 2**63), a 0-d integer
            tensor on x's device, or None to draw one on x's device from torch's
            generator there (no host read; ``torch.utils.checkpoint`` restores
            that generator, so a recomputed forward draws the same mask).
        row_offset: where x's rows (x as [M, K]) start in the batch the
            dropout mask is drawn for: an int >= 0 or a 0-d integer tensor on
            x's device. A process holding rows [o, o + M) of a batch split
            over processes passes o and drops what one process would.

    Under ``torch.autocast``, x, W and b are cast to the autocast dtype; A and B
    keep their dtype and their gradients come back in it.
    Runs the Triton kernels on CUDA (or the CPU with ``TRITON_INTERPRET=1``)
    for fp16, bf16 and fp32, else the PyTorch path (fp64 always takes it);
    ``HYBRID_LORA_BACKEND`` forces one. Both compile with ``torch.compile(fullgraph=True)``.
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
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    if autocast:
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    _check_inputs(x, weight, bias, lora_a, lora_b, rank, scale, dropout_p, seed, row_offset)
    device = x.device
    rank = _device_scalar(rank, torch.int64, device)
    # A float tensor of any dtype passes as it is (the layer's is fp32): a conversion is a launch per call.
    scale = scale if isinstance(scale, torch.Tensor) else torch.tensor(scale, dtype=torch.float64, device=device)
    if seed is None:
        # Without dropout nothing reads the seed: any 0-d integer device tensor will do, and the rank
        # is one that costs no copy to the device.
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=device) if dropout_p > 0.0 else rank
    seed = _device_scalar(seed, torch.int64, device)
    # Read only under dropout: without it nothing is copied to the device.
    row_offset = _device_scalar(row_offset, torch.int64, device) if dropout_p > 0.0 else None

    backend, forced = chosen_backend(device.type)
    if backend == "triton" and x.dtype not in _TRITON_DTYPES:
        if forced:
            raise ValueError(f"fused_lora: HYBRID_LORA_BACKEND=triton but x has dtype {x.dtype}; "
                             f"the kernels take {_names(_TRITON_DTYPES)}")
        backend = "torch"

    # A 2-D x (and y) pass as they are: a reshape is one more node in autograd's graph per call.
    flat = x.dim() == 2
    x2d = x if flat else x.reshape(-1, x.shape[-1])
    if backend == "torch":
        op = torch_path_op(x.dtype)
        if dropout_p == 0.0:  # the seed is then the rank tensor, and Dynamo cannot trace an autograd.Function
            seed = None       # given one tensor twice; without dropout the path never reads it
    else:  # a constant to Dynamo: a traced call records the custom op
        op = _traced_kernels if torch.compiler.is_compiling() else _EagerKernels.apply
    if autocast:
        with torch.autocast(device.type, enabled=False):
            y = op(x2d, weight, bias, lora_a, lora_b, rank, scale, seed, dropout_p, row_offset)
    else:
        y = op(x2d, weight, bias, lora_a, lora_b, rank, scale, seed, dropout_p, row_offset)
    return y if flat else y.reshape(x.shape[:-1] + (weight.shape[1],))
