"""The terms added to the language-model loss: the ordering penalty and the domain-correlation loss.

Both act on the adapters of a list of LoRA layers at their active
rank r, with A [in, r_max], B [r_max, out] and delta_W = s A[:, :r] B[:r, :],
s = alpha / r. Neither touches training data.

- ``order_penalty``: sum over layers of sum_{i<r} (i / (r - 1)) ||A[:, i]|| ||B[i, :]||.
  Later components pay more, so what the adapter learns gathers in the
  leading ones and the rank can be cut after training.
- ``domain_correlation``: 1 - cos(delta_W_prev, delta_W_cur), the cosine taken
  over the update matrices of all layers laid end to end. It pulls the
  adapter being trained towards the direction of the one a previous domain
  left (DC-LoRA, Smith et al., CVPRW 2025), storing only that adapter.
- ``weight_correlation``: the original experiment's form, 1 - cos over the
  adapter weights flattened, here on rank-aligned slices (A[:, :r], B[:r] of
  both adapters, r the smaller rank) so that component i meets component i.
  ``DC_MODES`` maps the trainer's mode names to the two.
- ``l2_to_previous``: sum over layers of ||delta_W_cur - delta_W_prev||_F^2,
  the cheapest baseline (L2 toward the previous adapter, as in the L2
  baselines of Kirkpatrick et al., PNAS 2017, applied to the update). Unlike
  1 - cos, which is scale-invariant, it bounds how far delta_W moves.
"""

from dataclasses import dataclass

import torch


def order_weights(rank, device=None, dtype=torch.float32):
    """i / (r - 1) for i = 0..r-1: 0 for the first component, 1 for the last; [0] when r = 1."""
    if rank == 1:
        return torch.zeros(1, device=device, dtype=dtype)
    return torch.arange(rank, device=device, dtype=dtype) / (rank - 1)


def order_penalty(layers):
    """sum_layers sum_{i<r} (i / (r - 1)) ||A[:, i]||_2 ||B[i, :]||_2 at each layer's active rank. Scalar, fp32.

    The norm of a zero row of B (B starts at zero) has gradient zero, not NaN.
    """
    if not layers:
        raise ValueError("order_penalty: no LoRA layers given; expected at least one LoRA layer")
    total = 0.0
    for layer in layers:
        r = layer.rank
        col_norms = torch.linalg.vector_norm(layer.lora_a[:, :r].float(), dim=0)  # (r,)
        row_norms = torch.linalg.vector_norm(layer.lora_b[:r].float(), dim=1)  # (r,)
        total = total + (order_weights(r, layer.lora_a.device) * col_norms * row_norms).sum()
    return total


@dataclass(frozen=True)
class AdapterFactors:
    """One layer's adapter at its rank: delta_W = scale * a @ b, a [in, r], b [r, out], fp32."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def _factors(layer):
    r = layer.rank
    return layer.lora_a[:, :r].float(), layer.lora_b[:r].float(), layer.scale


def adapter_inner(a1, b1, s1, a2, b2, s2):
    """<s1 A1 B1, s2 A2 B2>_F without forming either product.

    tr((A1 B1)^T A2 B2) = sum_ij (A1^T A2)_ij (B1 B2^T)_ij, so the cost is
    (in + out) r1 r2 instead of in * out * (r1 + r2), and the ranks may differ.
    A1 [in, r1], B1 [r1, out], A2 [in, r2], B2 [r2, out].
    """
    return s1 * s2 * ((a1.t() @ a2) * (b1 @ b2.t())).sum()


@dataclass(frozen=True)
class AdapterSnapshot:
    """Every layer's adapter at one moment, detached, in layer order: what L_DC compares against."""

    factors: tuple  # one AdapterFactors per layer
    squared_norm: torch.Tensor  # sum_l ||delta_W_l||^2 > 0, computed once as it never changes


def snapshot_adapters(layers):
    """An AdapterSnapshot of `layers` at their active ranks (fp32 copies).

    Raises if the adapters are all zero, as a cosine with a zero matrix is undefined.
    """
    if not layers:
        raise ValueError("snapshot_adapters: no LoRA layers given; expected at least one LoRA layer")
    with torch.no_grad():
        factors = tuple(AdapterFactors(a.detach().clone(), b.detach().clone(), s) for a, b, s in map(_factors, layers))
        squared_norm = sum(adapter_inner(f.a, f.b, f.scale, f.a, f.b, f.scale) for f in factors)
    if not squared_norm > 0:
        raise ValueError(f"snapshot_adapters: the adapters' squared norm is {float(squared_norm)}; expected > 0 "
                         "(a freshly initialised adapter has B = 0 and no direction to keep)")
    return AdapterSnapshot(factors, squared_norm)


def _paired(name, layers, snapshot):
    """[((A, B, s) of the layer, stored factors)] for each layer, checked to match the snapshot."""
    if not layers:
        raise ValueError(f"{name}: no LoRA layers given; expected at least one LoRA layer")
    if len(layers) != len(snapshot.factors):
        raise ValueError(f"{name}: {len(layers)} layers but a snapshot of {len(snapshot.factors)}; "
                         "expected the same layers, in the same order")
    pairs = []
    for layer, prev in zip(layers, snapshot.factors):
        a, b, s = _factors(layer)
        if prev.a.shape[0] != a.shape[0] or prev.b.shape[1] != b.shape[1]:
            raise ValueError(f"{name}: stored adapter maps {prev.a.shape[0]} -> {prev.b.shape[1]} "
                             f"features, the layer {a.shape[0]} -> {b.shape[1]}; expected the same layer")
        pairs.append(((a, b, s), prev))
    return pairs


def domain_correlation(layers, snapshot, eps=1e-12):
    """1 - cos(delta_W_prev, delta_W_cur) over all layers, with a gradient to the current adapters. Scalar, fp32.

    cos = sum_l <dW_prev_l, dW_cur_l> / sqrt(sum_l ||dW_prev_l||^2 * sum_l ||dW_cur_l||^2).
    Comparing the update matrices, not the flattened factors, keeps the
    comparison aligned when the current rank differs from the stored one.
    """
    cross, norm_cur = 0.0, 0.0
    for (a, b, s), prev in _paired("domain_correlation", layers, snapshot):
        cross = cross + adapter_inner(prev.a, prev.b, prev.scale, a, b, s)
        norm_cur = norm_cur + adapter_inner(a, b, s, a, b, s)
    # The Gram form of a squared norm can round a hair below zero; clamp before the root.
    return 1.0 - cross / torch.sqrt(snapshot.squared_norm * norm_cur.clamp_min(eps))


def weight_correlation(layers, snapshot, eps=1e-12):
    """1 - cos(w_prev, w_cur) over the adapter weights flattened, rank-aligned. Scalar, fp32, with a gradient.

    For each layer, r = min(current rank, stored rank) and the layer contributes
    the vector [A[:, :r].flatten(), B[:r].flatten()] of each adapter; the vectors of
    all layers are laid end to end. Scales are left out, as the original left them.
    Unlike ``domain_correlation`` this depends on how each adapter splits its
    update into components: a permutation of components changes it.
    """
    cross = norm_prev = norm_cur = 0.0
    for (a, b, _), prev in _paired("weight_correlation", layers, snapshot):
        r = min(a.shape[1], prev.a.shape[1])
        a, b, a_prev, b_prev = a[:, :r], b[:r], prev.a[:, :r], prev.b[:r]
        cross = cross + (a * a_prev).sum() + (b * b_prev).sum()
        norm_prev = norm_prev + a_prev.square().sum() + b_prev.square().sum()
        norm_cur = norm_cur + a.square().sum() + b.square().sum()
    return 1.0 - cross / torch.sqrt((norm_prev * norm_cur).clamp_min(eps))


def l2_to_previous(layers, snapshot):
    """sum_l ||dW_cur_l - dW_prev_l||_F^2 over all layers, with a gradient to the current adapters. Scalar, fp32.

    Expanded as ||X||^2 - 2 <X, Y> + ||Y||^2 with the Gram form of ``adapter_inner``, so no [in, out]
    matrix is formed and the ranks may differ.
    """
    cross, norm_cur = 0.0, 0.0
    for (a, b, s), prev in _paired("l2_to_previous", layers, snapshot):
        cross = cross + adapter_inner(prev.a, prev.b, prev.scale, a, b, s)
        norm_cur = norm_cur + adapter_inner(a, b, s, a, b, s)
    return norm_cur - 2.0 * cross + snapshot.squared_norm


# L_DC by the trainer's mode name: "delta" compares update matrices, "weights" the factors.
DC_MODES = {"delta": domain_correlation, "weights": weight_correlation}
