"""Loss, perplexity and accuracy over labelled next tokens; retention and backward transfer."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hybrid_lora.train.metrics import backward_transfer, causal_lm_loss, evaluate, final_minus_own, retention

VOCAB = 11


class PlusOneModel(nn.Module):
    """Logits that put the next token at (current + 1) % VOCAB, with a known, position-independent spread."""

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits.scatter_(-1, ((input_ids + 1) % VOCAB).unsqueeze(-1), 2.0)
        return SimpleNamespace(logits=logits)


def example(ids, length):
    ids = torch.tensor(ids)
    mask = (torch.arange(len(ids)) < length).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# Four sequences of width 5 with 5, 2, 4 and 1 real tokens: 4 + 1 + 3 + 0 = 8 targets.
# Targets that follow the +1 rule: 4 (first row) + 0 + 2 (third row: 2->3, 3->4, not 4->6) = 6 of 8.
EXAMPLES = [
    example([0, 1, 2, 3, 4], 5),
    example([7, 9, 0, 0, 0], 2),
    example([2, 3, 4, 6, 6], 4),
    example([5, 0, 0, 0, 0], 1),
]


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_evaluate_weights_every_labelled_target_token_alike(batch_size):
    model = PlusOneModel().train()
    result = evaluate(model, torch.utils.data.DataLoader(EXAMPLES, batch_size=batch_size), torch.device("cpu"))
    assert result["tokens"] == 8
    assert result["accuracy"] == 6 / 8
    # Each target is either the +1 token (logit 2) or another (logit 0) among VOCAB logits.
    hit = -math.log(math.exp(2.0) / (math.exp(2.0) + VOCAB - 1))
    miss = -math.log(1.0 / (math.exp(2.0) + VOCAB - 1))
    assert result["loss"] == pytest.approx((6 * hit + 2 * miss) / 8, rel=1e-6)  # fp32 cross-entropy
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert model.training  # evaluate hands the mode back


def test_evaluate_refuses_a_set_without_labelled_targets():
    loader = torch.utils.data.DataLoader([example([1, 2, 3], 1)], batch_size=1)
    with pytest.raises(ValueError, match="no labelled target token"):
        evaluate(PlusOneModel(), loader, torch.device("cpu"))


def test_causal_lm_loss_equals_the_transformers_loss_with_padding():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=VOCAB,
                                       bos_token_id=0, eos_token_id=0))
    batch = torch.utils.data.default_collate(EXAMPLES)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(causal_lm_loss(out.logits, batch["labels"]), out.loss, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"expected \[B, T, V\] and \[B, T\]"):
        causal_lm_loss(out.logits, batch["labels"][:, :-1])


def test_retention_and_backward_transfer_read_the_final_row_against_the_diagonal():
    accuracy = [[0.50, 0.10, 0.05],
                [0.40, 0.60, 0.10],
                [0.25, 0.45, 0.70]]
    assert retention(accuracy) == pytest.approx([0.25 / 0.50, 0.45 / 0.60])
    assert final_minus_own(accuracy) == pytest.approx([-0.25, -0.15])
    assert backward_transfer(accuracy) == pytest.approx(-0.20)
    assert backward_transfer([[0.3]]) is None
    assert retention([[0.0, 0.1], [0.2, 0.3]]) == [None]
    with pytest.raises(ValueError, match="square"):
        retention([[0.5, 0.1]])
