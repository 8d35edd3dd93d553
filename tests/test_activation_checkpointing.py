"""LoRA dropout under activation checkpointing: the recomputed forward draws the forward's masks.

The layer draws each call's dropout seed from torch's generator on the input's
device, which ``torch.utils.checkpoint`` restores before it recomputes. So with
LoRA dropout on, the gradients with checkpointing (reentrant or not, through
transformers' ``gradient_checkpointing_enable`` or called directly) equal the
gradients without it at the same torch seed, on GPT-2 (Conv1D) and Llama
(``nn.Linear``), on both backend paths, eager and compiled. The models' own
dropouts are off so that every random mask is LoRA's.
"""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import hybrid_lora
from hybrid_lora.io.models import enable_activation_checkpointing
from hybrid_lora.nn.layer import LoRALinear, lora_layers

VOCAB, LENGTH, R, DROPOUT = 16, 8, 4, 0.3
KINDS = ("reentrant", "non-reentrant")


@pytest.fixture(params=["triton", "torch"])
def backend_path(request, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", request.param)
    return request.param


def tiny_model(arch, targets="all-linear"):
    """A 1-block model of `arch` with LoRA (dropout 0.3) on `targets` and B != 0, in train mode."""
    torch.manual_seed(0)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=LENGTH, vocab_size=VOCAB,
                                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0, use_cache=False))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=LENGTH, bos_token_id=0, eos_token_id=0,
                                             use_cache=False))
    layers = hybrid_lora.inject_lora(model, targets, r_max=R, alpha=8.0, dropout=DROPOUT)
    with torch.no_grad():
        for layer in layers:  # B = 0 would give A no gradient
            layer.lora_b.normal_(0.0, 0.5)
    return model.train()


def checkpointed(model, kind):
    """`model` with transformers' activation checkpointing of each block, of `kind`."""
    kwargs = {"use_reentrant": kind == "reentrant"}
    if hasattr(model, "activation_checkpointing_enable"):  # gradient_checkpointing_enable's newer name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


IDS = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))


def adapter_grads(model, forward=None, seed=3):
    """The adapters' gradients of one forward and backward with torch seeded by `seed`."""
    torch.manual_seed(seed)
    logits = (model if forward is None else forward)(input_ids=IDS).logits
    (logits.float() ** 2).mean().backward()
    grads = [p.grad.clone() for layer in lora_layers(model) for p in (layer.lora_a, layer.lora_b)]
    model.zero_grad(set_to_none=True)
    return grads


def assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_blocks_give_the_gradients_of_the_plain_model(backend_path, arch, kind):
    want = adapter_grads(tiny_model(arch))
    model = checkpointed(tiny_model(arch), kind)
    assert_same(adapter_grads(model), want)
    if backend_path == "torch":  # the masks are random: another seed, other gradients (dropout is on)
        assert not torch.allclose(adapter_grads(model, seed=4)[0], want[0], atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_checkpoint_of_a_layer_called_twice_recomputes_both_masks(backend_path, kind):
    torch.manual_seed(0)
    layer = LoRALinear(torch.randn(12, 20), torch.randn(12), r_max=R, dropout=DROPOUT)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(6, 20, requires_grad=True)

    def twice(t):  # two calls, two masks
        return layer(t) * layer(t)

    grads = []
    for wrap in (lambda f, t: f(t), lambda f, t: checkpoint(f, t, use_reentrant=kind == "reentrant")):
        torch.manual_seed(5)
        wrap(twice, x).square().sum().backward()
        grads.append([t.grad.clone() for t in (x, layer.lora_a, layer.lora_b)])
        x.grad = layer.lora_a.grad = layer.lora_b.grad = None
    assert_same(grads[1], grads[0])
    torch.manual_seed(5)
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_checkpointed_model_gives_the_eager_gradients(backend_path, kind):
    torch._dynamo.reset()
    want = adapter_grads(tiny_model("gpt2", ("c_attn",)))  # one adapted layer: a small graph to trace
    model = checkpointed(tiny_model("gpt2", ("c_attn",)), kind)
    # transformers' hook making the embeddings' output require a gradient cannot join a full graph.
    model.disable_input_require_grads()
    # aot_eager draws from torch's generator as eager does; Inductor would draw from its own.
    forward = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_same(adapter_grads(model, forward), want)
    torch._dynamo.reset()


def test_a_model_without_checkpointing_is_refused_by_name():
    from hybrid_lora.errors import BadValue

    with pytest.raises(BadValue, match="gradient checkpointing: Linear does not support it"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_enabling_checkpoints_every_block_without_reentrance():
    model = enable_activation_checkpointing(tiny_model("gpt2"))
    blocks = model.transformer.h
    assert all(block.gradient_checkpointing for block in blocks)
    assert blocks[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    assert not getattr(model, "_require_grads_hooks", None)


def test_train_with_gradient_checkpointing_ends_where_training_without_it_ends(tmp_path, monkeypatch):
    """`hybrid-lora train --gradient-checkpointing`: the same run, every block checkpointed, to the same figures."""
    import json

    from hybrid_lora.cli import main
    from hybrid_lora.train import trainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    enabled = []
    monkeypatch.setattr(trainer, "enable_activation_checkpointing",
                        lambda model: enabled.append(model) or enable_activation_checkpointing(model))
    tiny = ["train", "--train-examples", "16", "--eval-examples", "8", "--epochs", "1", "--r-max", "8",
            "--lora-dropout", "0.3", "--log-every", "1", "--sweep-ranks", "--no-plots", "--device", "cpu"]
    assert main([*tiny, "--out", str(tmp_path / "plain")]) == 0
    assert not enabled
    assert main([*tiny, "--gradient-checkpointing", "--out", str(tmp_path / "checkpointed")]) == 0
    assert len(enabled) == 2  # each stage's training
    plain, checkpointed = (json.loads((tmp_path / name / "seed-42" / "metrics.json").read_text())
                           for name in ("plain", "checkpointed"))
    assert checkpointed["config"]["gradient_checkpointing"] and not plain["config"]["gradient_checkpointing"]
    steps = [[row["train_loss"] for row in run["history"] if row["kind"] == "step"] for run in (plain, checkpointed)]
    assert len(steps[0]) == 4
    assert steps[1] == pytest.approx(steps[0], rel=1e-6)
    assert sum(checkpointed["loss"], []) == pytest.approx(sum(plain["loss"], []), rel=1e-6)
