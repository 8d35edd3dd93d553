"""The continual training engine on a tiny GPT-2 and two toy domains that conflict.

Domain "plus1" continues a sequence by +1 (mod V), domain "plus5" by +5, over
the same tokens: learning the second overwrites the first, so forgetting is
measurable in seconds. Everything runs the PyTorch path except one test that
runs the Triton kernels (under the interpreter on a CPU).
"""

import copy
import dataclasses
import json

import pytest
import torch
from helpers import tiny_gpt2

import hybrid_lora
from hybrid_lora.train import dynamic_rank, trainer
from hybrid_lora.train.config import VARIANTS, TrainConfig, load_model, resolved_dtype, variant_config
from hybrid_lora.train.metrics import causal_lm_loss, model_logits
from hybrid_lora.train.regularizers import DC_MODES, order_penalty, snapshot_adapters
from hybrid_lora.train.trainer import run_continual

VOCAB, LENGTH, WIDTH, LAYERS = 16, 12, 32, 1


def gpt2(seed=0, dropout=0.1):
    """The trainer's tiny GPT-2; dropout: its own, active whenever the model trains."""
    return tiny_gpt2(seed, layers=LAYERS, width=WIDTH, vocab=VOCAB, positions=LENGTH, dropout=dropout)


def tiny_lora_model(r_max=8, seed=0, model_dropout=0.1, **lora):
    model = gpt2(seed, model_dropout)
    hybrid_lora.inject_lora(model, r_max=r_max, **lora)
    return model


def rule_domain(name, step, n_train, n_eval, seed):
    """(name, train, eval) of sequences x_{t+1} = x_t + step (mod V), right-padded to random lengths."""
    generator = torch.Generator().manual_seed(seed)

    def examples(n):
        ids = (torch.randint(0, VOCAB, (n, 1), generator=generator) + step * torch.arange(LENGTH)) % VOCAB
        lengths = torch.randint(LENGTH // 2, LENGTH + 1, (n,), generator=generator)
        mask = (torch.arange(LENGTH) < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]

    return name, examples(n_train), examples(n_eval)


def epoch_rows(result):
    return [row for row in result["history"] if row["kind"] == "epoch"]


def adapter_tensors(model):
    return [t.detach().clone() for layer in hybrid_lora.lora_layers(model) for t in (layer.lora_a, layer.lora_b)]


@pytest.mark.parametrize("field, value, message", [
    ("r_max", 0, "r_max=0; expected an integer >= 1"),
    ("epochs", 1.5, "epochs=1.5; expected an integer >= 1"),
    ("lr", float("nan"), "lr=nan; expected a finite number > 0"),
    ("lambda_dc", -0.1, "lambda_dc=-0.1; expected a finite number >= 0"),
    ("lora_dropout", 1.0, r"lora_dropout=1.0; expected a probability in \[0, 1\)"),
    ("dylora", "sometimes", "dylora='sometimes'; expected one of"),
    ("dtype", "float16", "dtype='float16'; expected one of"),
    ("dc_mode", "cosine", "dc_mode='cosine'; expected one of"),
    ("grad_accum", 0, "grad_accum=0; expected an integer >= 1"),
    ("checkpoint_every", -1, "checkpoint_every=-1; expected an integer >= 0"),
    ("rank_schedule", (64, 128, 16), r"rank 128 is outside \[1, 64\]"),
    ("sweep_ranks", (0,), r"rank 0 is outside \[1, 64\]"),
])
def test_config_names_the_bad_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_defaults_are_the_measured_method_the_original_is_a_preset_and_variants_switch_the_two_methods():
    config = TrainConfig()
    assert (config.model_name, config.r_max, config.alpha, config.lora_dropout) == ("gpt2", 64, 32.0, 0.05)
    assert (config.batch_size, config.epochs, config.lr, config.weight_decay) == (8, 3, 5e-5, 0.01)
    assert (config.lambda_order, config.lambda_dc, config.rank_schedule) == (1e-4, 0.3, (64, 32, 16))
    assert (config.seed, config.dylora, config.scale_rule) == (42, "nested", "rslora")
    assert TrainConfig(model_name="embedded").lr == 1e-3  # the embedded base's own rate
    assert TrainConfig(model_name="embedded", lr=2e-4).lr == 2e-4
    original = variant_config("hybrid", preset="original", model_name="embedded")
    assert (original.dylora, original.scale_rule, original.lr, original.r_max) == ("frozen", "alpha/r", 5e-5, 64)
    assert (original.lambda_order, original.lambda_dc) == (1e-4, 0.1)
    assert variant_config("lora_only", preset="original").dylora == "off"  # the variant sits over the preset
    assert variant_config("hybrid", preset="original", dylora="full").dylora == "full"  # a given field wins
    with pytest.raises(ValueError, match="unknown preset 'paper'"):
        variant_config("hybrid", preset="paper")
    lora_only, dc_only = variant_config("lora_only"), variant_config("dc_only")
    assert (lora_only.lambda_order, lora_only.lambda_dc, lora_only.dylora, lora_only.rank_schedule) == (0, 0, "off", ())
    assert (dc_only.lambda_order, dc_only.lambda_dc, dc_only.dylora) == (0, 0.3, "off")
    assert variant_config("dy_only").lambda_dc == 0 and variant_config("dy_only").rank_schedule == (64, 32, 16)
    assert variant_config("hybrid", lr=1e-3).lr == 1e-3
    assert set(VARIANTS) == {"lora_only", "dy_only", "dc_only", "hybrid", "l2", "ewc", "replay"}
    with pytest.raises(ValueError, match="unknown variant 'dylora'"):
        variant_config("dylora")
    with pytest.raises(ValueError, match="scale_rule='sqrt'; expected one of"):
        TrainConfig(scale_rule="sqrt")


@pytest.mark.slow
def test_two_domains_with_every_method_on(torch_path, monkeypatch):
    cuts = []

    def recording_truncate(layers, rank, optimizer=None, reset_state=False):
        cuts.append((rank, optimizer, reset_state))
        return dynamic_rank.truncate_adapters(layers, rank, optimizer, reset_state)

    monkeypatch.setattr(trainer, "truncate_adapters", recording_truncate)
    model = tiny_lora_model(r_max=8, alpha=8.0, dropout=0.05)
    config = variant_config("hybrid", r_max=8, alpha=8.0, epochs=2, rank_schedule=(8, 4), dylora="full", lr=3e-2,
                            sweep_ranks=(2, 8), log_every=2)
    domains = [rule_domain("plus1", 1, 16, 8, seed=1), rule_domain("plus5", 5, 16, 8, seed=2)]
    logged = []
    result = run_continual(model, domains, config, log=logged.append)

    assert logged == [row for row in result["history"] if row["kind"] in ("step", "epoch")]
    epochs = [row for row in result["history"] if row["kind"] == "epoch"]
    steps = [row for row in result["history"] if row["kind"] == "step"]
    # The trainable-parameter count at each stage start and after the cut: r * (in + out) per layer.
    ranks = [(r["stage"], r["epoch"], r["previous_rank"], r["rank"], r["trainable_params"])
             for r in result["history"] if r["kind"] == "rank"]
    assert ranks == [(0, 0, 8, 8, LAYERS * 8 * 4 * WIDTH), (1, 0, 8, 8, LAYERS * 8 * 4 * WIDTH),
                     (1, 1, 8, 4, LAYERS * 4 * 4 * WIDTH)]
    assert [(r["stage"], r["epoch"], r["rank"]) for r in epochs] == [(0, 0, 8), (0, 1, 8), (1, 0, 8), (1, 1, 4)]
    assert [r["trainable_params"] for r in epochs] == [LAYERS * r * (WIDTH + 3 * WIDTH) for r in (8, 8, 8, 4)]
    assert len(steps) == 4 and all(r["step"] == 2 for r in steps)  # 16 examples / 8 = 2 steps per epoch
    assert all(r["order_penalty"] > 0 for r in epochs)  # in the first stage too
    assert [r["domain_correlation"] is None for r in epochs] == [True, True, False, False]
    assert all(0 < r["domain_correlation"] < 2 for r in epochs[2:])
    assert all(r["tokens"] > 0 and r["seconds"] > 0 for r in epochs)

    # One cut, at the start of stage 1's second epoch, carrying that stage's optimizer.
    assert len(cuts) == 1 and cuts[0][0] == 4 and cuts[0][2] is False
    assert isinstance(cuts[0][1], torch.optim.AdamW)
    assert all(layer.r_max == 4 for layer in hybrid_lora.lora_layers(model))

    assert result["domains"] == ["plus1", "plus5"]
    assert len(result["initial"]) == 2
    assert len(result["accuracy"]) == 2 and all(len(row) == 2 for row in result["accuracy"])
    assert result["accuracy"][0][0] == epochs[1]["eval_accuracy"]
    assert result["retention"] == [result["accuracy"][1][0] / result["accuracy"][0][0]]
    assert result["loss_change"] == [result["loss"][1][0] - result["loss"][0][0]]
    sweep = {s["stage"]: s["by_rank"] for s in result["rank_sweep"]}
    assert set(sweep[0]) == {2, 8} and set(sweep[1]) == {2}  # rank 8 no longer exists after the cut
    assert sweep[0][8]["loss"] == result["loss"][0][0]
    json.dumps(result)


@pytest.mark.slow
def test_learning_then_forgetting_is_measured_right_after_each_stage(torch_path):
    config = variant_config("lora_only", r_max=8, alpha=8.0, epochs=2, lr=5e-2, lora_dropout=0.0, log_every=0)
    plus1, plus5 = rule_domain("plus1", 1, 32, 16, seed=1), rule_domain("plus5", 5, 32, 16, seed=2)
    both = run_continual(tiny_lora_model(alpha=8.0), [plus1, plus5], config)
    first_only = run_continual(tiny_lora_model(alpha=8.0), [plus1], config)

    # Domain A's "after its stage" figures are taken before the second stage runs.
    assert both["loss"][0][0] == pytest.approx(first_only["loss"][0][0], rel=1e-6)
    assert both["accuracy"][0][0] == first_only["accuracy"][0][0]
    assert both["loss"][0][0] < both["initial"][0]["loss"] - 0.1  # stage 0 learned plus1
    assert both["loss"][1][1] < both["initial"][1]["loss"] - 0.1  # stage 1 learned plus5
    assert both["loss_change"][0] > 0.05  # and forgot some of plus1
    assert both["retention"][0] < 0.8


def reference_run(model, domains, config):
    """The objective of every stage written out in a plain loop: one batch per epoch, fixed rank, no dropout."""
    layers = hybrid_lora.lora_layers(model)
    snapshot = None
    for _, train, _ in domains:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        batch = torch.utils.data.default_collate(train)
        for _ in range(config.epochs):
            loss = causal_lm_loss(model_logits(model, batch), batch["labels"])
            loss = loss + config.lambda_order * order_penalty(layers)
            if snapshot is not None:
                loss = loss + config.lambda_dc * DC_MODES[config.dc_mode](layers, snapshot)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        snapshot = snapshot_adapters(layers)


@pytest.mark.parametrize("dc_mode", ["delta", "weights"])
def test_each_stage_minimises_ce_plus_ordering_plus_domain_correlation(torch_path, dc_mode):
    config = TrainConfig(r_max=4, alpha=4.0, lora_dropout=0.0, batch_size=8, epochs=3, lr=1e-2, weight_decay=0.01,
                         lambda_order=0.5, lambda_dc=5.0, dc_mode=dc_mode, dylora="off", rank_schedule=(),
                         sweep_ranks=(), log_every=0)
    model = tiny_lora_model(r_max=4, alpha=4.0, model_dropout=0.0)
    with torch.no_grad():  # a non-zero B, so that the ordering penalty pulls from the first step
        for layer in hybrid_lora.lora_layers(model):
            layer.lora_b.normal_(0.0, 0.05)
    expected = copy.deepcopy(model)
    domains = [rule_domain("plus1", 1, 8, 4, seed=1), rule_domain("plus5", 5, 8, 4, seed=2)]
    run_continual(model, domains, config)
    reference_run(expected, domains, config)
    for got, want in zip(adapter_tensors(model), adapter_tensors(expected)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode, moved_rows", [("frozen", [2]), ("full", [0, 1, 2])])
def test_dylora_first_step_trains_the_components_its_mode_says(torch_path, monkeypatch, mode, moved_rows):
    monkeypatch.setattr(dynamic_rank.RankSampler, "sample", lambda self, rank: 3)
    model = tiny_lora_model(r_max=6, alpha=6.0)  # B = 0, so the first step moves B only
    config = TrainConfig(r_max=6, alpha=6.0, lora_dropout=0.0, epochs=1, lr=1e-2, weight_decay=0.0,
                         lambda_order=0.0, lambda_dc=0.0, dylora=mode, rank_schedule=(), log_every=0)
    before = adapter_tensors(model)
    run_continual(model, [rule_domain("plus1", 1, 8, 4, seed=1)], config)
    for layer, a_before in zip(hybrid_lora.lora_layers(model), before[::2]):
        assert torch.equal(layer.lora_a.detach(), a_before)
        moved = [i for i in range(6) if layer.lora_b[i].abs().max() > 0]
        assert moved == moved_rows
        assert layer.rank == 6  # the sampled rank is for the step only


@pytest.mark.slow
def test_triton_kernels_train_like_the_pytorch_path(monkeypatch):
    from hybrid_lora.ops import backend
    from hybrid_lora.ops.backend import select_backend

    monkeypatch.delenv("HYBRID_LORA_BACKEND", raising=False)
    if select_backend(torch.device("cpu")) != "triton":
        pytest.skip("Triton cannot run here: no triton, or TRITON_INTERPRET is not set on a CPU-only machine")
    config = TrainConfig(r_max=4, alpha=4.0, lora_dropout=0.0, epochs=1, eval_batch_size=4, lr=1e-2,
                         lambda_order=1e-2, dylora="off", rank_schedule=(), sweep_ranks=(), log_every=0, device="cpu")
    domain = rule_domain("plus1", 1, 8, 4, seed=1)
    kernels = tiny_lora_model(r_max=4, alpha=4.0, model_dropout=0.0)
    with torch.no_grad():  # B = 0 would hide the adapter from the first forward
        for layer in hybrid_lora.lora_layers(kernels):
            layer.lora_b.normal_(0.0, 0.5)
    plain = copy.deepcopy(kernels)
    with_kernels = run_continual(kernels, [domain], config)
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    backend.refresh()
    with_torch = run_continual(plain, [domain], config)
    # fp32 both ways, reductions of at most 32 terms: agreement to a few ulps.
    assert with_kernels["initial"][0]["loss"] == pytest.approx(with_torch["initial"][0]["loss"], rel=1e-6)
    assert epoch_rows(with_kernels)[0]["train_loss"] == pytest.approx(epoch_rows(with_torch)[0]["train_loss"], rel=1e-6)
    assert with_kernels["loss"][0][0] == pytest.approx(with_torch["loss"][0][0], rel=1e-6)
    for got, want in zip(adapter_tensors(kernels), adapter_tensors(plain)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bfloat16_autocast_trains_fp32_adapters_close_to_float32(torch_path):
    domain = rule_domain("plus1", 1, 8, 4, seed=1)
    rows, adapters = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_lora_model(r_max=4, alpha=4.0, model_dropout=0.0)
        config = TrainConfig(r_max=4, alpha=4.0, lora_dropout=0.0, epochs=1, lr=1e-2, dtype=dtype, rank_schedule=(),
                             log_every=0, device="cpu")
        rows[dtype] = epoch_rows(run_continual(model, [domain], config))[0]
        adapters[dtype] = adapter_tensors(model)
    assert all(t.dtype == torch.float32 for t in adapters["bfloat16"])
    # bf16 keeps 8 mantissa bits: the losses differ (autocast ran), by far less than the loss itself.
    for key in ("train_loss", "eval_loss"):
        assert rows["bfloat16"][key] != rows["float32"][key]
        assert rows["bfloat16"][key] == pytest.approx(rows["float32"][key], rel=1e-3)


def test_load_model_puts_adapters_on_a_local_checkpoint(tmp_path):
    gpt2().save_pretrained(tmp_path)
    model = load_model(TrainConfig(model_name=str(tmp_path), r_max=4, alpha=8.0, device="cpu"))
    layers = hybrid_lora.lora_layers(model)
    # the default rule is rsLoRA's alpha / sqrt(r): 8 / 2
    assert len(layers) == LAYERS and all(layer.r_max == 4 and layer.scale == 4.0 for layer in layers)
    assert all(layer.scale_rule == "rslora" for layer in layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == LAYERS * 4 * (WIDTH + 3 * WIDTH)
    assert next(model.parameters()).device == torch.device("cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # "auto" is float32 on a CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 base weights are for CUDA only; no CUDA here")
def test_load_model_on_cuda_stores_adapted_weights_in_bf16_and_adapters_in_fp32(tmp_path):
    gpt2().save_pretrained(tmp_path)
    config = TrainConfig(model_name=str(tmp_path), r_max=4, alpha=8.0)
    assert resolved_dtype(config, torch.device("cuda")) == "bfloat16"
    model = load_model(config)
    for layer in hybrid_lora.lora_layers(model):
        assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16
        assert layer.lora_a.dtype == layer.lora_b.dtype == torch.float32 and layer.lora_a.is_cuda
    assert model.transformer.wte.weight.dtype == torch.float32
    result = run_continual(model, [rule_domain("plus1", 1, 8, 4, seed=1)],
                           dataclasses.replace(config, epochs=1, rank_schedule=(), sweep_ranks=(), log_every=0))
    assert result["loss"][0][0] < result["initial"][0]["loss"]


def test_gradient_accumulation_of_equal_length_micro_batches_equals_one_large_batch(torch_path):
    # Without padding every micro-batch has as many targets, so the mean of their means is the large batch's mean.
    name, train, evaluation = rule_domain("plus1", 1, 16, 4, seed=1)
    train = [{**example, "attention_mask": torch.ones(LENGTH, dtype=torch.long),
              "labels": example["input_ids"]} for example in train]
    adapters, results = [], []
    for batch_size, grad_accum in ((8, 1), (4, 2), (2, 4)):
        model = tiny_lora_model(r_max=4, alpha=4.0, model_dropout=0.0)
        config = TrainConfig(r_max=4, alpha=4.0, lora_dropout=0.0, batch_size=batch_size, grad_accum=grad_accum,
                             epochs=2, lr=1e-2, lambda_order=0.1, dylora="off", rank_schedule=(), sweep_ranks=(),
                             log_every=1, device="cpu")
        results.append(run_continual(model, [(name, train, evaluation)], config))
        adapters.append(adapter_tensors(model))
    for other, result in zip(adapters[1:], results[1:]):
        assert [r["global_step"] for r in result["history"] if r["kind"] == "step"] == [1, 2, 3, 4]
        for got, want in zip(other, adapters[0]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert adapters[0][1].abs().max() > 0.01  # B moved: the comparison is about real steps


def test_run_continual_names_what_is_wrong(torch_path):
    config = TrainConfig(r_max=4, rank_schedule=(), log_every=0)
    domain = rule_domain("plus1", 1, 8, 4, seed=1)
    with pytest.raises(ValueError, match="device 'gpu0': expected auto, cpu, cuda or cuda:N"):
        run_continual(tiny_lora_model(r_max=4), [domain], TrainConfig(r_max=4, rank_schedule=(), device="gpu0"))
    with pytest.raises(ValueError, match="no domains given"):
        run_continual(tiny_lora_model(r_max=4), [], config)
    with pytest.raises(ValueError, match="holds no LoRA layer"):
        run_continual(gpt2(), [domain], config)
    with pytest.raises(ValueError, match=r"width \[8\]; expected config.r_max=4"):
        run_continual(tiny_lora_model(r_max=8), [domain], config)
    with pytest.raises(ValueError, match=r"expected a \(name, train_examples, eval_examples\) triple"):
        run_continual(tiny_lora_model(r_max=4), [domain[:2]], config)
    with pytest.raises(ValueError, match="'empty': the train set is empty"):
        run_continual(tiny_lora_model(r_max=4), [("empty", [], domain[2])], config)


def test_progress_bar_shows_loss_and_rank_at_logging_intervals_only_and_can_be_turned_off(torch_path, monkeypatch):
    bars = []

    class RecordingBar:
        def __init__(self, total, initial, disable, **kwargs):
            self.total, self.disable, self.updates, self.postfixes = total, disable, 0, []
            bars.append(self)

        def update(self):
            self.updates += 1

        def set_postfix(self, **values):
            self.postfixes.append(values)

        def close(self):
            pass

    monkeypatch.setattr(trainer, "tqdm", RecordingBar)
    domain = rule_domain("plus1", 1, 16, 4, seed=1)  # 16 examples / 4 = 4 steps per epoch
    for progress in (True, False):
        config = TrainConfig(r_max=4, alpha=4.0, batch_size=4, epochs=1, rank_schedule=(), sweep_ranks=(),
                             log_every=2, progress=progress, device="cpu")
        run_continual(tiny_lora_model(r_max=4, alpha=4.0), [domain], config)
    shown, hidden = bars
    assert shown.disable is None and hidden.disable is True  # None: tqdm shows the bar on a terminal only
    assert shown.total == shown.updates == 4
    # The rank at the start, then loss and rank after steps 2 and 4: the loss is read back every log_every steps.
    assert [sorted(p) for p in shown.postfixes] == [["rank"], ["loss", "rank"], ["loss", "rank"]]
    assert all(p["rank"] == 4 for p in shown.postfixes)


def test_nested_mode_steps_run_at_r_r_half_r_quarter_and_train_all_their_components(torch_path, monkeypatch):
    steps, frozen = [], []
    real_active_rank = trainer.active_rank

    def recording_active_rank(layers, rank):
        steps.append((layers[0].rank, rank))
        return real_active_rank(layers, rank)

    monkeypatch.setattr(trainer, "active_rank", recording_active_rank)
    monkeypatch.setattr(trainer, "freeze_leading_grads", lambda *a: frozen.append(a))
    model = tiny_lora_model(r_max=8, alpha=8.0, scale_rule="fixed")
    config = variant_config("hybrid", r_max=8, alpha=8.0, epochs=2, rank_schedule=(8, 4), dylora="nested", lr=3e-2,
                            scale_rule="fixed", sweep_ranks=(), log_every=0)
    domains = [rule_domain("plus1", 1, 48, 8, seed=1), rule_domain("plus5", 5, 48, 8, seed=2)]
    run_continual(model, domains, config)
    train_steps = steps  # evaluation goes through active_rank only for the rank sweep, off here
    assert len(train_steps) == 2 * 2 * 6
    for current, drawn in train_steps:
        assert drawn in {current, current // 2, current // 4}
    assert {d for c, d in train_steps if c == 8} == {2, 4, 8} and {d for c, d in train_steps if c == 4} <= {1, 2, 4}
    assert not frozen  # nested mode freezes no component


def test_l2_variant_pulls_the_second_stage_toward_the_first_adapter(torch_path):
    from hybrid_lora.train.regularizers import l2_to_previous

    domains = [rule_domain("plus1", 1, 32, 8, seed=1), rule_domain("plus5", 5, 32, 8, seed=2)]
    distances = {}
    for lam in (0.0, 100.0):
        model = tiny_lora_model(r_max=4, alpha=4.0, model_dropout=0.0)
        config = variant_config("l2", r_max=4, alpha=4.0, epochs=2, lr=3e-2, lora_dropout=0.0, lambda_l2=lam,
                                sweep_ranks=(), log_every=0)
        layers = hybrid_lora.lora_layers(model)
        first = run_continual(model, domains[:1], config)
        snapshot = snapshot_adapters(layers)
        trainer.train_stage(model, domains[1], config, stage=0, snapshot=snapshot)
        distances[lam] = float(l2_to_previous(layers, snapshot))
        assert first["accuracy"][0][0] > 0
    assert distances[100.0] < 0.5 * distances[0.0]
    assert variant_config("l2").lambda_l2 == 1.0 and variant_config("hybrid").lambda_l2 == 0.0
