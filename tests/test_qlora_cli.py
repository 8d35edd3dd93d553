"""``hybrid-lora train|eval --load-in-4bit``: both stages over a 4-bit embedded base, and the flags' errors."""

import json

import pytest
from test_cli import TINY

from hybrid_lora.cli import main
from hybrid_lora.io import quantization
from hybrid_lora.nn import quantized

needs_bnb = pytest.mark.skipif(not quantization.bitsandbytes_installed(),
                               reason="bitsandbytes is not installed (extra qlora)")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")


@needs_bnb
@pytest.mark.slow  # about 40 s on a CPU: two stages, then three evaluations
def test_train_and_eval_with_a_4bit_base(tmp_path, monkeypatch):
    calls = []
    real = quantized.fused_lora_4bit
    monkeypatch.setattr(quantized, "fused_lora_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "run"
    assert main(["train", *TINY, "--max-steps", "1", "--load-in-4bit", "--bnb-4bit-double-quant",
                 "--out", str(out)]) == 0
    assert calls, "the 4-bit layers never ran"
    run = out / "seed-42"
    config = json.loads((run / "config.json").read_text())["train_config"]
    assert (config["load_in_4bit"], config["bnb_4bit_double_quant"]) == ("nf4", True)
    adapters = sorted((run / "adapters").glob("*.safetensors"))
    assert [p.name for p in adapters] == ["stage1-embedded-a.safetensors", "stage2-embedded-b.safetensors"]
    results = tmp_path / "eval.json"
    assert main(["eval", str(adapters[-1]), "--load-in-4bit", "--bnb-4bit-double-quant", "--eval-examples", "8",
                 "--out", str(results)]) == 0
    # The adapter is the same kind of file as a 16-bit run's: it loads over the 16-bit base too.
    assert main(["eval", str(adapters[-1]), "--eval-examples", "8"]) == 0


def test_4bit_flags_need_load_in_4bit(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", *TINY, "--bnb-4bit-quant-type", "fp4", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "need --load-in-4bit" in capsys.readouterr().err


def test_missing_bitsandbytes_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quantization, "bitsandbytes_installed", lambda: False)
    with pytest.raises(SystemExit) as info:
        main(["train", *TINY, "--load-in-4bit", "--out", str(tmp_path)])
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and 'pip install -e ".[qlora]"' in lines[0]
