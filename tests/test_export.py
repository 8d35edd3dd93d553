"""Adapter files, and the export to peft's format and to merged weights, round-tripped through their loaders."""

import pytest
import torch

from conftest import TOLERANCES
from hybrid_lora import inject_lora, lora_layers
from hybrid_lora.adapter_files import attach_adapter, read_adapter, save_adapter
from hybrid_lora.cli import main
from hybrid_lora.export import export_merged, export_peft, peft_state
from hybrid_lora.models import load_model_and_tokenizer

R_MAX, RANK = 8, 3


@pytest.fixture(autouse=True)
def offline_torch_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")


@pytest.fixture(scope="module")
def trained():
    """The embedded base with an adapter whose every component is non-zero, as after training."""
    model, tokenizer = load_model_and_tokenizer("embedded", device="cpu")
    torch.manual_seed(0)
    inject_lora(model, r_max=R_MAX, alpha=32.0, dropout=0.05)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_b.normal_(0.0, 0.02)
    model.eval()
    return model, tokenizer


def _batch(tokenizer):
    enc = tokenizer(["Anna lives in Dunmore. She works as a", "Every Sunday there is a market in"],
                    return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _at_rank(model, rank):
    for layer in lora_layers(model):
        layer.set_rank(rank)


def test_adapter_file_round_trip(tmp_path, trained):
    model, tokenizer = trained
    _at_rank(model, RANK)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, "embedded", extra={"stage": 1})
    tensors, metadata = read_adapter(path)
    assert metadata["rank"] == RANK and metadata["r_max"] == R_MAX and metadata["alpha"] == 32.0
    assert metadata["target_modules"] == ["c_attn"] and metadata["extra"] == {"stage": 1}
    assert tensors["transformer.h.0.attn.c_attn.lora_a"].shape == (128, R_MAX)
    fresh, _ = load_model_and_tokenizer("embedded", device="cpu")
    attach_adapter(fresh, path)
    fresh.eval()
    ids, mask = _batch(tokenizer)
    torch.testing.assert_close(_logits(fresh, ids, mask), _logits(model, ids, mask), atol=0, rtol=0)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed


def test_peft_and_merged_exports_give_the_same_logits(tmp_path, trained):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model, tokenizer = trained
    ids, mask = _batch(tokenizer)
    _at_rank(model, RANK)
    ours = _logits(model, ids, mask)
    _at_rank(model, R_MAX)
    full = _logits(model, ids, mask)
    # The rank matters: if the export ignored it, the comparisons below would fail.
    assert (ours - full).abs().max() > 100 * TOLERANCES[torch.float32]["atol"]

    export_peft(model, tmp_path / "peft", RANK, base_model_name_or_path="embedded")
    export_merged(model, tokenizer, tmp_path / "merged", RANK)
    assert all(layer.rank == R_MAX and not layer.merged for layer in lora_layers(model))  # model untouched

    base, _ = load_model_and_tokenizer("embedded", device="cpu")
    with_peft = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert with_peft.peft_config["default"].r == RANK
    torch.testing.assert_close(_logits(with_peft, ids, mask), ours, **TOLERANCES[torch.float32])

    merged = GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(_logits(merged, ids, mask), ours, **TOLERANCES[torch.float32])
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_peft_state_layout(trained):
    model, _ = trained
    state, config = peft_state(model, RANK)
    a = state["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"]
    b = state["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    layer = lora_layers(model)[1]
    assert a.shape == (RANK, 128) and b.shape == (384, RANK)
    torch.testing.assert_close(a, layer.lora_a[:, :RANK].t())
    torch.testing.assert_close(b, layer.lora_b[:RANK].t())
    assert config["r"] == RANK and config["lora_alpha"] == 32.0 and config["fan_in_fan_out"] is True
    with pytest.raises(ValueError, match=r"rank 9 is outside \[1, 8\]"):
        peft_state(model, 9)


def test_export_command_writes_both_and_rejects_a_rank_above_r_max(tmp_path, trained, capsys):
    model, _ = trained
    _at_rank(model, R_MAX)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(model, adapter, "embedded")
    assert main(["export", str(adapter), "--rank", "2", "--peft", str(tmp_path / "p"),
                 "--merged", str(tmp_path / "m")]) == 0
    assert (tmp_path / "p" / "adapter_config.json").is_file()
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "m" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(adapter), "--rank", "9", "--peft", str(tmp_path / "q")])
    assert exit_info.value.code == 2
    assert "--rank 9: outside [1, 8]" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "none.safetensors"), "--peft", str(tmp_path / "q")])
    assert exit_info.value.code == 2
    assert "none.safetensors' does not exist" in capsys.readouterr().err
