"""Training compiled under torchrun (gloo): two processes train like one, across a rank cut, with and without
LoRA dropout.

Each process compiles the model inside DDP (``compiled.compiled_model``) with
``fullgraph=True``; at the cut every process makes new adapter Parameters,
builds DDP again and compiles once more. The compiled graphs run under
``aot_eager`` (Inductor's C++ build would take minutes here; the model is
the same graph either way). With LoRA dropout each process draws the seeds the
one process draws (the same generator, the same calls) and keys the masks on
its rows of the global batch, so the masks, and every figure, are the one
process's.
"""

import json
import sys
import textwrap

import pytest
from helpers import assert_records_close
from test_distributed import finish, launch, torchrun

# One stage after the first (so the schedule cuts 8 -> 4 at the second epoch) of frozen-mode DyLoRA with the
# ordering penalty, on a 1-layer GPT-2 without dropout of its own; micro-batches of 4, two per optimizer step
# (DDP's no_sync on the first). argv: result.json, LoRA dropout.
SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel
    import hybrid_lora
    from hybrid_lora.train import compiled
    from hybrid_lora.train import distributed
    from hybrid_lora.train.config import variant_config
    from hybrid_lora.train.trainer import Domain, train_stage

    torch.set_num_threads(1)
    compiled.COMPILE_BACKEND = "aot_eager"
    distributed.setup("cpu")
    parallel = distributed.current()
    VOCAB, LENGTH = 16, 8
    g = torch.Generator().manual_seed(1)
    ids = (torch.randint(0, VOCAB, (16, 1), generator=g) + 3 * torch.arange(LENGTH)) % VOCAB
    examples = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=LENGTH, vocab_size=VOCAB,
                                       bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0))
    lora_dropout = float(sys.argv[2])
    layers = hybrid_lora.inject_lora(model, r_max=8, alpha=8.0, dropout=lora_dropout)
    config = variant_config("dy_only", r_max=8, alpha=8.0, lora_dropout=lora_dropout, batch_size=4, grad_accum=2,
                            epochs=2,
                            rank_schedule=(8, 4), lr=2e-2, log_every=1, progress=False, device="cpu",
                            compile=True)
    torch._dynamo.utils.counters.clear()
    history = []
    own = train_stage(model, Domain("plus3", examples, examples[:8]), config, stage=1, log=history.append)
    adapters = [t.detach().flatten().tolist() for layer in layers for t in (layer.lora_a, layer.lora_b)]
    mine = hashlib.sha256(json.dumps(adapters).encode()).hexdigest()
    everyone = [mine] * parallel.world
    if parallel.world > 1:
        dist.all_gather_object(everyone, mine)
    result = {"history": history, "eval": own, "adapters": adapters, "digests": everyone,
              "processes": parallel.world, "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
              "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())}
    if parallel.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    distributed.teardown()
""")

TIMING = {"seconds", "tokens_per_second"}


@pytest.mark.slow
@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_two_processes_train_compiled_like_one_compiled_process_across_a_rank_cut(tmp_path, lora_dropout):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    started = {}
    for nproc in (1, 2):
        out = tmp_path / f"processes-{nproc}.json"
        argv = [sys.executable, str(script)] if nproc == 1 else torchrun(str(script))
        started[nproc] = (launch([*argv, str(out), str(lora_dropout)], f"{out}.log"), out)
    results = {}
    for nproc, (process, out) in started.items():
        finish(process, f"{out}.log")
        results[nproc] = json.loads(out.read_text())
    one, two = results[1], results[2]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert len(set(two["digests"])) == 1  # both processes cut alike and end with the same adapters
    # One graph per adapter width in each process, and no graph break (fullgraph=True would have raised).
    assert one["graphs"] == two["graphs"] == 2 and one["graph_breaks"] == two["graph_breaks"] == 0
    rows = {n: [{k: v for k, v in row.items() if k not in TIMING} for row in r["history"]] for n, r in results.items()}
    assert [row["rank"] for row in rows[2] if row["kind"] == "epoch"] == [8, 4]
    assert_records_close(rows[2], rows[1], "history")
    assert_records_close(two["eval"], one["eval"], "eval")
    assert_records_close(two["adapters"], one["adapters"], "adapters")


def test_under_torchrun_the_model_is_compiled_inside_ddp_and_the_loss_stays_eager():
    from types import SimpleNamespace

    import torch

    from hybrid_lora.train.compiled import compiled_model, loss_function

    model = torch.nn.Linear(2, 2)
    on, off = SimpleNamespace(compile=True, rank_schedule=()), SimpleNamespace(compile=False, rank_schedule=())
    one, two = SimpleNamespace(world=1), SimpleNamespace(world=2)
    assert compiled_model(model, on, one) is model and compiled_model(model, off, two) is model
    inside_ddp = compiled_model(model, on, two)
    assert isinstance(inside_ddp, torch._dynamo.eval_frame.OptimizedModule) and inside_ddp._orig_mod is model
    # One process compiles the whole loss function; under torchrun it stays eager around the compiled model.
    assert hasattr(loss_function(on, one), "_torchdynamo_orig_callable")
    assert not hasattr(loss_function(on, two), "_torchdynamo_orig_callable")
