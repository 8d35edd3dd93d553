"""LoRA dropout keyed on the row of the batch: a shard of a batch, given its row offset, drops what the whole
batch drops, in the reference, the kernels, the op on both paths, and two processes under torchrun."""

import json
import sys

import pytest
import torch
from helpers import assert_records_close
from test_distributed import dropout_free_embedded_model, finish, launch, torchrun

from hybrid_lora import fused_lora
from hybrid_lora.kernels.dropout import dropout_keep_mask
from hybrid_lora.nn.layer import LoRALinear
from hybrid_lora.ops import reference


def _bits(mask):
    return sum(int(b) << i for i, b in enumerate(mask.flatten().tolist()))


def test_the_default_offset_leaves_every_mask_as_it_was():
    # Masks the specification gave before it had a row offset (computed then, kept here).
    assert _bits(reference.philox_keep_mask(1234, 3, 10, 0.5)) == 0x1df6a65a
    assert _bits(reference.philox_keep_mask(2**40 + 7, 5, 13, 0.3)) == 0xcafc59ead5eab6ba


@pytest.mark.parametrize("M, K, offset", [(1, 5, 3), (7, 13, 9), (16, 64, 48)])
def test_rows_from_an_offset_are_that_block_of_the_whole_batchs_mask(M, K, offset):
    seed, p = 2**33 + 5, 0.3
    whole = reference.philox_keep_mask(seed, offset + M, K, p)
    for given in (offset, torch.tensor(offset)):
        assert torch.equal(reference.philox_keep_mask(seed, M, K, p, row_offset=given), whole[offset:])
    assert torch.equal(dropout_keep_mask(M, K, seed, p, "cpu", row_offset=offset), whole[offset:])
    assert not torch.equal(reference.philox_keep_mask(seed, M, K, p), whole[offset:])


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_shards_with_their_row_offsets_compute_what_the_whole_batch_computes(path, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", path)
    g = torch.Generator().manual_seed(0)
    M, K, N, R = 10, 24, 20, 6
    x = torch.randn(M, K, generator=g)
    weight, bias = torch.randn(K, N, generator=g), torch.randn(N, generator=g)
    lora_a, lora_b = torch.randn(K, R, generator=g), torch.randn(R, N, generator=g)
    grad_y = torch.randn(M, N, generator=g)

    def run(rows, offset):
        xs, a, b = (t.clone().requires_grad_() for t in (x[rows], lora_a, lora_b))
        y = fused_lora(xs, weight, bias, a, b, rank=5, scale=1.5, dropout_p=0.3, seed=77,
                       row_offset=torch.tensor(offset) if offset else 0)
        y.backward(grad_y[rows])
        return y.detach(), xs.grad, a.grad, b.grad

    whole = run(slice(0, M), 0)
    first, second = run(slice(0, 4), 0), run(slice(4, M), 4)
    torch.testing.assert_close(torch.cat([first[0], second[0]]), whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([first[1], second[1]]), whole[1], atol=1e-5, rtol=1e-5)
    for i in (2, 3):  # the adapters' gradients are sums over the rows
        torch.testing.assert_close(first[i] + second[i], whole[i], atol=1e-4, rtol=1e-5)
    unplaced = run(slice(4, M), 0)  # the second shard as if it were a batch of its own: other masks
    assert not torch.allclose(unplaced[0], second[0], atol=1e-3)


def test_a_bad_row_offset_is_named():
    x, weight, lora_a, lora_b = torch.randn(2, 4), torch.randn(4, 3), torch.randn(4, 2), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"fused_lora: row_offset is -1; expected an integer in \[0, 2\*\*63\)"):
        fused_lora(x, weight, None, lora_a, lora_b, rank=1, scale=1.0, dropout_p=0.1, row_offset=-1)
    with pytest.raises(ValueError, match=r"fused_lora: row_offset has dtype torch.float32; expected one of"):
        fused_lora(x, weight, None, lora_a, lora_b, rank=1, scale=1.0, dropout_p=0.1, row_offset=torch.tensor(1.0))


def test_a_layer_writes_its_row_offset_in_place_and_names_a_bad_one():
    layer = LoRALinear(torch.randn(6, 4), r_max=2, dropout=0.1)
    buffer = layer.dropout_row_offset
    layer.set_dropout_row_offset(12)
    assert layer.dropout_row_offset is buffer and int(buffer) == 12 and layer.row_offset == 12
    with pytest.raises(ValueError, match=r"LoRALinear.set_dropout_row_offset: rows -1; expected an integer >= 0"):
        layer.set_dropout_row_offset(-1)


@pytest.mark.slow
def test_two_processes_with_lora_dropout_train_like_one(tmp_path):
    """The base model's own dropout off: every random mask of the run is LoRA's, and must be the one process's.

    The two processes also checkpoint their blocks (DDP over recomputed forwards), which changes no figure."""
    model = dropout_free_embedded_model(tmp_path / "model")
    # 26 examples in batches of 8: the last global micro-batch has 2 rows, one per process (offsets 0 and 1).
    flags = ["train", "--device", "cpu", "--train-examples", "26", "--eval-examples", "8", "--epochs", "1",
             "--lora-dropout", "0.05", "--max-length", "32", "--r-max", "8", "--model", str(model), "--no-plots",
             "--threads", "1", "--log-every", "1", "--sweep-ranks"]
    two = launch(torchrun("-m", "hybrid_lora", *flags, "--gradient-checkpointing", "--out", str(tmp_path / "two")),
                 tmp_path / "two.log")
    one = launch([sys.executable, "-m", "hybrid_lora", *flags, "--out", str(tmp_path / "one")], tmp_path / "one.log")
    finish(two, tmp_path / "two.log")
    finish(one, tmp_path / "one.log")
    one_metrics, two_metrics = (json.loads((tmp_path / name / "seed-42" / "metrics.json").read_text())
                                for name in ("one", "two"))
    assert two_metrics["config"]["lora_dropout"] == 0.05 and two_metrics["config"]["gradient_checkpointing"]
    for key in ("accuracy", "loss", "retention", "bwt", "loss_change"):
        assert_records_close(two_metrics[key], one_metrics[key], key)
    steps, epochs = ([[row[k] for k in keys] for metrics in (one_metrics, two_metrics) for row in metrics["history"]
                      if row["kind"] == kind]
                     for kind, keys in (("step", ("global_step", "train_loss")),
                                        ("epoch", ("train_loss", "eval_loss", "eval_accuracy", "tokens"))))
    assert len(steps) == 2 * 8  # 4 steps per stage, the last of 2 examples
    assert_records_close(steps[8:], steps[:8], "step rows")
    assert_records_close(epochs[2:], epochs[:2], "epoch rows")
