"""Damaged adapter and checkpoint files: a few hundred seeded corruptions of real files each. None crashes the
process and none loads silently: each is refused with the file named, or loads exactly what was written (a
change the reader cannot see, such as a space in the header's padding turned into a tab)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

FUZZ = textwrap.dedent("""
    import json, random, re, sys
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    import hybrid_lora
    from hybrid_lora.io.adapter_files import read_adapter, save_adapter
    from hybrid_lora.train.checkpoint import load_checkpoint
    from hybrid_lora.errors import UserError
    from hybrid_lora.train.config import TrainConfig
    from hybrid_lora.train.trainer import run_continual

    folder, per_file = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=8, vocab_size=16,
                                       bos_token_id=0, eos_token_id=0))
    hybrid_lora.inject_lora(model, r_max=4, alpha=4.0)
    ids = torch.randint(0, 16, (8, 8), generator=torch.Generator().manual_seed(1))
    examples = [{"input_ids": r, "attention_mask": torch.ones(8, dtype=torch.long), "labels": r} for r in ids]
    config = TrainConfig(r_max=4, alpha=4.0, epochs=1, batch_size=4, rank_schedule=(), sweep_ranks=(), log_every=0,
                         lr=1e-2, device="cpu")
    # A real checkpoint (written at the end of the run's stage) and the adapters of the trained model.
    from hybrid_lora.train import checkpointer
    saved = {}
    original_save = checkpointer.save_checkpoint
    def keep(directory, tensors, metadata):
        path = original_save(directory, tensors, metadata)
        saved["bytes"] = path.read_bytes()
        return path
    checkpointer.save_checkpoint = keep
    run_continual(model, [("random", examples, examples[:4])], config, checkpoint_dir=folder + "/ckpt")
    adapter_path = folder + "/adapter.safetensors"
    save_adapter(model, adapter_path, "embedded")

    def canonical(loaded):
        tensors, metadata = loaded
        return ({k: (v.dtype, tuple(v.shape), v.numpy().tobytes()) for k, v in tensors.items()},
                json.dumps(metadata, sort_keys=True))

    def corruptions(data, rng):
        header_end = 8 + int.from_bytes(data[:8], "little")
        for i in range(per_file):
            b = bytearray(data)
            kind = i % 7
            if kind == 0:  # one bit, in the header
                at = rng.randrange(0, header_end)
                b[at] ^= 1 << rng.randrange(8)
            elif kind == 1:  # one bit, anywhere
                at = rng.randrange(len(b))
                b[at] ^= 1 << rng.randrange(8)
            elif kind == 2:  # truncated
                b = b[:rng.randrange(len(b))]
            elif kind == 3:  # a header length that lies
                length = rng.choice([rng.randrange(1 << 64), max(0, header_end - 8 + rng.randint(-16, 16)),
                                     len(b) + rng.randrange(1 << 20)])
                b[:8] = length.to_bytes(8, "little")
            elif kind == 4:  # a shape or offset that lies: one digit of one number in the header changed
                numbers = [m for m in re.finditer(rb"[0-9]+", bytes(b[8:header_end]))]
                m = rng.choice(numbers)
                at = 8 + rng.randrange(m.start(), m.end())
                b[at] = ord(str((int(chr(b[at])) + rng.randrange(1, 10)) % 10))
            elif kind == 5:  # bytes inserted or removed in the middle
                at = rng.randrange(8, len(b))
                if rng.random() < 0.5:
                    b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
                else:
                    del b[at:at + rng.randint(1, 8)]
            else:  # garbage appended
                b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            yield kind, bytes(b)

    def fuzz(name, data, path, load):
        original = canonical(load())
        rng = random.Random(name)
        refused, same, silent = 0, 0, []
        for kind, corrupted in corruptions(data, rng):
            if corrupted == data:
                continue
            with open(path, "wb") as f:
                f.write(corrupted)
            try:
                loaded = load()
            except UserError as err:
                message = str(err)
                assert path in message and "\\n" not in message, message
                refused += 1
                continue
            if canonical(loaded) == original:
                same += 1
            else:
                silent.append(kind)
        with open(path, "wb") as f:
            f.write(data)
        return {"refused": refused, "same": same, "silent": silent}

    adapter_bytes = open(adapter_path, "rb").read()
    report = {
        "adapter": fuzz("adapter", adapter_bytes, adapter_path, lambda: read_adapter(adapter_path)),
        "checkpoint": fuzz("checkpoint", saved["bytes"], folder + "/ckpt/checkpoint.safetensors",
                           lambda: load_checkpoint(folder + "/ckpt")),
    }
    print(json.dumps(report))
""")


@pytest.mark.parametrize("per_file", [300])
def test_corrupted_adapters_and_checkpoints_are_refused_never_loaded_or_crashing(tmp_path, per_file):
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ)
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(per_file)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HYBRID_LORA_BACKEND": "torch",
                                                       "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]  # a crash (a signal, an uncaught panic) fails here
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name, counts in report.items():
        assert counts["silent"] == [], (name, counts)
        assert counts["refused"] >= 0.9 * per_file, (name, counts)
