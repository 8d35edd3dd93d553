"""An accelerated peft model trains as the plain one does: HF ``Trainer`` (also with gradient checkpointing and
``torch_compile``), TRL's ``SFTTrainer`` when TRL is installed, and ``torch.compile(fullgraph=True)``.

A 20-step run of a tiny Llama, dropout 0, on the PyTorch path (the Triton interpreter would take
minutes), gives the plain peft run's losses and final adapters; the compiled model gives peft's
logits and gradients on both paths.
"""

import copy

import pytest
import torch
from helpers import assert_close_relative
from test_accelerate import input_ids, logits_and_grads, lora_grads, peft_model
from test_peft_parity import VOCAB

import hybrid_lora
from hybrid_lora.io.models import EMBEDDED_MODEL_DIR

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

STEPS, BATCH, LENGTH = 20, 2, 12


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_dynamo")


def token_rows(count=STEPS * BATCH):
    ids = torch.randint(0, VOCAB, (count, LENGTH), generator=torch.Generator().manual_seed(5))
    return [row.tolist() for row in ids]


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.rows = token_rows()

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "labels": ids}


def arguments(cls, tmp_path, **extra):
    return cls(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-2,
               logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0,
               disable_tqdm=True, **extra)


def hf_trainer(model, tmp_path, **extra):
    return transformers.Trainer(model=model, args=arguments(transformers.TrainingArguments, tmp_path, **extra),
                                train_dataset=Rows())


def sft_trainer(model, tmp_path, **extra):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tokenizer = transformers.AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    # bf16=False: SFTConfig turns bf16 autocast on by default, and the runs are compared at fp32 tolerance
    config = arguments(trl.SFTConfig, tmp_path, max_length=LENGTH, bf16=False, **extra)
    return trl.SFTTrainer(model=model, args=config,
                          train_dataset=Dataset.from_dict({"input_ids": token_rows()}), processing_class=tokenizer)


def train(make_trainer, tmp_path, accelerated, **extra):
    """(losses, final adapters) of a run from the same tiny Llama."""
    model = peft_model("llama")
    if accelerated:
        hybrid_lora.accelerate(model)
    trainer = make_trainer(model, tmp_path, **extra)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == STEPS
    return losses, {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def assert_same_run(got, want):
    assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-6)
    assert list(got[1]) == list(want[1]) and len(want[1]) == 14
    for name, adapter in want[1].items():
        assert_close_relative(got[1][name], adapter, rel=1e-4)


@pytest.fixture(scope="module")
def plain_trainer_run(tmp_path_factory):
    return train(hf_trainer, tmp_path_factory.mktemp("plain"), accelerated=False)


TRAINER_OPTIONS = {
    "eager": {},
    "gradient checkpointing": {"gradient_checkpointing": True},
    # aot_eager: Inductor's C++ build would take minutes on a CPU
    "torch_compile": {"torch_compile": True, "torch_compile_backend": "aot_eager"},
}


@pytest.mark.parametrize("option", [pytest.param(option, marks=[pytest.mark.slow] if option == "torch_compile" else [])
                                    for option in TRAINER_OPTIONS])
def test_hf_trainer_run_equals_plain_peft(option, plain_trainer_run, tmp_path, monkeypatch, fused_dropouts):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    got = train(hf_trainer, tmp_path, accelerated=True, **TRAINER_OPTIONS[option])
    assert set(fused_dropouts) == {0.0}
    assert_same_run(got, plain_trainer_run)


@pytest.mark.slow
def test_sft_trainer_run_equals_plain_peft(tmp_path, monkeypatch, fused_dropouts):
    pytest.importorskip("datasets", reason="trl's SFTTrainer needs datasets (the GPU image has none)")
    pytest.importorskip("trl")
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    want = train(sft_trainer, tmp_path / "plain", accelerated=False)
    got = train(sft_trainer, tmp_path / "fast", accelerated=True)
    assert set(fused_dropouts) == {0.0}
    assert_same_run(got, want)


@pytest.mark.parametrize("backend, dropout", [("torch", 0.0), ("triton", 0.2)])
def test_compiled_fullgraph_equals_peft_and_draws_eager_masks(backend, dropout, monkeypatch, fused_dropouts):
    """One graph of the training forward; dropout 0: peft's logits and gradients; dropout > 0: the eager
    accelerated model's at the same torch seed (the seed is drawn in the graph from torch's generator,
    which aot_eager runs as eager does)."""
    monkeypatch.setenv("HYBRID_LORA_BACKEND", backend)
    plain = peft_model("llama", dropout=dropout).train()
    fast = hybrid_lora.accelerate(copy.deepcopy(plain))
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True, dynamic=False)
    ids = input_ids()
    torch.manual_seed(3)
    want_logits, want = logits_and_grads(plain if dropout == 0.0 else fast, ids)
    want = {name: grad.clone() for name, grad in want.items()}
    fast.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    got_logits = compiled(input_ids=ids).logits
    grad_out = torch.randn(got_logits.shape, generator=torch.Generator().manual_seed(3))
    (got_logits * grad_out).sum().backward()
    assert set(fused_dropouts) == {dropout}  # traced through the op
    assert_close_relative(got_logits.detach(), want_logits)
    got = lora_grads(fast)
    assert set(got) == set(want) and len(want) == 14
    for name, grad in want.items():
        assert_close_relative(got[name], grad)
