"""Checkpoints: a run killed with SIGKILL mid-stage and resumed ends exactly like one never interrupted;
a checkpoint that is truncated, corrupt, or from another run is refused with the difference named."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from hybrid_lora.train.checkpoint import CheckpointError, checkpoint_path, load_checkpoint

# A two-stage run on a 2-layer GPT-2 with every source of randomness on: GPT-2's
# dropouts, LoRA dropout, DyLoRA's sampled rank, shuffled data, a rank cut, and
# two micro-batches per step. argv: result.json, checkpoint folder or "-", mode.
# Mode "pause" stops for good (to be killed) in stage 2's first epoch, after its
# first checkpoint of that stage was written; "resume" continues from the folder.
SCRIPT = textwrap.dedent("""
    import hashlib, json, sys, time
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    import hybrid_lora
    from hybrid_lora.train.config import variant_config
    from hybrid_lora.train.trainer import run_continual

    torch.set_num_threads(1)
    out, folder, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    VOCAB, LENGTH = 16, 10

    def domain(name, step, seed):
        g = torch.Generator().manual_seed(seed)
        def examples(n):
            ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + step * torch.arange(LENGTH)) % VOCAB
            mask = (torch.arange(LENGTH) < torch.randint(LENGTH // 2, LENGTH + 1, (n, 1), generator=g)).long()
            return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i].masked_fill(mask[i] == 0, -100)}
                    for i in range(n)]
        return name, examples(24), examples(8)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=LENGTH, vocab_size=VOCAB,
                                       bos_token_id=0, eos_token_id=0, resid_pdrop=0.1, embd_pdrop=0.1,
                                       attn_pdrop=0.1))
    hybrid_lora.inject_lora(model, r_max=8, alpha=8.0, dropout=0.1)
    config = variant_config("hybrid", r_max=8, alpha=8.0, lora_dropout=0.1, batch_size=4, grad_accum=2, epochs=2,
                            rank_schedule=(8, 4), lr=2e-2, log_every=1, checkpoint_every=1, device="cpu")

    def pause(row):
        if mode == "pause" and row["kind"] == "step" and row["stage"] == 1 and row["global_step"] == 8:
            open(out + ".paused", "w").close()
            time.sleep(600)

    result = run_continual(model, [domain("plus1", 1, 1), domain("plus5", 5, 2)], config, log=pause,
                           checkpoint_dir=None if folder == "-" else folder, resume=mode == "resume")
    digest = hashlib.sha256()
    for layer in hybrid_lora.lora_layers(model):
        digest.update(layer.lora_a.detach().numpy().tobytes() + layer.lora_b.detach().numpy().tobytes())
    result["adapter_digest"] = digest.hexdigest()
    with open(out, "w") as f:
        json.dump(result, f)
""")


def start(script, out, folder, mode):
    env = {**os.environ, "HYBRID_LORA_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), str(folder), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(process, timeout=240):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output.decode()[-3000:]


def comparable(result):
    """The result less its timings, with the JSON round trip every checkpoint makes (rank keys become strings)."""
    timing = {"seconds", "tokens_per_second"}
    result = {**result, "history": [{k: v for k, v in row.items() if k not in timing} for row in result["history"]]}
    return json.loads(json.dumps(result))


def test_a_run_killed_mid_stage_resumes_to_the_same_metrics(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    folder = tmp_path / "checkpoints"
    paused = start(script, tmp_path / "killed.json", folder, "pause")
    reference = start(script, tmp_path / "reference.json", "-", "plain")
    marker = tmp_path / "killed.json.paused"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert paused.poll() is None, paused.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline, "the paused run never reached stage 2"
        time.sleep(0.05)
    assert checkpoint_path(folder).exists()
    paused.send_signal(signal.SIGKILL)
    paused.wait(timeout=30)
    assert paused.returncode == -signal.SIGKILL

    # The checkpoint stands inside stage 2's first epoch: 3 steps per epoch, 2 epochs per stage,
    # so global step 7 is stage 2's first step, two micro-batches in.
    _, meta = load_checkpoint(folder)
    progress = meta["progress"]
    assert (progress["stage"], progress["epoch"], progress["batch"], progress["global_step"]) == (1, 0, 2, 7)
    assert len(progress["accuracy"]) == 1 and progress["totals"]["steps"] == 1

    finish(start(script, tmp_path / "resumed.json", folder, "resume"))
    finish(reference)
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    expected = json.loads((tmp_path / "reference.json").read_text())
    assert resumed["adapter_digest"] == expected["adapter_digest"]
    assert comparable(resumed) == comparable(expected)  # every loss, accuracy and history row, bit for bit

    # What the run itself shows: both stages learned, the rank was cut, the default sweep has one row per rank.
    assert [len(row) for row in expected["loss"]] == [2, 2]
    assert [sorted(map(int, s["by_rank"])) for s in expected["rank_sweep"]] == [[1, 2, 4, 8], [1, 2, 4]]
    steps = [row for row in expected["history"] if row["kind"] == "step"]
    assert [row["global_step"] for row in steps] == list(range(1, 13))


def tiny_run(tmp_path, folder="checkpoints", resume=False, width=32, train_seed=1, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    import hybrid_lora
    from hybrid_lora.train.config import TrainConfig
    from hybrid_lora.train.trainer import run_continual

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=width, n_head=2, n_positions=8, vocab_size=16,
                                       bos_token_id=0, eos_token_id=0))
    hybrid_lora.inject_lora(model, r_max=4, alpha=4.0)
    ids = torch.randint(0, 16, (8, 8), generator=torch.Generator().manual_seed(train_seed))
    examples = [{"input_ids": row, "attention_mask": torch.ones(8, dtype=torch.long), "labels": row} for row in ids]
    config = TrainConfig(**{"r_max": 4, "alpha": 4.0, "epochs": 1, "batch_size": 4, "rank_schedule": (),
                            "sweep_ranks": (), "log_every": 0, "lr": 1e-2, "device": "cpu", **overrides})
    return run_continual(model, [("random", examples, examples[:4])], config, checkpoint_dir=tmp_path / folder,
                         resume=resume)


@pytest.fixture
def finished_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    return tiny_run(tmp_path)


def test_a_finished_checkpoint_resumes_to_the_same_result_without_training(tmp_path, finished_run):
    again = tiny_run(tmp_path, resume=True)
    assert comparable(again) == comparable(finished_run)


def test_a_checkpoint_is_not_overwritten_without_resume(tmp_path, finished_run):
    with pytest.raises(ValueError, match="checkpoint.safetensors' exists; pass resume=True"):
        tiny_run(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"lr": 2e-2}, "different configuration: lr: checkpoint 0.01, now 0.02"),
    ({"dc_mode": "weights"}, "different configuration: dc_mode: checkpoint 'delta', now 'weights'"),
    ({"width": 16}, r"different model \(adapted layers: \[in, out\] features\): transformer.h.0.attn.c_attn: "
                    r"checkpoint \[32, 96\], now \[16, 48\]"),
    ({"train_seed": 2}, r"different data \(domain: examples and content digest\): 0:random"),
])
def test_a_checkpoint_of_another_run_is_refused_naming_the_difference(tmp_path, finished_run, change, message):
    with pytest.raises(CheckpointError, match=message):
        tiny_run(tmp_path, resume=True, **change)


def test_a_truncated_or_altered_checkpoint_is_refused(tmp_path, finished_run):
    path = checkpoint_path(tmp_path / "checkpoints")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read: .*expected a whole safetensors file"):
        tiny_run(tmp_path, resume=True)
    altered = bytearray(data)
    altered[-3] ^= 0x40  # a bit of the last tensor's data
    path.write_bytes(bytes(altered))
    with pytest.raises(CheckpointError, match="is corrupt: its content digest"):
        tiny_run(tmp_path, resume=True)
    path.write_bytes(data)
    tiny_run(tmp_path, resume=True)  # the untouched bytes still load


def test_resume_without_a_checkpoint_starts_afresh_and_writes_no_temporary_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    fresh = tiny_run(tmp_path, folder="a")
    resumed_from_nothing = tiny_run(tmp_path, folder="b", resume=True)
    assert comparable(fresh) == comparable(resumed_from_nothing)
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint.safetensors"]
