"""Adapter and checkpoint files never hold NaN or infinity, and a damaged or altered one is refused by name."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hybrid_lora
from hybrid_lora.io.adapter_files import AdapterFileError, read_adapter, save_adapter
from hybrid_lora.io.tensor_files import NonFiniteTensor
from hybrid_lora.train.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def tiny_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=16))
    hybrid_lora.inject_lora(model, r_max=4, alpha=4.0)
    return model


def test_a_non_finite_adapter_is_not_written_and_the_previous_file_stays(tmp_path):
    model = tiny_model()
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, "embedded")
    before = path.read_bytes()
    with torch.no_grad():
        hybrid_lora.lora_layers(model)[0].lora_b[0, 0] = float("nan")
    with pytest.raises(NonFiniteTensor, match=r"refusing to write '.*adapter.safetensors': 1 tensor\(s\) hold NaN"):
        save_adapter(model, path, "embedded")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # no temporary file left


def test_a_non_finite_checkpoint_is_not_written_and_the_previous_one_stays(tmp_path):
    save_checkpoint(tmp_path, {"adapter.x": torch.ones(2, 2)}, {"progress": {"step": 1}})
    before = checkpoint_path(tmp_path).read_bytes()
    with pytest.raises(NonFiniteTensor, match="optimizer.0.exp_avg"):
        save_checkpoint(tmp_path, {"adapter.x": torch.ones(2, 2),
                                   "optimizer.0.exp_avg": torch.tensor([1.0, float("inf")])}, {"progress": {}})
    assert checkpoint_path(tmp_path).read_bytes() == before
    assert load_checkpoint(tmp_path)[1] == {"progress": {"step": 1}}


def test_an_adapter_of_the_first_format_still_loads():
    path = ROOT / "tests" / "data" / "adapter-first-format.safetensors"  # a Stage 1 adapter of the first format
    tensors, metadata = read_adapter(path)
    assert metadata["r_max"] == 64 and tensors


def test_an_older_adapter_holding_nan_is_refused_on_reading(tmp_path):
    path = tmp_path / "diverged.safetensors"
    save_file({"h.0.attn.c_attn.lora_a": torch.full((16, 4), float("nan")),
               "h.0.attn.c_attn.lora_b": torch.zeros(4, 48)}, str(path),
              metadata={"format": "hybrid-lora-adapter/1", "rank": "4", "r_max": "4", "alpha": "4.0",
                        "lora_dropout": "0.0", "target_modules": '["c_attn"]', "base_model": "embedded"})
    with pytest.raises(AdapterFileError, match=r"diverged.safetensors': 1 tensor\(s\) hold NaN or infinity"):
        read_adapter(path)


def test_an_altered_adapter_is_refused(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_adapter(tiny_model(), path, "embedded")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="adapter.safetensors' is corrupt: its content digest"):
        read_adapter(path)
    with pytest.raises(FileNotFoundError, match="adapter file '.*nothing.safetensors' does not exist"):
        read_adapter(tmp_path / "nothing.safetensors")
