"""Adapter files, and the export to peft's format and to merged weights, round-tripped through their loaders.

On the embedded GPT-2 (Conv1D), on a tiny Llama checkpoint folder (nn.Linear), and on both kinds in one model.
"""

import json

import pytest
import torch
from conftest import TOLERANCES

from hybrid_lora import inject_lora, lora_layers
from hybrid_lora.cli import main
from hybrid_lora.io.adapter_files import attach_adapter, read_adapter, save_adapter
from hybrid_lora.io.export import export_merged, export_peft, peft_state
from hybrid_lora.io.models import load_model_and_tokenizer

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
    assert "--rank: rank 9 is outside [1, 8] (r_max)" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "none.safetensors"), "--peft", str(tmp_path / "q")])
    assert exit_info.value.code == 2
    assert "none.safetensors' does not exist" in capsys.readouterr().err


# --- any causal LM: a tiny Llama checkpoint folder, and GPT-2 with its nn.Linear head ----------------------

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random-weight Llama saved as a checkpoint folder, with the embedded tokenizer (no pad token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid_lora.io.models import load_tokenizer

    tokenizer = load_tokenizer("embedded")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    return folder


def _live_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=g) * 0.2)
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.2)
    return model.eval()


def test_llama_adapter_file_peft_and_merged_exports_round_trip(tmp_path, llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model_and_tokenizer(str(llama_dir), device="cpu")
    assert tokenizer.pad_token == tokenizer.eos_token  # the folder's tokenizer has none
    inject_lora(model, LLAMA_TARGETS, r_max=R_MAX, alpha=16.0)
    _live_adapters(model)
    _at_rank(model, RANK)
    ids, mask = _batch(tokenizer)
    ours = _logits(model, ids, mask)

    save_adapter(model, tmp_path / "adapter.safetensors", str(llama_dir))
    fresh, _ = load_model_and_tokenizer(str(llama_dir), device="cpu")
    attach_adapter(fresh, tmp_path / "adapter.safetensors")
    torch.testing.assert_close(_logits(fresh.eval(), ids, mask), ours, atol=0, rtol=0)

    export_peft(model, tmp_path / "peft", RANK, base_model_name_or_path=str(llama_dir))
    export_merged(model, tokenizer, tmp_path / "merged", RANK)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False and config["target_modules"] == sorted(LLAMA_TARGETS)
    base, _ = load_model_and_tokenizer(str(llama_dir), device="cpu")
    with_peft = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(with_peft, ids, mask), ours, **TOLERANCES[torch.float32])
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(_logits(merged, ids, mask), ours, **TOLERANCES[torch.float32])
    # The adapters are live: the base model's logits differ.
    untouched, _ = load_model_and_tokenizer(str(llama_dir), device="cpu")
    assert (_logits(untouched.eval(), ids, mask) - ours).abs().max() > 100 * TOLERANCES[torch.float32]["atol"]


def test_a_subset_of_layers_exports_full_module_names(tmp_path, llama_dir):
    from peft import PeftModel

    model, tokenizer = load_model_and_tokenizer(str(llama_dir), device="cpu")
    inject_lora(model, r"model\.layers\.1\.self_attn\.(q|v)_proj", r_max=R_MAX)
    _live_adapters(model)
    _, config = peft_state(model, R_MAX)
    # The suffixes q_proj and v_proj would adapt layer 0 too; the full names adapt exactly these.
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    export_peft(model, tmp_path / "peft", R_MAX)
    base, _ = load_model_and_tokenizer(str(llama_dir), device="cpu")
    with_peft = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert sum(hasattr(m, "lora_A") for m in with_peft.modules()) == 2
    ids, mask = _batch(tokenizer)
    torch.testing.assert_close(_logits(with_peft, ids, mask), _logits(model, ids, mask), **TOLERANCES[torch.float32])


def test_gpt2_with_its_linear_head_exports_mixed_layer_kinds(tmp_path):
    """Conv1D projections and the nn.Linear lm_head in one adapter: peft sets fan_in_fan_out per layer."""
    from peft import PeftModel

    model, tokenizer = load_model_and_tokenizer("embedded", device="cpu")
    inject_lora(model, ["c_attn", "lm_head"], r_max=R_MAX)
    _live_adapters(model)
    ids, mask = _batch(tokenizer)
    ours = _logits(model, ids, mask)
    export_peft(model, tmp_path / "peft", R_MAX, base_model_name_or_path="embedded")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True  # four Conv1D against one Linear
    base, _ = load_model_and_tokenizer("embedded", device="cpu")
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        with_peft = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert with_peft.base_model.model.lm_head.fan_in_fan_out is False
    assert with_peft.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out is True
    torch.testing.assert_close(_logits(with_peft, ids, mask), ours, **TOLERANCES[torch.float32])
    # lm_head shares its weight with the token embedding: merging it would change both.
    with pytest.raises(ValueError, match="lm_head's weight is tied"):
        export_merged(model, tokenizer, tmp_path / "merged", R_MAX)
    assert not (tmp_path / "merged").exists()


def test_train_eval_and_export_commands_on_a_llama_folder(tmp_path, llama_dir, capsys):
    from peft import PeftModel

    out = tmp_path / "run"
    assert main(["train", "--model", str(llama_dir), "--target-modules", r".*\.(q|v|down)_proj",
                 "--variant", "lora_only", "--train-examples", "8", "--eval-examples", "8", "--epochs", "1",
                 "--r-max", "8", "--sweep-ranks", "--batch-size", "8", "--eval-batch-size", "8", "--max-length", "32",
                 "--lr", "1e-2",
                 "--backend", "torch", "--device", "cpu", "--no-plots", "--out", str(out)]) == 0
    adapters = sorted((out / "seed-42" / "adapters").glob("*.safetensors"))
    assert adapters
    tensors, metadata = read_adapter(adapters[-1])
    assert metadata["base_model"] == str(llama_dir) and metadata["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert len(tensors) == 2 * 3 * 2 and any((t != 0).any() for k, t in tensors.items() if k.endswith("lora_b"))
    capsys.readouterr()
    assert main(["eval", str(adapters[-1]), "--rank", "2", "--domains", "embedded-b", "--eval-examples", "8",
                 "--max-length", "32", "--backend", "torch", "--device", "cpu"]) == 0
    assert "rank   2" in capsys.readouterr().out
    assert main(["export", str(adapters[-1]), "--rank", "2", "--peft", str(tmp_path / "p"),
                 "--merged", str(tmp_path / "m")]) == 0
    model, tokenizer = load_model_and_tokenizer(str(llama_dir), device="cpu")
    attach_adapter(model, adapters[-1], dropout=0.0)
    _at_rank(model, 2)
    ids, mask = _batch(tokenizer)
    base, _ = load_model_and_tokenizer(str(llama_dir), device="cpu")
    with_peft = PeftModel.from_pretrained(base, str(tmp_path / "p")).eval()
    torch.testing.assert_close(_logits(with_peft, ids, mask), _logits(model.eval(), ids, mask),
                               **TOLERANCES[torch.float32])
    merged, _ = load_model_and_tokenizer(str(tmp_path / "m"), device="cpu")
    torch.testing.assert_close(_logits(merged.eval(), ids, mask), _logits(model, ids, mask),
                               **TOLERANCES[torch.float32])
