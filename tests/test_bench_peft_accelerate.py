"""The `peft+accelerate` layer provider and e2e pipeline: peft's layer on the fused op, counted as the fused one."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `bench`

from bench import e2e  # noqa: E402
from bench.providers import MODES, LayerShape, build_layer, bytes_moved, lora_share, traffic  # noqa: E402

pytest.importorskip("peft")

GPT2 = dict(K=768, N=2304)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("weight_layout", ["in_out", "out_in"])
def test_provider_runs_the_fused_op_inside_peft_layer(weight_layout, fused_calls):
    shape = LayerShape(M=24, K=32, N=48, r=5, dtype=torch.float32, r_max=16, dropout_p=0.1,
                       weight_layout=weight_layout)
    layer = build_layer("peft+accelerate", shape, "cpu", seed=3)
    layer.forward().backward(layer.grad_y)
    assert fused_calls == [0.1]
    grad_a, grad_b = layer.adapter_grads()
    assert grad_a.shape == (shape.K, shape.r) and grad_b.shape == (shape.r, shape.N)


def test_provider_work_is_the_fused_op_at_peft_width():
    plain = LayerShape(M=8192, r=16, dtype=torch.bfloat16, **GPT2)
    dropped = LayerShape(M=8192, r=16, dtype=torch.bfloat16, dropout_p=0.05, **GPT2)
    for mode in MODES:
        assert traffic("peft+accelerate", plain, mode) == traffic("fused", plain, mode)
        assert bytes_moved("peft+accelerate", dropped, mode) == bytes_moved("peft+accelerate", plain, mode)
    # peft's adapter is r wide, so the kernels' rank tile covers r only, where `fused` runs r_max's tile
    narrow = LayerShape(M=8192, r=1, dtype=torch.bfloat16, **GPT2)
    assert lora_share("peft+accelerate", narrow, "fwd") < lora_share("fused", narrow, "fwd")
    assert lora_share("peft+accelerate", narrow, "fwd") >= lora_share("peft", narrow, "fwd")


def test_e2e_pipeline_trains_peft_model_on_the_fused_op(monkeypatch, fused_calls):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    config = e2e.E2EConfig(seq_lens=(8,), batch_size=2, warmup_steps=1, steps=1, model=e2e.TINY_GPT2,
                           pipelines=("peft+accelerate",))
    step_s, _ = e2e.run_pipeline("peft+accelerate", 8, config, torch.device("cpu"))
    assert step_s > 0
    assert fused_calls == [config.dropout] * 2 * 2  # two layers' c_attn, warm-up and timed step
