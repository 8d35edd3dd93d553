"""bench/qlora.py: its three QLoRA providers compute the same layer, and the harness runs at toy sizes on a CPU."""

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (extra qlora)")
pytest.importorskip("peft")

from bench import qlora  # noqa: E402



def test_providers_compute_the_same_layer(torch_path):
    config = qlora.tiny_config()
    K, N = config.shapes[0]
    layers = {p: qlora.make_layer(p, K, N, config, 0.0, torch.device("cpu")) for p in qlora.PROVIDERS}
    ours = layers["fused-4bit"]
    with torch.no_grad():  # one adapter for all: peft's lora_A [r, K] and lora_B [N, r] are ours transposed
        layers["dequant-addmm"].lora_a.copy_(ours.lora_a)
        layers["dequant-addmm"].lora_b.copy_(ours.lora_b)
        peft_a, peft_b = layers["peft-qlora"].adapters()
        peft_a.copy_(ours.lora_a.t())
        peft_b.copy_(ours.lora_b.t())
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(0))
    outputs = {p: layer(x) for p, layer in layers.items()}
    for p in ("peft-qlora", "dequant-addmm"):
        torch.testing.assert_close(outputs[p], outputs["fused-4bit"], rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(outputs["fused-4bit"])
    grads = {p: torch.autograd.grad(outputs[p], layers[p].adapters(), grad) for p in layers}
    torch.testing.assert_close(grads["dequant-addmm"][0], grads["fused-4bit"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["peft-qlora"][0], grads["fused-4bit"][0].t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["peft-qlora"][1], grads["fused-4bit"][1].t(), rtol=1e-5, atol=1e-5)


def test_tiny_run_writes_both_tables(tmp_path, torch_path):
    out = tmp_path / "qlora.csv"
    assert qlora.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    text = (tmp_path / "qlora.md").read_text()
    assert "fused vs peft" in text and "training step" in text
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 3 * 3 + 3  # header, three modes of three providers, three training steps


def test_a_wrong_kernel_stops_the_benchmark(monkeypatch, torch_path):
    real = qlora.QLoRALayer.forward
    monkeypatch.setattr(qlora.QLoRALayer, "forward", lambda self, x: real(self, x) * 1.01)
    with pytest.raises(AssertionError, match="differs from the reference"):
        qlora.check(qlora.tiny_config(), torch.device("cpu"))
    monkeypatch.setattr(qlora.QLoRALayer, "forward", real)
    qlora.check(qlora.tiny_config(), torch.device("cpu"))
