"""The rank samplers of DyLoRA's modes: the ranks each draws, their distributions, the multi-rank step's
gradient, and a resumed run with each sampler ending like one never interrupted."""

import math

import pytest
import torch

import hybrid_lora
from hybrid_lora.train import trainer
from hybrid_lora.train.config import TrainConfig
from hybrid_lora.train.dynamic_rank import RankSampler, doubling_ranks, nested_ranks, step_rank, step_ranks
from hybrid_lora.train.metrics import causal_lm_loss, model_logits
from hybrid_lora.train.rank_curve import rank_curves
from hybrid_lora.train.state import EpochTotals
from test_trainer import adapter_tensors, rule_domain, tiny_lora_model

# Upper 0.1 % points of the chi-square distribution (any statistics table): a correct sampler fails one
# test in a thousand seeds, and the seeds here are fixed.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 6: 22.458, 15: 37.697}


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")


def log_uniform_probabilities(r):
    return {b: math.log((b + 1) / b) / math.log(r + 1) for b in range(1, r + 1)}


def chi_square(draws, probabilities):
    """Pearson's statistic of `draws` against {value: probability}; a draw outside the support raises."""
    outside = set(draws) - set(probabilities)
    assert not outside, f"drew {sorted(outside)}, outside {sorted(probabilities)}"
    n = len(draws)
    return sum((draws.count(b) - n * p) ** 2 / (n * p) for b, p in probabilities.items())


@pytest.mark.parametrize("mode", ["full", "frozen", "nested", "log-uniform", "doubling", "off"])
@pytest.mark.parametrize("rank", [1, 2, 6, 64])
def test_every_sampler_draws_only_ranks_in_one_to_r(mode, rank):
    sampler = RankSampler(seed=rank)
    draws = {step_rank(mode, sampler, rank) for _ in range(400)}
    assert draws <= set(range(1, rank + 1)), sorted(draws)
    assert step_ranks("multi-rank", sampler, rank) == doubling_ranks(rank)
    assert set(doubling_ranks(rank)) <= set(range(1, rank + 1)) and doubling_ranks(rank)[-1] == rank


@pytest.mark.parametrize("mode, rank, probabilities", [
    ("full", 16, {b: 1 / 16 for b in range(1, 17)}),
    ("log-uniform", 16, log_uniform_probabilities(16)),
    ("log-uniform", 5, log_uniform_probabilities(5)),
    ("nested", 64, {16: 1 / 3, 32: 1 / 3, 64: 1 / 3}),
    ("doubling", 64, {64: 1 / 3, **{b: 1 / 9 for b in (1, 2, 4, 8, 16, 32)}}),
    ("doubling", 6, {6: 1 / 3, 1: 2 / 9, 2: 2 / 9, 4: 2 / 9}),
    ("doubling", 2, {2: 1 / 3, 1: 2 / 3}),
])
def test_each_sampler_draws_as_its_definition_says(mode, rank, probabilities):
    sampler = RankSampler(seed=11)
    draws = [step_rank(mode, sampler, rank) for _ in range(20000)]
    assert chi_square(draws, probabilities) < CHI2_999[len(probabilities) - 1]


def test_log_uniform_gives_each_octave_the_same_share_and_the_chi_square_tells_it_from_uniform():
    sampler = RankSampler(seed=4)
    draws = [sampler.sample_log_uniform(63) for _ in range(24000)]  # octaves 1, 2-3, 4-7, ..., 32-63: six
    octaves = [sum(1 for b in draws if (1 << k) <= b < (2 << k)) for k in range(6)]
    assert all(abs(count - 4000) < 300 for count in octaves), octaves  # 4000 +- 58 (1 sd)
    uniform = [RankSampler(seed=4).sample(16) for _ in range(2000)]  # the test has power: uniform is rejected
    assert chi_square(uniform, log_uniform_probabilities(16)) > CHI2_999[15]


def test_samplers_reject_a_rank_below_one_and_multi_rank_has_no_single_draw():
    with pytest.raises(ValueError, match="rank 0; expected >= 1"):
        RankSampler(0).sample_log_uniform(0)
    with pytest.raises(ValueError, match="doubling_ranks: rank 0"):
        doubling_ranks(0)
    with pytest.raises(ValueError, match="expected step_ranks"):
        step_rank("multi-rank", RankSampler(0), 8)
    assert doubling_ranks(64) == (1, 2, 4, 8, 16, 32, 64) and doubling_ranks(6) == (1, 2, 4, 6)
    assert nested_ranks(64) == (16, 32, 64)


class _CapturingGuard:
    """Stands in for the non-finite guard: keeps the step's gradients and applies nothing."""

    def __init__(self):
        self.grads, self.skip = None, torch.zeros((), dtype=torch.int64)

    def step(self, loss):
        self.grads = [p.grad.clone() for p in self.params]

    def kept(self, value):
        return value


def test_the_multi_rank_step_gradient_is_the_mean_of_the_single_rank_gradients():
    r_max = 6
    model = tiny_lora_model(r_max=r_max, alpha=6.0, model_dropout=0.0)
    with torch.no_grad():  # B != 0, so A's gradient is not zero either
        for layer in hybrid_lora.lora_layers(model):
            layer.lora_b.normal_(0.0, 0.1)
    _, train, _ = rule_domain("plus1", 1, 8, 1, seed=1)
    batch = {k: torch.stack([e[k] for e in train]) for k in train[0]}
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    layers = hybrid_lora.lora_layers(model)
    params = [t for layer in layers for t in (layer.lora_a, layer.lora_b)]

    expected = [torch.zeros_like(p) for p in params]
    for rank in doubling_ranks(r_max):  # (1, 2, 4, 6)
        for layer in layers:
            layer.set_rank(rank)
        for half in halves:
            model.zero_grad(set_to_none=True)
            causal_lm_loss(model_logits(model, half), half["labels"]).backward()
            for total, p in zip(expected, params):
                total += p.grad / (len(halves) * len(doubling_ranks(r_max)))
    for layer in layers:
        layer.set_rank(r_max)
    model.zero_grad(set_to_none=True)

    config = TrainConfig(r_max=r_max, alpha=6.0, lora_dropout=0.0, lambda_order=0.0, lambda_dc=0.0,
                         dylora="multi-rank", rank_schedule=(), device="cpu")
    guard = _CapturingGuard()
    guard.params = params
    stage = trainer._Stage(layers, torch.optim.SGD(params, lr=0.0), RankSampler(0), None, torch.device("cpu"),
                           config, None, guard=guard, loss=lambda m, b: (causal_lm_loss(model_logits(m, b),
                                                                                        b["labels"]), 0))
    trainer._train_step(model, halves, stage, EpochTotals.zeros(torch.device("cpu")))
    for got, want in zip(guard.grads, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert all(layer.rank == r_max for layer in layers)


@pytest.mark.parametrize("mode", ["full", "log-uniform", "nested", "multi-rank", "doubling"])
def test_a_run_stopped_mid_stage_resumes_bit_identical_with_each_sampler(tmp_path, mode):
    """Stopped by an error after step 5 of 12 (its checkpoint written), resumed: the same history and adapters
    as a run never stopped. The sampler's generator travels in the checkpoint; a fresh one would draw again
    the ranks of steps 1.. where steps 6.. were due."""
    config = TrainConfig(r_max=8, alpha=8.0, lora_dropout=0.1, epochs=2, batch_size=2, lr=1e-2, dylora=mode,
                         rank_schedule=(), sweep_ranks=(2, 8), log_every=1, checkpoint_every=1, device="cpu")
    domains = [rule_domain("plus1", 1, 12, 4, seed=1)]

    class Stop(Exception):
        pass

    def stop_after_five(row):
        if row["kind"] == "step" and row["global_step"] == 6:  # step 6's row comes before its checkpoint
            raise Stop

    def run(log=None, folder=None, resume=False):
        model = tiny_lora_model(r_max=8, alpha=8.0, dropout=0.1)
        result = trainer.run_continual(model, domains, config, log=log, checkpoint_dir=folder, resume=resume)
        return result, adapter_tensors(model)

    expected, expected_adapters = run()
    with pytest.raises(Stop):
        run(stop_after_five, tmp_path / "checkpoints")
    resumed, resumed_adapters = run(folder=tmp_path / "checkpoints", resume=True)
    timing = {"seconds", "tokens_per_second"}

    def comparable(result):
        return [{k: v for k, v in row.items() if k not in timing} for row in result["history"]]

    assert comparable(resumed) == comparable(expected)
    assert (resumed["loss"], resumed["rank_sweep"]) == (expected["loss"], expected["rank_sweep"])
    # The run's own rank curve: one per stage, from its sweep and the base model's evaluation.
    assert expected["rank_curve"] == rank_curves(expected) and expected["rank_curve"][0]["ranks"] == [2, 8]
    for got, want in zip(resumed_adapters, expected_adapters):
        assert torch.equal(got, want)
