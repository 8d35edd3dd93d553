"""A route over generate, over compiled graphs and under a dispatch mode, and one line for each bad input."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from serving_helpers import ADAPTERS, adapter_paths, bank_for, base, merged_alone  # noqa: F401 (fixtures)

# (adapter, rank, prompt length): three lengths, so the batch is left-padded
REQUESTS = [("ours", 3, 4), (None, None, 6), ("peft_rs", 2, 3), ("ours", None, 5), ("fixed", 5, 6)]


def padded_prompts(base, requests, seed=0):
    """(input_ids, attention_mask, [each prompt alone]) of left-padded random prompts of the requests' lengths."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(length for _, _, length in requests)
    prompts = [torch.randint(1, base.config.vocab_size, (length,), generator=generator) for _, _, length in requests]
    ids = torch.full((len(prompts), longest), base.config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    return ids, mask, prompts


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_greedy_generate_inside_a_route_equals_each_request_generated_alone(base, adapter_paths, path, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    model, bank = bank_for(base, adapter_paths, torch.float32)
    ids, mask, prompts = padded_prompts(base, REQUESTS)
    adapters, ranks = [name for name, _, _ in REQUESTS], [rank for _, rank, _ in REQUESTS]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=base.config.pad_token_id)
    with bank.route(adapters=adapters, ranks=ranks):
        batch = model.generate(ids, attention_mask=mask, **settings)[:, ids.shape[1]:]
    for row, (name, rank, _) in enumerate(REQUESTS):
        alone_model = merged_alone(base, adapter_paths.get(name), rank).float()
        alone = alone_model.generate(prompts[row][None], attention_mask=torch.ones_like(prompts[row][None]),
                                     **settings)[0, len(prompts[row]):]
        assert batch[row].tolist() == alone.tolist(), (row, name, rank)


def test_sampling_inside_a_route_draws_what_the_merged_model_draws(base, adapter_paths, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    model, bank = bank_for(base, adapter_paths, torch.float32)
    ids, mask, _ = padded_prompts(base, [("peft", 3, 4), ("peft", 3, 6)])
    settings = dict(max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=base.config.pad_token_id)
    torch.manual_seed(7)
    with bank.route(adapters=["peft", "peft"], ranks=[3, 3]):
        got = model.generate(ids, attention_mask=mask, **settings)
    torch.manual_seed(7)
    want = merged_alone(base, adapter_paths["peft"], 3).float().generate(ids, attention_mask=mask, **settings)
    assert got.tolist() == want.tolist()


# Mixes of 6 rows: one adapter, none, all four and none, all four at other ranks.
MIXES = [(["ours"] * 6, [8] * 6), ([None] * 6, None), (list(ADAPTERS) + ["ours", None], [1, 2, 3, 4, 5, None]),
         (["ours", "fixed", "peft", "peft_rs", "ours", "fixed"], [1, 2, 3, 4, 5, 5])]


class OpCalls(TorchDispatchMode):
    """Counts the calls of each op that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] = self.calls.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


# The kernels' path once (the interpreter takes seconds a forward): the op is the same custom op on both paths.
@pytest.mark.parametrize("path, mixes", [("torch", 4), ("triton", 1)])
def test_a_forward_calls_the_op_once_per_adapted_layer_whatever_the_mix(base, adapter_paths, path, mixes,
                                                                       monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    model, bank = bank_for(base, adapter_paths, torch.float32)
    ids = torch.randint(0, base.config.vocab_size, (6, 3))
    for adapters, ranks in MIXES[-mixes:]:
        counter = OpCalls()
        with torch.no_grad(), bank.route(adapters=adapters, ranks=ranks), counter:
            model(ids)
        assert counter.calls.get("hybrid_lora.multi_lora_forward.default") == len(bank.layers) == 4, counter.calls


@pytest.mark.usefixtures("fresh_dynamo")
def test_one_compiled_graph_serves_every_route_of_a_batch_size(base, adapter_paths, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    model, bank = bank_for(base, adapter_paths, torch.float32)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    ids = torch.randint(0, base.config.vocab_size, (6, 3))
    for i, (adapters, ranks) in enumerate(MIXES):
        with torch.no_grad(), bank.route(adapters=adapters, ranks=ranks):
            want = model(ids).logits
            with torch.compiler.set_stance("default" if i == 0 else "fail_on_recompile"):
                got = compiled(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    ops = " ".join(str(node.target) for graph in counter.graphs for node in graph.graph.nodes)
    assert ops.count("multi_lora_forward") == len(bank.layers) and "_local_scalar_dense" not in ops


def one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message


def test_bad_routes_and_loads_get_one_line_each_and_lose_nothing(base, adapter_paths, tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from hybrid_lora import AdapterBank
    from hybrid_lora.errors import BadValue

    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    model, bank = bank_for(base, adapter_paths, torch.float32)
    ids = torch.randint(0, base.config.vocab_size, (3, 4))
    with pytest.raises(BadValue) as err:
        bank.route(adapters=["ours", "nope", None]).__enter__()
    one_line(err, "unknown adapter 'nope'", "ours")
    for name, rank, bound in (("ours", 0, "[1, 8]"), ("ours", 9, "[1, 8]"), ("fixed", 6, "[1, 5]")):
        with pytest.raises(BadValue) as err:
            bank.route(adapters=[name], ranks=[rank]).__enter__()
        one_line(err, f"rank {rank}", bound, repr(name))
    with pytest.raises(BadValue) as err:
        bank.route(adapters=["ours", None], ranks=[2]).__enter__()
    one_line(err, "ranks=[2]", "a list of 2")
    with torch.no_grad(), bank.route(adapters=["ours", None]), pytest.raises(BadValue) as err:
        model(ids)
    one_line(err, "2 entries for a batch of 3 rows")
    with pytest.raises(BadValue) as err:
        bank.load("fifth", adapter_paths["ours"])
    one_line(err, "'fifth'", "4 slots")
    with pytest.raises(BadValue) as err:
        bank.unload("nope")
    one_line(err, "no adapter named 'nope'")

    # adapters of another base model: another width, other target layers (our file and a peft folder)
    other = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=base.config.vocab_size))
    bank.unload("peft")
    for name, path, fragment in [
        ("small", make_one(other, ("c_attn",), tmp_path / "small.safetensors"), "128 -> 384"),
        ("proj", make_one(base, ("c_proj",), tmp_path / "proj.safetensors"), "other modules"),
        ("proj_peft", make_one(base, ("c_fc",), tmp_path / "proj_peft", peft=True), "other modules"),
        ("wide", make_one(base, ("c_attn",), tmp_path / "wide.safetensors", r_max=9), "width 9"),
    ]:
        with pytest.raises(BadValue) as err:
            bank.load(name, path)
        one_line(err, fragment, str(path))
    with pytest.raises(BadValue) as err:
        AdapterBank(copy.deepcopy(base), target_modules=("nothing_here",))
    one_line(err, "nothing_here")

    # nothing was lost: the bank still serves what it held, in the free slot too
    bank.load("peft", adapter_paths["peft"])
    with torch.no_grad(), bank.route(adapters=["ours", "peft", None], ranks=[2, 3, None]):
        got = model(ids).logits
    with torch.no_grad():
        want = merged_alone(base, adapter_paths["peft"], 3)(ids[1:2]).logits
    torch.testing.assert_close(got[1:2].double(), want, atol=1e-4, rtol=1e-4)


def make_one(model, targets, path, peft=False, r_max=4):
    """One adapter of `model` on `targets` at `path` (our file, or a peft folder)."""
    model = copy.deepcopy(model)
    if peft:
        from peft import LoraConfig, get_peft_model

        get_peft_model(model, LoraConfig(r=r_max, target_modules=list(targets), fan_in_fan_out=True)).save_pretrained(
            path)
        return path
    from hybrid_lora.io.adapter_files import save_adapter
    from hybrid_lora.nn.layer import inject_lora

    inject_lora(model, list(targets), r_max=r_max)
    save_adapter(model, path, base_model="other")
    return path


def test_the_op_refuses_a_call_autograd_would_differentiate_in_one_line():
    from hybrid_lora.ops.multi_lora import multi_lora

    x = torch.randn(3, 8, requires_grad=True)
    args = (torch.randn(8, 5), None, torch.randn(2, 8, 4), torch.randn(2, 4, 5))
    rows = dict(slots=torch.tensor([0, -1, 1]), ranks=torch.tensor([1, 0, 4]), scales=torch.ones(3))
    with pytest.raises(RuntimeError) as err:
        multi_lora(x, *args, **rows)
    one_line(err, "inference only", "torch.no_grad()")
    with torch.no_grad():
        assert multi_lora(x, *args, **rows).shape == (3, 5)
