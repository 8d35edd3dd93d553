"""``hybrid_lora.accelerate`` on peft QLoRA models (a tiny Llama loaded in 4 bits): peft's logits, gradients, runs."""

import copy
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (extra qlora)")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from qlora_models import VOCAB, load_4bit, save_tiny_llama, token_batch  # noqa: E402
from test_accelerate import live_adapters, logits_and_grads  # noqa: E402
from test_peft_parity import assert_close_relative  # noqa: E402

import hybrid_lora  # noqa: E402
from hybrid_lora.nn import peft as peft_integration  # noqa: E402
from hybrid_lora.nn import peft_4bit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGETS = ["q_proj", "v_proj", "down_proj"]
STEPS, BATCH, LENGTH = 20, 2, 8


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def fused_4bit_dropouts(monkeypatch):
    """{dropout_p: True} for every call the patched 4-bit layers make to the op (empty: peft's forward ran)."""
    seen = {}
    real = peft_4bit.fused_lora_4bit

    def recording(*args, **kwargs):
        seen[kwargs["dropout_p"]] = True
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_4bit, "fused_lora_4bit", recording)
    return seen


def qlora_model(folder, dropout=0.0, kbit=True, **config):
    model = load_4bit(folder)
    if kbit:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(r=5, lora_alpha=10.0, lora_dropout=dropout, target_modules=TARGETS, **config)
    torch.manual_seed(0)  # lora_A's initialisation
    return live_adapters(peft.get_peft_model(model, config))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_logits_and_lora_gradients_equal_peft_qlora(llama_folder, backend, monkeypatch, fused_4bit_dropouts):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", backend)
    plain = qlora_model(llama_folder)
    fast = hybrid_lora.accelerate(copy.deepcopy(plain))
    assert len(peft_integration.accelerated_layers(fast)) == len(TARGETS)
    ids = token_batch()
    want_logits, want_grads = logits_and_grads(plain, ids)
    got_logits, got_grads = logits_and_grads(fast, ids)
    assert set(fused_4bit_dropouts) == {0.0}
    assert_close_relative(got_logits, want_logits, rel=1e-5)
    assert list(got_grads) == list(want_grads) and len(want_grads) == 2 * len(TARGETS)
    for name, grad in want_grads.items():
        assert_close_relative(got_grads[name], grad, rel=1e-4)


def test_dropout_runs_fused_and_restore_gives_back_peft(llama_folder, monkeypatch, fused_4bit_dropouts):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    model = hybrid_lora.accelerate(qlora_model(llama_folder, dropout=0.05))
    model.train()
    model(input_ids=token_batch()).logits.sum().backward()
    assert set(fused_4bit_dropouts) == {0.05}
    hybrid_lora.restore(model)
    assert not peft_integration.accelerated_layers(model)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    fused_4bit_dropouts.clear()
    model(input_ids=token_batch())
    assert not fused_4bit_dropouts


def test_unsupported_4bit_states_keep_peft_forward(llama_folder, monkeypatch, fused_4bit_dropouts):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    model = qlora_model(llama_folder, use_dora=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hybrid_lora.accelerate(model)
    assert any("DoRA" in str(w.message) for w in caught)
    model(input_ids=token_batch())
    assert not fused_4bit_dropouts


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, VOCAB, (STEPS * BATCH, LENGTH), generator=torch.Generator().manual_seed(5))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_run(folder, tmp_path, accelerated, **extra):
    model = qlora_model(folder)
    if accelerated:
        hybrid_lora.accelerate(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        **extra)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows())
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return losses, {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def plain_qlora_run(llama_folder, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("HYBRID_LORA_BACKEND", "torch")
    try:
        return trainer_run(llama_folder, tmp_path_factory.mktemp("plain"), accelerated=False)
    finally:
        mp.undo()


@pytest.mark.parametrize("extra", [{}, {"gradient_checkpointing": True}], ids=["eager", "gradient checkpointing"])
def test_trainer_run_equals_plain_peft_qlora(llama_folder, plain_qlora_run, extra, tmp_path, monkeypatch,
                                             fused_4bit_dropouts):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")  # 20 steps: the interpreter would take minutes
    want = plain_qlora_run
    got = trainer_run(llama_folder, tmp_path, accelerated=True, **extra)
    assert set(fused_4bit_dropouts) == {0.0}
    assert len(got[0]) == STEPS and got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-6)
    assert list(got[1]) == list(want[1]) and len(want[1]) == 2 * len(TARGETS)
    for name, adapter in want[1].items():
        assert_close_relative(got[1][name], adapter, rel=1e-4)
