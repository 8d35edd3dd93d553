"""The tests' shared helpers: tiny random models and the comparisons, one copy each.

Fixtures are in conftest.py; these are plain functions, imported by name (``from helpers import ...``).
"""

import pytest
import torch
from conftest import TOLERANCES


def tiny_gpt2(seed=0, *, layers=1, width=32, vocab=16, positions=16, dropout=0.0):
    """A random GPT-2 (Conv1D projections) from torch's generator seeded with `seed`, in training mode.

    dropout: GPT-2's own (embedding, attention, residual), active whenever the model trains.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=2, n_positions=positions,
                                      vocab_size=vocab, bos_token_id=0, eos_token_id=0, resid_pdrop=dropout,
                                      embd_pdrop=dropout, attn_pdrop=dropout))


def tiny_llama(seed=0, *, layers=1, width=32, vocab=16, positions=32):
    """A random Llama (nn.Linear projections, grouped-query attention: k_proj's out is width / 2), training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=48,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=positions, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0))


def assert_close(name, got, want, dtype):
    """A kernel's output against the fp64 reference `want`, with conftest's tolerances for `dtype`.

    The tolerance scales with the size of the values (outputs sum over K or N
    products); a non-finite value fails (an element the kernel never wrote).
    """
    tol = TOLERANCES[dtype]
    got = got.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an element the kernel never wrote?)"
    size = want.abs().max().item()
    err = (got - want).abs().max().item()
    bound = tol["atol"] * max(1.0, size) + tol["rtol"] * size
    assert err <= bound, f"{name}: max |diff| {err:.3e} > {bound:.3e}"


def assert_close_relative(got, want, rel=2e-5):
    """max |got - want| <= rel * max |want|: two fp32 passes that sum in different orders."""
    err, size = (got - want).abs().max().item(), want.abs().max().item()
    assert size > 0 and err <= rel * size, f"max |diff| {err:.3e} > {rel} * {size:.3e}"


def assert_records_close(got, expected, where, rel=1e-5, abs_=1e-6):
    """JSON values (a run's records, metrics) equal, floats to the tolerance; `where` names the first difference."""
    if isinstance(expected, dict):
        assert sorted(got) == sorted(expected), where
        for key in expected:
            assert_records_close(got[key], expected[key], f"{where}.{key}", rel, abs_)
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_records_close(a, b, f"{where}[{i}]", rel, abs_)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=rel, abs=abs_), where
    else:
        assert got == expected, where


# The largest normwise relative error ||got - want|| / ||want|| against the fp64 reference, per compute dtype.
# bf16 kernels (bf16 operands, fp32 accumulation, bf16 outputs) stay near 2e-3 at GPT-2's shape: PyTorch
# emulating their roundings at GPT-2's shape gives 1.8e-3 to 2.6e-3 for Y, dX, dA and dB. A LoRA term 5%
# off (a missing 1 / (1 - p) at p = 0.05) puts Y and dX above 2e-2, and dA or dB at 5e-2; a lost split
# of the dA reduction, far above.
MAX_NORMWISE_ERROR = {torch.bfloat16: 6e-3}


def normwise_error(got, want) -> float:
    """||got - want|| / ||want|| (Frobenius), in fp64."""
    got = got.detach().double().to(want.device)
    return ((got - want).norm() / want.norm()).item()


def assert_normwise_close(name, got, want, dtype, seed):
    """A kernel's output against the fp64 reference `want` under MAX_NORMWISE_ERROR; `seed` names the draw."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an element never written?); seed {seed}"
    err, bound = normwise_error(got, want), MAX_NORMWISE_ERROR[dtype]
    assert err <= bound, f"{name}: normwise relative error {err:.2e} > {bound:.0e} ({dtype}); seed {seed}"
