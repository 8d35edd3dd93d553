"""AdapterBank on the tiny GPT-2: each row of a mixed batch equals its request alone on the merged model.

One adapter runs at three ranks, one row at none; adapters from our files and
from peft folders share the batch (``serving_helpers``).
"""

import copy

import pytest
import torch

from conftest import TOLERANCES
from serving_helpers import ROUTE, adapter_paths, bank_for, base, merged_alone  # noqa: F401 (fixtures)


@pytest.mark.parametrize("path, dtype", [("triton", torch.float32), ("torch", torch.float64),
                                         ("torch", torch.float32)])
def test_every_row_of_a_mixed_batch_equals_its_request_alone_merged(base, adapter_paths, path, dtype, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    model, bank = bank_for(base, adapter_paths, dtype)
    adapters, ranks = ROUTE
    torch.manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (len(adapters), 6))
    with torch.no_grad(), bank.route(adapters=adapters, ranks=ranks):
        logits = model(ids).logits
    with torch.no_grad():
        outside = model(ids[:1]).logits  # outside a route: the base model
        torch.testing.assert_close(outside.double(), merged_alone(base, None, None)(ids[:1]).logits,
                                   **TOLERANCES[dtype])
        for row, (name, rank) in enumerate(zip(adapters, ranks)):
            want = merged_alone(base, adapter_paths.get(name), rank)(ids[row:row + 1]).logits
            torch.testing.assert_close(logits[row:row + 1].double(), want, **TOLERANCES[dtype])
            if name is not None:  # the adapter changes the row: the comparison is not of base models
                assert (want - merged_alone(base, None, None)(ids[row:row + 1]).logits).abs().max() > 1e-3


def test_a_peft_folder_at_its_full_rank_equals_peft_itself(base, adapter_paths, monkeypatch):
    from peft import PeftModel

    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    model, bank = bank_for(base, adapter_paths, torch.float64)
    ids = torch.randint(0, base.config.vocab_size, (2, 5))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base).double(), adapter_paths["peft_rs"]).eval()
    with torch.no_grad(), bank.route(adapters=["peft_rs", "peft_rs"]):
        got = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(got, peft_model(ids).logits, **TOLERANCES[torch.float64])
