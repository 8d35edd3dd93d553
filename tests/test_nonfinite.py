"""The non-finite guard: a NaN/inf loss or gradient is found on the device, its update skipped there (the
parameters, AdamW's moments and step count stay as they were), and reported at the next host read."""

import pytest
import torch

import hybrid_lora
from hybrid_lora.train import distributed
from hybrid_lora.train.config import TrainConfig
from hybrid_lora.train.nonfinite import NonFiniteError, NonFiniteGuard
from hybrid_lora.train.trainer import run_continual


def params_and_optimizer(fused, device="cpu"):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, device=device)), torch.nn.Parameter(torch.randn(3, device=device))]
    return params, torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, fused=fused)


def set_grads(params, bad=None):
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 0.5) * (i + 1)
    if bad is not None:
        params[0].grad[1, 2] = bad


def snapshot(params, optimizer):
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params if p in optimizer.state])


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert len(a[1]) == len(b[1])
    for x, y in zip(a[1], b[1]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("fused", [True, None], ids=["fused", "any-optimizer"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "loss"])
def test_a_non_finite_step_changes_nothing_and_a_finite_one_is_adamw(fused, bad):
    params, optimizer = params_and_optimizer(fused)
    guard = NonFiniteGuard(optimizer, torch.device("cpu"), "skip")
    plain_params, plain = params_and_optimizer(fused)
    for step in range(3):  # a good step, a bad one, a good one
        is_bad = step == 1
        set_grads(params, bad if is_bad and bad != "loss" else None)
        loss = torch.tensor(float("nan") if is_bad and bad == "loss" else 1.0)
        before = snapshot(params, optimizer)
        skip = guard.step(loss)
        optimizer.zero_grad()
        assert float(skip) == float(is_bad)
        if is_bad:
            assert_same(snapshot(params, optimizer), before)
        else:
            set_grads(plain_params)
            plain.step()
            plain.zero_grad()
            # The same update as the optimizer alone, step count included (a skipped step is not counted).
            assert_same(snapshot(params, optimizer), snapshot(plain_params, plain))
    assert guard.poll(0, "a", 0, 0, 0.1) == 1


@pytest.mark.parametrize("fused", [True, None], ids=["fused", "any-optimizer"])
def test_a_first_step_that_is_not_finite_leaves_a_fresh_optimizer(fused):
    params, optimizer = params_and_optimizer(fused)
    guard = NonFiniteGuard(optimizer, torch.device("cpu"), "skip")
    before = [p.detach().clone() for p in params]
    set_grads(params, float("nan"))
    guard.step(torch.tensor(1.0))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    for p in params:
        state = optimizer.state.get(p, {})
        assert all(not v.any() for v in state.values())  # zeros, as before any step: no NaN moments


def test_stop_skips_every_step_from_the_first_bad_one_and_names_it():
    params, optimizer = params_and_optimizer(True)
    guard = NonFiniteGuard(optimizer, torch.device("cpu"), "stop", global_step=10)
    set_grads(params)
    guard.step(torch.tensor(1.0))
    assert guard.poll(1, "embedded-b", 2, 10, 1e9) == 0  # finite so far: no error
    after_good = snapshot(params, optimizer)
    set_grads(params, float("inf"))
    guard.step(torch.tensor(1.0))
    set_grads(params)
    assert float(guard.step(torch.tensor(1.0))) == 1.0  # finite, yet skipped: the run is stopping
    assert_same(snapshot(params, optimizer), after_good)
    with pytest.raises(NonFiniteError, match=r"stage 2 \(embedded-b\), epoch 3, step 2 \(global step 12\): a "
                                             r"gradient is NaN or infinite; .*try a lower --lr \(now 1e\+09\)"):
        guard.poll(1, "embedded-b", 2, 10, 1e9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations are a CUDA notion")
def test_the_guarded_step_does_not_synchronise_with_the_host():
    params, optimizer = params_and_optimizer(True, device="cuda")
    guard = NonFiniteGuard(optimizer, torch.device("cuda"), "stop")
    set_grads(params)
    loss = torch.tensor(1.0, device="cuda")
    guard.step(loss)  # the first step creates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for bad in (None, float("nan"), None):
            set_grads(params, bad)
            guard.step(loss)
            guard.kept(loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(NonFiniteError, match="step 2"):
        guard.poll(0, "a", 0, 0, 0.1)


def tiny_run(monkeypatch, policy, bad_call, checkpoint_dir=None):
    """A one-stage run whose loss is NaN at the `bad_call`-th training loss; returns (result or error, the
    adapters as they stood when that loss was computed, the adapters at the end)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=16,
                                       bos_token_id=0, eos_token_id=0))
    layers = hybrid_lora.inject_lora(model, r_max=4, alpha=4.0)
    ids = torch.randint(0, 16, (16, 8), generator=torch.Generator().manual_seed(1))
    examples = [{"input_ids": r, "attention_mask": torch.ones(8, dtype=torch.long), "labels": r} for r in ids]
    calls, seen = [0], {}
    real_loss = distributed.causal_lm_loss  # the training loss of one process

    def loss(logits, labels):
        calls[0] += 1
        value = real_loss(logits, labels)
        if bad_call in (calls[0], "every") and model.training:
            seen["adapters"] = [t.detach().clone() for layer in layers for t in (layer.lora_a, layer.lora_b)]
            return value * float("nan")
        return value

    monkeypatch.setattr(distributed, "causal_lm_loss", loss)
    config = TrainConfig(r_max=4, alpha=4.0, epochs=2, batch_size=4, rank_schedule=(), sweep_ranks=(), log_every=1,
                         lr=1e-2, device="cpu", on_nonfinite=policy)
    try:
        outcome = run_continual(model, [("random", examples, examples[:4])], config, checkpoint_dir=checkpoint_dir)
    except NonFiniteError as err:
        outcome = err
    end = [t.detach().clone() for layer in layers for t in (layer.lora_a, layer.lora_b)]
    return outcome, seen["adapters"], end


def test_the_run_stops_at_the_logging_interval_with_the_adapters_of_the_last_good_step(monkeypatch, tmp_path):
    error, at_bad_step, end = tiny_run(monkeypatch, "stop", bad_call=3, checkpoint_dir=tmp_path)
    assert isinstance(error, NonFiniteError)
    assert "stage 1 (random), epoch 1, step 3 (global step 3): the loss is NaN" in str(error)
    assert all(torch.equal(a, b) for a, b in zip(end, at_bad_step))
    assert not (tmp_path / "checkpoint.safetensors").exists()  # none was due yet; none was written


def test_skip_leaves_the_step_out_and_trains_on(monkeypatch):
    result, _, end = tiny_run(monkeypatch, "skip", bad_call=3)
    epochs = [row for row in result["history"] if row["kind"] == "epoch"]
    steps = [row for row in result["history"] if row["kind"] == "step"]
    assert [row["skipped_steps"] for row in epochs] == [1, 0]
    assert [row["skipped_steps"] for row in steps] == [0, 0, 1, 0, 0, 0, 0, 0]
    assert all(torch.isfinite(t).all() for t in end)
    assert all(row["train_loss"] == row["train_loss"] for row in steps if row["skipped_steps"] == 0)
    assert steps[2]["train_loss"] != steps[2]["train_loss"]  # the interval of the skipped step alone: NaN
    assert all(row["train_loss"] > 0 for row in epochs)  # averaged over the applied steps


def test_skip_still_stops_when_every_step_of_an_epoch_is_skipped(monkeypatch):
    error, _, _ = tiny_run(monkeypatch, "skip", bad_call="every")
    assert isinstance(error, NonFiniteError)
    assert "every one of the 4 steps of stage 1 (random), epoch 1 had a NaN or infinite loss" in str(error)


def test_every_process_of_a_group_skips_the_step_another_found_non_finite():
    """`reduce` stands for the all-reduce over the processes: here the other process had a NaN loss."""
    params, optimizer = params_and_optimizer(True)
    other = {"found": torch.tensor(0.0)}
    guard = NonFiniteGuard(optimizer, torch.device("cpu"), "skip", reduce=lambda t: t + other["found"])
    set_grads(params)
    guard.step(torch.tensor(1.0))  # a step every process applies
    before = snapshot(params, optimizer)
    other["found"] = torch.tensor(1.0)
    assert float(guard.step(torch.tensor(1.0))) == 1.0  # finite here, non-finite there: skipped here too
    assert_same(snapshot(params, optimizer), before)
    other["found"] = torch.tensor(0.0)
    assert float(guard.step(torch.tensor(1.0))) == 0.0
