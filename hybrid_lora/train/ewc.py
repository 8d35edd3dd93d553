"""EWC on the adapters: a diagonal Fisher estimate from the previous domain's batches, kept instead of its data.

Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) adds

    L_EWC = sum_j F_j (theta_j - theta*_j)^2

over the adapter parameters theta (every layer's A and B), where theta* are
their values at the end of the previous stage and F the diagonal of the
empirical Fisher information there, estimated as the mean over batches of the
squared gradient of the batch's CE. Over several stages the Fisher adds up and
theta* moves to the latest stage's end ("online" EWC, Schwarz et al., ICML
2018, with no decay). What is stored is two tensors per parameter, never a
training example. After a rank cut the penalty covers the kept components.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from hybrid_lora.train.metrics import causal_lm_loss, model_logits, move_batch


@dataclass
class EWCAnchor:
    """Per layer, in layer order: (A*, B*, F_A, F_B), fp32, at the width the layers had when it was taken."""

    tensors: list


def fisher_anchor(model, layers, dataset, batches, batch_size, device, previous=None, autocast=None):
    """An EWCAnchor at the layers' current adapters, with the Fisher of up to `batches` batches of `dataset`.

    The model runs in eval mode (no dropout) and gets its mode back; parameter gradients are left cleared.
    `previous`: the anchor of earlier stages, whose Fisher is added (cut to the current width).
    `autocast`: a fresh autocast context for the forward passes (None: none).
    """
    if batches < 1:
        raise ValueError(f"fisher_anchor: batches={batches!r}; expected an integer >= 1")
    was_training = model.training
    model.eval()
    sums = [(torch.zeros_like(layer.lora_a, dtype=torch.float32), torch.zeros_like(layer.lora_b, dtype=torch.float32))
            for layer in layers]
    count = 0
    # its own generator: a loader without one draws a seed from torch's global generator at every pass
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    try:
        for index, batch in enumerate(loader):
            if index >= batches:
                break
            for layer in layers:
                layer.lora_a.grad = layer.lora_b.grad = None
            batch = move_batch(batch, device)
            with autocast if autocast is not None else nullcontext():
                loss = causal_lm_loss(model_logits(model, batch), batch["labels"])
            loss.backward()
            for (sum_a, sum_b), layer in zip(sums, layers):
                sum_a += layer.lora_a.grad.float().square()
                sum_b += layer.lora_b.grad.float().square()
            count += 1
    finally:
        for layer in layers:
            layer.lora_a.grad = layer.lora_b.grad = None
        model.train(was_training)
    tensors = []
    for i, ((sum_a, sum_b), layer) in enumerate(zip(sums, layers)):
        fisher_a, fisher_b = sum_a / count, sum_b / count
        if previous is not None:
            _, _, old_a, old_b = previous.tensors[i]
            r = layer.lora_a.shape[1]
            fisher_a, fisher_b = fisher_a + old_a[:, :r], fisher_b + old_b[:r]
        tensors.append((layer.lora_a.detach().float().clone(), layer.lora_b.detach().float().clone(),
                        fisher_a, fisher_b))
    return EWCAnchor(tensors)


def ewc_penalty(layers, anchor):
    """sum over layers of sum F (theta - theta*)^2 over the components both share. Scalar, fp32, with a gradient."""
    if len(layers) != len(anchor.tensors):
        raise ValueError(f"ewc_penalty: {len(layers)} layers but an anchor of {len(anchor.tensors)}; "
                         "expected the same layers, in the same order")
    total = 0.0
    for layer, (a_star, b_star, fisher_a, fisher_b) in zip(layers, anchor.tensors):
        r = min(layer.lora_a.shape[1], a_star.shape[1])
        total = total + (fisher_a[:, :r] * (layer.lora_a[:, :r].float() - a_star[:, :r]).square()).sum()
        total = total + (fisher_b[:r] * (layer.lora_b[:r].float() - b_star[:r]).square()).sum()
    return total


def anchor_to_checkpoint(anchor):
    return {f"ewc.{i}.{part}": t for i, parts in enumerate(anchor.tensors)
            for part, t in zip(("a", "b", "fisher_a", "fisher_b"), parts)}


def anchor_from_checkpoint(tensors, device):
    count = len({k.split(".")[1] for k in tensors if k.startswith("ewc.")})
    if count == 0:
        return None
    return EWCAnchor([tuple(tensors[f"ewc.{i}.{part}"].to(device) for part in ("a", "b", "fisher_a", "fisher_b"))
                      for i in range(count)])
