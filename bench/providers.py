"""The six implementations of the LoRA layer that the benchmarks compare, behind one interface.

    y = x W + b + s * dropout(x) A[:, :r] B[:r, :]      x [M, K], W [K, N], b [N], A [K, R], B [R, N]

| provider   | what it is                                                                   |
|------------|------------------------------------------------------------------------------|
| `base`     | ``torch.addmm(b, x, W)`` alone, no adapter: the floor                        |
| `peft`     | peft's LoRA on ``transformers``' Conv1D (``fan_in_fan_out=True``), or on    |
|            | ``nn.Linear`` (``fan_in_fan_out=False``) for the ``out_in`` weight layout     |
| `addmm`    | the composition unsloth uses: ``Y = addmm(b, X, W); Y.addmm_(X A, B, alpha=s)``, |
|            | a hand-written backward with ``addmm_`` that recomputes ``X A``                |
| `compiled` | ``torch.compile`` of ``hybrid_lora.ops.reference.lora_forward``                    |
| `fused`    | ``hybrid_lora.fused_lora``                                                    |
| `peft+accelerate` | the `peft` layer after ``hybrid_lora.accelerate``: ``fused_lora`` at   |
|            | peft's rank r (its adapter is r wide), called from peft's layer           |

The frozen weight is stored as GPT-2's Conv1D stores it, W [K, N] (layout
``in_out``), or as ``nn.Linear`` (Llama's projections) stores it, [N, K]
(layout ``out_in``), which every provider reads as its transposed view W,
without a copy, as ``hybrid_lora.LoRALinear`` does.

Every provider is built from the same weights (``LayerWeights``) and computes
the same function, which ``tests/test_bench_providers.py`` checks against the
reference. Each provider also states its work per mode (``fwd``, ``bwd``,
``fwd+bwd``):

* FLOPs: the useful arithmetic, the same for every LoRA provider so that
  TFLOP/s is proportional to speed. Forward ``2MKN + 2Mr(K+N)``; backward with
  W frozen ``2MKN`` (dX) ``+ 4Mr(K+N)`` (dS, the LoRA part of dX, dA, dB).
  The base layer alone: ``2MKN`` each way. Recomputation is not counted.
* bytes: a traffic model of the provider's own sequence of operations, in
  which each operation reads its inputs from and writes its outputs to DRAM
  once (``traffic``). GB/s in the tables is this model divided by the time.
"""

import contextlib
from dataclasses import dataclass, field

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
FUSED = ("fused", "peft+accelerate")  # the providers that run hybrid_lora.fused_lora
WEIGHT_LAYOUTS = ("in_out", "out_in")


@dataclass(frozen=True)
class LayerShape:
    M: int  # tokens (batch x sequence)
    K: int  # input features (768 for GPT-2 c_attn)
    N: int  # output features (2304 for GPT-2 c_attn)
    r: int  # active rank
    dtype: torch.dtype  # compute dtype of x, W, b and the adapters
    r_max: int = 64  # adapter width R; the active rank selects A[:, :r], B[:r] as DyLoRA training does
    dropout_p: float = 0.0  # LoRA dropout on x
    weight_layout: str = "in_out"  # W stored [K, N] (Conv1D) or "out_in": [N, K] (nn.Linear), read transposed

    def __post_init__(self):
        for name in ("M", "K", "N", "r", "r_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LayerShape.{name}={value!r}: expected a positive integer")
        if self.r > self.r_max:
            raise ValueError(f"LayerShape.r={self.r}: expected r <= r_max={self.r_max}")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"LayerShape.dropout_p={self.dropout_p}: expected a probability in [0, 1)")
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"LayerShape.weight_layout={self.weight_layout!r}: expected one of {WEIGHT_LAYOUTS}")


@dataclass
class LayerWeights:
    """Frozen W [K, N] (maybe a transposed view), b [N], adapters A [K, R], B [R, N] and the scale, shared by all."""

    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float

    @classmethod
    def random(cls, shape: LayerShape, device, seed=0, alpha=32.0):
        # B is random rather than zero (its usual init) so that no kernel multiplies zeros.
        g = torch.Generator(device="cpu").manual_seed(seed)

        def randn(*size, std):
            return (torch.randn(*size, generator=g) * std).to(device=device, dtype=shape.dtype)

        if shape.weight_layout == "out_in":
            weight = randn(shape.N, shape.K, std=shape.K ** -0.5).t()  # nn.Linear's storage, seen as [K, N]
        else:
            weight = randn(shape.K, shape.N, std=shape.K ** -0.5)
        return cls(
            weight=weight,
            bias=randn(shape.N, std=0.02),
            lora_a=randn(shape.K, shape.r_max, std=shape.K ** -0.5),
            lora_b=randn(shape.r_max, shape.N, std=shape.r ** -0.5),
            scale=alpha / shape.r,
        )


@dataclass
class Layer:
    """One provider's layer, built for one shape: `forward()` -> y [M, N] from the input `x` [M, K]."""

    provider: str
    shape: LayerShape
    x: torch.Tensor  # input, requires grad (it comes from a LayerNorm in GPT-2)
    grad_y: torch.Tensor  # upstream gradient [M, N]
    forward: object  # () -> y
    trainable: list  # tensors that receive gradients besides x (the adapters)
    frozen: list  # tensors that are parameters of the layer but get no gradient
    adapter_grads: object  # () -> (dA [K, r], dB [r, N]) in the common layout, after a backward
    context: object = field(default=contextlib.nullcontext)  # () -> context to enter around every use

    def parameters(self):
        return [*self.trainable, *self.frozen]

    def step(self, mode: str):
        """(callable timed for `mode`, tensors whose grad is cleared before each call). Use inside `context()`."""
        grads = [self.x, *self.trainable]
        if mode == "fwd":
            return self.forward, grads
        if mode == "fwd+bwd":
            return (lambda: self.forward().backward(self.grad_y)), grads
        if mode == "bwd":
            y = self.forward()
            return (lambda: y.backward(self.grad_y, retain_graph=True)), grads
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")


# --- work per mode -------------------------------------------------------------------------------

def flops(provider: str, shape: LayerShape, mode: str) -> int:
    """Useful floating-point operations of one call in `mode` (see the module docstring)."""
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    base = 2 * M * K * N
    lora_fwd = 0 if provider == "base" else 2 * M * r * (K + N)
    lora_bwd = 0 if provider == "base" else 4 * M * r * (K + N)
    per_mode = {"fwd": base + lora_fwd, "bwd": base + lora_bwd}
    per_mode["fwd+bwd"] = per_mode["fwd"] + per_mode["bwd"]
    if mode not in per_mode:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    return per_mode[mode]


def lora_share(provider: str, shape: LayerShape, mode: str) -> float:
    """The adapter's share of the matrix work one call executes in `mode`: LoRA / (frozen GEMMs + LoRA).

    For the other providers the adapter runs at its rank r, as ``flops`` counts
    it. The fused kernels are sized by the adapter width r_max, not the rank
    (so that one compiled graph serves every rank): their rank tiles are
    BLOCK_R = rank_block(r_max) wide, and every tile that starts below r runs
    in full, so they execute the adapter at width ceil(r / BLOCK_R) * BLOCK_R.
    That is the price of a rank read on the device, e.g. 64 columns at rank 1
    for an adapter of width 64.
    """
    if provider == "base":
        return 0.0
    width = shape.r
    if provider in FUSED:
        from hybrid_lora.kernels.configs import rank_block

        block = rank_block(shape.r_max if provider == "fused" else shape.r)  # peft's adapter is r wide
        width = -(-shape.r // block) * block
    executed = LayerShape(shape.M, shape.K, shape.N, width, shape.dtype, max(width, shape.r_max), shape.dropout_p)
    total = flops(provider, executed, mode)
    return (total - flops("base", executed, mode)) / total


def tensor_bytes(shape: LayerShape) -> dict:
    """Bytes of every named tensor in the traffic models. Masks are bool (one byte per element)."""
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    e = torch.empty((), dtype=shape.dtype).element_size()
    sizes = {}
    for names, elements in (
        (("X", "Xd", "dX", "dXb", "dXl", "dXd", "G"), M * K),
        (("Y", "Y2", "P", "Q", "U", "U2", "dY", "dU", "dQ"), M * N),
        (("S", "T", "dS", "dT"), M * r),
        (("W",), K * N), (("b",), N), (("A", "dA"), K * r), (("B", "dB"), r * N),
    ):
        for name in names:
            sizes[name] = elements * e
    sizes["mask"] = M * K
    return sizes


def traffic(provider: str, shape: LayerShape, mode: str) -> list:
    """The provider's operations in `mode` as (operation, tensors read, tensors written).

    Each operation reads its inputs from DRAM and writes its outputs once. The
    fused kernels regenerate the dropout mask from a seed, so it costs no bytes;
    the other providers store it. Not counted: the fp32 partial sums of the
    fused adapter gradients and the zero padding of gradients past rank r.
    """
    drop = shape.dropout_p > 0.0
    lora_in = "Xd" if drop else "X"
    fwd, bwd = [], []
    if provider == "base":
        fwd = [("addmm", ("X", "W", "b"), ("Y",))]
        bwd = [("mm dY W^T", ("dY", "W"), ("dX",))]
    elif provider in FUSED:
        fwd = [("S = D(X) A", ("X", "A"), ("S",)),
               ("Y = [X|S] [W;sB] + b", ("X", "W", "S", "B", "b"), ("Y",))]
        bwd = [("dS = dY B^T", ("dY", "B"), ("dS",)),
               ("dX = dY W^T + s D(dS A^T)", ("dY", "W", "dS", "A"), ("dX",)),
               ("dA = s D(X)^T dS", ("X", "dS"), ("dA",)),
               ("dB = s S^T dY", ("dY", "S"), ("dB",))]
    elif provider == "addmm":
        fwd = ([("dropout mask", (), ("mask",)), ("X * mask", ("X", "mask"), ("Xd",))] if drop else []) + [
            ("addmm", ("X", "W", "b"), ("Y",)),
            ("mm X A", (lora_in, "A"), ("T",)),
            ("Y.addmm_(T, B)", ("T", "B", "Y"), ("Y",))]
        bwd = [("mm dY B^T", ("dY", "B"), ("dS",)),
               ("mm dY W^T", ("dY", "W"), ("dX",))]
        if drop:
            bwd += [("mm dS A^T", ("dS", "A"), ("G",)),
                    ("dX += G * mask", ("G", "mask", "dX"), ("dX",)),
                    ("X * mask", ("X", "mask"), ("Xd",))]
        else:
            bwd += [("dX.addmm_(dS, A^T)", ("dS", "A", "dX"), ("dX",))]
        bwd += [("mm X^T dS", (lora_in, "dS"), ("dA",)),
                ("mm X A (recomputed)", (lora_in, "A"), ("T",)),
                ("mm T^T dY", ("T", "dY"), ("dB",))]
    elif provider == "peft":
        fwd = [("Conv1D addmm", ("X", "W", "b"), ("Y",))]
        fwd += [("dropout", ("X",), ("Xd", "mask"))] if drop else []
        fwd += [("lora_A", (lora_in, "A"), ("T",)),
                ("lora_B", ("T", "B"), ("U",)),
                ("* scaling", ("U",), ("U2",)),
                ("result + ...", ("Y", "U2"), ("Y2",))]
        bwd = [("* scaling backward", ("dY",), ("dU",)),
               ("lora_B backward dT", ("dU", "B"), ("dT",)),
               ("lora_B backward dB", ("dU", "T"), ("dB",)),
               ("lora_A backward dXd", ("dT", "A"), ("dXd",)),
               ("lora_A backward dA", ("dT", lora_in), ("dA",))]
        bwd += [("dropout backward", ("dXd", "mask"), ("dXl",))] if drop else []
        bwd += [("Conv1D backward", ("dY", "W"), ("dXb",)),
                ("accumulate dX", ("dXb", "dXl" if drop else "dXd"), ("dX",))]
    elif provider == "compiled":
        # Inductor's usual lowering: each matmul a library call, the pointwise ops fused around them.
        fwd = [("rand >= p, X * mask", ("X",), ("Xd", "mask"))] if drop else []
        fwd += [("mm X W", ("X", "W"), ("P",)),
                ("mm X A", (lora_in, "A"), ("S",)),
                ("mm S B", ("S", "B"), ("Q",)),
                ("P + s Q + b", ("P", "Q", "b"), ("Y",))]
        bwd = [("s dY", ("dY",), ("dQ",)),
               ("mm dQ B^T", ("dQ", "B"), ("dS",)),
               ("mm S^T dQ", ("S", "dQ"), ("dB",)),
               ("mm dY W^T", ("dY", "W"), ("dXb",)),
               ("mm dS A^T", ("dS", "A"), ("dXd",)),
               ("mm X^T dS", (lora_in, "dS"), ("dA",))]
        bwd += [("dXb + dXd * mask", ("dXb", "dXd", "mask"), ("dX",))] if drop else [
            ("dXb + dXd", ("dXb", "dXd"), ("dX",))]
    else:
        raise ValueError(f"provider {provider!r}: expected one of {PROVIDERS}")
    per_mode = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}
    if mode not in per_mode:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    return per_mode[mode]


def bytes_moved(provider: str, shape: LayerShape, mode: str) -> int:
    """Total bytes of the traffic model of `provider` in `mode`."""
    sizes = tensor_bytes(shape)
    return sum(sizes[t] for _, reads, writes in traffic(provider, shape, mode) for t in (*reads, *writes))


# --- the layers ----------------------------------------------------------------------------------

def _inputs(shape, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(shape.M, shape.K, generator=g).to(device=device, dtype=shape.dtype).requires_grad_(True)
    grad_y = torch.randn(shape.M, shape.N, generator=g).to(device=device, dtype=shape.dtype)
    return x, grad_y


def _trainable_adapters(weights):
    a = weights.lora_a.detach().clone().requires_grad_(True)
    b = weights.lora_b.detach().clone().requires_grad_(True)
    return a, b


def _sliced_grads(a, b, rank):
    return lambda: (a.grad[:, :rank], b.grad[:rank])


def _build_base(shape, weights, x):
    w, b = weights.weight, weights.bias
    return (lambda: torch.addmm(b, x, w)), [], [w, b], (lambda: (None, None))


def _build_fused(shape, weights, x):
    from hybrid_lora import fused_lora

    w, b = weights.weight, weights.bias
    a, bb = _trainable_adapters(weights)
    # Held on the device once, as the layer holds them: a Python number would be a copy per call.
    rank = torch.tensor(shape.r, dtype=torch.int64, device=x.device)
    scale = torch.tensor(weights.scale, dtype=torch.float32, device=x.device)

    def forward():
        return fused_lora(x, w, b, a, bb, rank=rank, scale=scale, dropout_p=shape.dropout_p)

    return forward, [a, bb], [w, b], _sliced_grads(a, bb, shape.r)


class _AddmmLoRA(torch.autograd.Function):
    """Y = addmm(b, X, W) then Y.addmm_(D(X) A_r, B_r, alpha=s); backward with addmm_, recomputing D(X) A_r.

    The composition of unsloth's LoRA kernels (only X is saved; X A is
    recomputed in the backward). unsloth has no LoRA dropout; here D(X) uses a
    stored bool mask.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, rank, scale, dropout_p):
        a_r, b_r = lora_a[:, :rank], lora_b[:rank]
        keep = None
        x_in = x
        if dropout_p > 0.0:
            keep = torch.rand_like(x) >= dropout_p
            x_in = x * keep / (1.0 - dropout_p)
        y = torch.addmm(bias, x, weight)
        y.addmm_(x_in @ a_r, b_r, alpha=scale)
        ctx.save_for_backward(x, keep, weight, lora_a, lora_b)
        ctx.rank, ctx.scale, ctx.dropout_p = rank, scale, dropout_p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, keep, weight, lora_a, lora_b = ctx.saved_tensors
        rank, scale, p = ctx.rank, ctx.scale, ctx.dropout_p
        a_r, b_r = lora_a[:, :rank], lora_b[:rank]
        grad_s = grad_y @ b_r.t()  # [M, r], unscaled
        grad_x = grad_y @ weight.t()
        x_in = x
        if keep is not None:
            grad_x += (grad_s @ a_r.t()).mul_(keep).mul_(scale / (1.0 - p))
            x_in = x * keep / (1.0 - p)
        else:
            grad_x.addmm_(grad_s, a_r.t(), alpha=scale)
        grad_a = torch.zeros_like(lora_a)
        grad_a[:, :rank].addmm_(x_in.t(), grad_s, beta=0.0, alpha=scale)
        grad_b = torch.zeros_like(lora_b)
        grad_b[:rank].addmm_((x_in @ a_r).t(), grad_y, beta=0.0, alpha=scale)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _build_addmm(shape, weights, x):
    w, b = weights.weight, weights.bias
    a, bb = _trainable_adapters(weights)

    def forward():
        return _AddmmLoRA.apply(x, w, b, a, bb, shape.r, weights.scale, shape.dropout_p)

    return forward, [a, bb], [w, b], _sliced_grads(a, bb, shape.r)


def _reference_layer(x, weight, bias, lora_a, lora_b, rank: int, scale: float, dropout_p: float):
    from hybrid_lora.ops import reference

    keep = torch.rand_like(x) >= dropout_p if dropout_p > 0.0 else None
    return reference.lora_forward(x, weight, bias, lora_a, lora_b, rank, scale, keep, dropout_p)[0]


def _build_compiled(shape, weights, x, compile_backend="inductor"):
    import torch._functorch.config as functorch_config

    w, b = weights.weight, weights.bias
    a, bb = _trainable_adapters(weights)
    # Dynamo keeps its compiled variants on the function's code object and falls back to eager,
    # silently, past its recompile limit; a sweep over shapes would then time eager code.
    torch._dynamo.reset()
    compiled = torch.compile(_reference_layer, backend=compile_backend, dynamic=False)

    def forward():
        return compiled(x, w, b, a, bb, shape.r, weights.scale, shape.dropout_p)

    def context():
        # Donated buffers (the compiled backward reusing saved memory) forbid
        # backward(retain_graph=True), which the "bwd" mode uses to time the backward
        # alone; the setting is read when compiling and again at every backward.
        return functorch_config.patch(donated_buffer=False)

    with context():  # compile now, forward and backward
        forward().backward(torch.ones(shape.M, shape.N, dtype=shape.dtype, device=x.device))
    for t in (x, a, bb):
        t.grad = None
    return forward, [a, bb], [w, b], _sliced_grads(a, bb, shape.r), context


def _build_peft(shape, weights, x, accelerated=False):
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    linear = shape.weight_layout == "out_in"

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(shape.K, shape.N) if linear else Conv1D(shape.N, shape.K)

    holder = Holder()
    config = LoraConfig(r=shape.r, lora_alpha=weights.scale * shape.r, lora_dropout=shape.dropout_p,
                        target_modules=["proj"], fan_in_fan_out=not linear, bias="none")
    holder = inject_adapter_in_model(config, holder)
    if accelerated:
        from hybrid_lora import accelerate

        accelerate(holder, strict=True)
    holder.to(device=weights.weight.device, dtype=shape.dtype).train()
    layer = holder.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(weights.weight.t() if linear else weights.weight)
        layer.base_layer.bias.copy_(weights.bias)
        layer.lora_A["default"].weight.copy_(weights.lora_a[:, :shape.r].t())
        layer.lora_B["default"].weight.copy_(weights.lora_b[:shape.r].t())
    if abs(layer.scaling["default"] - weights.scale) > 1e-6 * abs(weights.scale):
        raise RuntimeError(f"peft scaling {layer.scaling['default']} differs from the layer's scale {weights.scale}")
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # [r, K], [N, r]
    frozen = [p for p in layer.parameters() if not p.requires_grad]
    return (lambda: layer(x)), [lora_a, lora_b], frozen, (lambda: (lora_a.grad.t(), lora_b.grad.t()))


_BUILDERS = {
    "base": _build_base,
    "peft": _build_peft,
    "addmm": _build_addmm,
    "compiled": _build_compiled,
    "fused": _build_fused,
    "peft+accelerate": lambda shape, weights, x: _build_peft(shape, weights, x, accelerated=True),
}
PROVIDERS = tuple(_BUILDERS)


def build_layer(provider: str, shape: LayerShape, device, *, seed=0, weights=None, compile_backend="inductor"):
    """The layer of `provider` at `shape` on `device`, with weights from `seed` unless `weights` is given."""
    if provider not in _BUILDERS:
        raise ValueError(f"provider {provider!r}: expected one of {PROVIDERS}")
    device = torch.device(device)
    if weights is None:
        weights = LayerWeights.random(shape, device, seed=seed)
    x, grad_y = _inputs(shape, device, seed)
    if provider == "compiled":
        built = _build_compiled(shape, weights, x, compile_backend)
    else:
        built = _BUILDERS[provider](shape, weights, x)
    return Layer(provider, shape, x, grad_y, *built)
