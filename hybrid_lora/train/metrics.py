"""Language-model metrics of one domain, and the continual-learning metrics across domains.

Causal LM: the logits at position t predict the token at t + 1; labels are
the input ids with padding set to -100, and only labelled targets count.

- loss: mean cross-entropy over every labelled target token of the data set
  (token-weighted, not a mean of batch means); perplexity = exp(loss).
- accuracy: share of labelled targets where argmax(logits) is the next token.
- Across T domains trained in order, R[t][i] is a metric of domain i after
  stage t. Retention of domain i: R[T-1][i] / R[i][i]; backward transfer
  (Lopez-Paz & Ranzato, NeurIPS 2017, "Gradient Episodic Memory"):
  BWT = mean_{i < T-1} (R[T-1][i] - R[i][i]).
"""

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_targets(logits, labels):
    """Align predictions with targets: logits [B, T, V], labels [B, T] -> ([B*(T-1), V], [B*(T-1)])."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits have shape {tuple(logits.shape)} and labels {tuple(labels.shape)}; "
                         "expected [B, T, V] and [B, T]")
    return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)


def causal_lm_loss(logits, labels):
    """Mean next-token cross-entropy over labelled targets of one batch, in fp32. Scalar."""
    logits, targets = shifted_targets(logits, labels)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)


def model_logits(model, batch):
    """The model's logits [B, T, V] for a batch dict, with its attention mask and no key-value cache."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def move_batch(batch, device):
    """The batch's input_ids, attention_mask and labels on `device`."""
    missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; expected input_ids, attention_mask and labels")
    return {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels")}


@torch.no_grad()
def evaluate(model, loader, device, autocast=None, reduce=None):
    """Loss, perplexity and next-token accuracy of `model` over every batch of `loader`.

    Returns {"loss", "perplexity", "accuracy", "tokens"}. The model runs in
    eval mode (no dropout) and gets its previous mode back. reduce: applied to
    each token-weighted sum (loss, correct, targets) before the means are taken,
    such as a sum over the processes that each evaluated a shard.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for batch in loader:
            batch = move_batch(batch, device)
            with autocast or nullcontext():
                logits = model_logits(model, batch)  # (B, T, V)
            logits, targets = shifted_targets(logits, batch["labels"])
            loss_sum += F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
            # An argmax is never -100, so unlabelled targets never count as correct.
            correct += (logits.argmax(dim=-1) == targets).sum()
            count += (targets != IGNORE_INDEX).sum()
    finally:
        model.train(was_training)
    if reduce is not None:
        loss_sum, correct, count = reduce(loss_sum), reduce(correct), reduce(count)
    tokens = int(count)
    if tokens == 0:
        raise ValueError("evaluate: the data set holds no labelled target token; expected labels other than -100")
    loss = float(loss_sum) / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": int(correct) / tokens, "tokens": tokens}


def _check_matrix(matrix):
    stages = len(matrix)
    if stages == 0 or any(len(row) != stages for row in matrix):
        raise ValueError(f"expected a square T x T matrix of metric[stage][domain], got row lengths "
                         f"{[len(row) for row in matrix]}")
    return stages


def retention(matrix):
    """R[T-1][i] / R[i][i] for each earlier domain i: the share of a domain's accuracy kept to the end.

    None where R[i][i] is 0, as the ratio is undefined there.
    """
    stages = _check_matrix(matrix)
    return [matrix[-1][i] / matrix[i][i] if matrix[i][i] != 0 else None for i in range(stages - 1)]


def final_minus_own(matrix):
    """R[T-1][i] - R[i][i] for each earlier domain i (for losses: how much worse a domain got; > 0 is forgetting)."""
    stages = _check_matrix(matrix)
    return [matrix[-1][i] - matrix[i][i] for i in range(stages - 1)]


def backward_transfer(matrix):
    """BWT = mean_{i < T-1} (R[T-1][i] - R[i][i]); None for a single domain."""
    changes = final_minus_own(matrix)
    return sum(changes) / len(changes) if changes else None
