"""The baselines' own parts. EWC: the Fisher is the mean squared batch gradient, the penalty its weighted
distance, and a large weight keeps the second stage near the first stage's adapters. Replay: a fixed small
sample of each earlier domain joins every later stage. (L2: tests/test_regularizers.py, test_trainer.py.)"""

import pytest
import torch
from test_trainer import rule_domain, tiny_lora_model

import hybrid_lora
from hybrid_lora.train.ewc import anchor_from_checkpoint, anchor_to_checkpoint, ewc_penalty, fisher_anchor
from hybrid_lora.train.metrics import causal_lm_loss, model_logits


pytestmark = pytest.mark.usefixtures("torch_path")


def _trained_model():
    model = tiny_lora_model(r_max=4, alpha=4.0, model_dropout=0.0, dropout=0.0)
    with torch.no_grad():
        for layer in hybrid_lora.lora_layers(model):
            layer.lora_b.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    return model


def test_fisher_is_the_mean_squared_batch_gradient_and_the_penalty_its_weighted_distance():
    model = _trained_model()
    layers = hybrid_lora.lora_layers(model)
    _, train, _ = rule_domain("plus1", 1, 12, 4, seed=1)
    anchor = fisher_anchor(model, layers, train, batches=2, batch_size=4, device=torch.device("cpu"))
    expected_a = torch.zeros_like(layers[0].lora_a)
    for start in (0, 4):  # the first two batches of 4, in order
        batch = {k: torch.stack([ex[k] for ex in train[start:start + 4]]) for k in ("input_ids", "attention_mask",
                                                                                     "labels")}
        grad = torch.autograd.grad(causal_lm_loss(model_logits(model, batch), batch["labels"]), layers[0].lora_a)[0]
        expected_a += grad.square() / 2
    torch.testing.assert_close(anchor.tensors[0][2], expected_a)
    assert expected_a.abs().max() > 0 and layers[0].lora_a.grad is None
    assert float(ewc_penalty(layers, anchor)) == 0.0  # at the anchor
    with torch.no_grad():
        layers[0].lora_a.add_(0.5)
    torch.testing.assert_close(ewc_penalty(layers, anchor), 0.25 * expected_a.sum())
    layers[0].truncate_(2)  # after a rank cut, the kept components only
    for layer in layers[1:]:
        layer.truncate_(2)
    torch.testing.assert_close(ewc_penalty(layers, anchor), 0.25 * expected_a[:, :2].sum())
    restored = anchor_from_checkpoint(anchor_to_checkpoint(anchor), torch.device("cpu"))
    for got, want in zip(restored.tensors, anchor.tensors):
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    with pytest.raises(ValueError, match="batches=0"):
        fisher_anchor(model, layers, train, batches=0, batch_size=4, device=torch.device("cpu"))


def test_ewc_variant_keeps_the_second_stage_near_the_first_adapters():
    from hybrid_lora.train.config import variant_config
    from hybrid_lora.train.trainer import run_continual

    domains = [rule_domain("plus1", 1, 32, 8, seed=1), rule_domain("plus5", 5, 32, 8, seed=2)]
    moved = {}
    for lam in (0.0, 1e6):
        model = tiny_lora_model(r_max=4, alpha=4.0, model_dropout=0.0)
        layers = hybrid_lora.lora_layers(model)
        config = variant_config("ewc", r_max=4, alpha=4.0, epochs=2, lr=3e-2, lora_dropout=0.0, lambda_ewc=lam,
                                ewc_batches=2, sweep_ranks=(), log_every=0)
        stage_one = []
        run_continual(model, domains, config, log=lambda row: stage_one.append(
            [layer.lora_b.detach().clone() for layer in layers]) if row.get("stage") == 0 else None)
        after_one = stage_one[-1]
        moved[lam] = sum(float((layer.lora_b - b).square().sum()) for layer, b in zip(layers, after_one))
    assert moved[1e6] < 0.25 * moved[0.0]


def test_replay_adds_the_same_small_sample_of_every_earlier_domain_and_leaves_eval_alone():
    from hybrid_lora.train.config import variant_config
    from hybrid_lora.train.replay import replay_sample, with_replay

    domains = [(f"d{i}", [{"id": (i, j)} for j in range(200)], [{"id": ("eval", i)}]) for i in range(3)]
    out = with_replay(domains, 0.02, seed=7)
    assert [len(train) for _, train, _ in out] == [200, 204, 208]
    assert out[1][1][:200] == domains[1][1] and all(ex["id"][0] == 0 for ex in out[1][1][200:])
    assert out[2][1][200:204] == out[1][1][200:]  # the same examples of domain 0 at every later stage
    assert {ex["id"][0] for ex in out[2][1][204:]} == {1}
    assert [ev for _, _, ev in out] == [ev for _, _, ev in domains]
    assert replay_sample(200, 0.02, 7, 0) != replay_sample(200, 0.02, 8, 0)
    assert with_replay(domains, 0.0, seed=7) == [(n, list(t), e) for n, t, e in domains]
    with pytest.raises(ValueError, match="replay fraction 1.5"):
        with_replay(domains, 1.5, seed=7)
    assert variant_config("replay").replay_fraction == 0.02 and variant_config("hybrid").replay_fraction == 0.0


def test_replay_pads_a_stage_that_mixes_domains_of_other_lengths_without_changing_any_loss():
    """Each embedded domain is padded to its own longest text; a replayed example of another length must
    still batch with the stage's own, and the padding must not change what the model is trained on."""
    from torch.utils.data import DataLoader

    from hybrid_lora.experiments.data import load_domain
    from hybrid_lora.io.models import load_model_and_tokenizer
    from hybrid_lora.train.replay import padded, with_replay

    model, tokenizer = load_model_and_tokenizer("embedded")
    domains = [load_domain(name, tokenizer, n_train=40, n_eval=4) for name in ("embedded-a", "embedded-b")]
    lengths = {train[0]["input_ids"].shape[0] for _, train, _ in domains}
    assert len(lengths) == 2, "the test needs two domains of different lengths"
    stage = with_replay(domains, 0.25, seed=3)[1][1]
    batch = next(iter(DataLoader(stage, batch_size=len(stage))))  # stacks: one length for all
    assert batch["input_ids"].shape[1] == max(lengths)
    model.eval()
    for example in (domains[0][1][0], domains[1][1][0]):
        longer = padded(example, max(lengths) + 5)
        with torch.no_grad():
            losses = [causal_lm_loss(model_logits(model, {k: v[None] for k, v in e.items()}), e["labels"][None])
                      for e in (example, longer)]
        assert torch.allclose(losses[0], losses[1], atol=1e-6)
    with pytest.raises(ValueError, match="expected at most"):
        padded(domains[0][1][0], 1)
