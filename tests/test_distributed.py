"""Data parallel on the CPU (gloo): two processes under torchrun train like one process on the same global batch.

Every multi-process run here is a real ``torchrun --standalone --nproc_per_node 2``
launch; each costs some seconds, so the runs are shared between the tests.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_records_close

from hybrid_lora.experiments.device_pool import Job, run_on_devices, start_job, visible_gpus
from hybrid_lora.train import distributed

# Two-stage runs on a 2-layer GPT-2. argv: result.json, checkpoint folder or "-", mode, settings (comma-separated).
# 21 training examples in global micro-batches of 4: the last has one example, so the second
# process runs a stand-in row that adds nothing. Mode "pause" stops every process for good in
# stage 2 (to be killed) after its first checkpoint there; "resume" continues from the folder.
SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys, time
    import torch
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel
    import hybrid_lora
    from hybrid_lora.train import distributed
    from hybrid_lora.train.config import variant_config
    from hybrid_lora.train.trainer import run_continual

    torch.set_num_threads(1)
    out, folder, mode, settings = sys.argv[1:5]
    distributed.setup("cpu")
    parallel = distributed.current()
    VOCAB, LENGTH = 16, 10
    SETTINGS = {
        # DyLoRA's sampled rank (frozen mode), the ordering penalty, a rank cut 8 -> 4
        "dylora": dict(variant="dy_only", dropout=0.0),
        # the domain-correlation loss against the stage-1 adapter, the ordering penalty, a rank cut
        "dc": dict(variant="hybrid", dylora="off", dropout=0.0),
        # everything, with GPT-2's and LoRA's dropout on
        "dropout": dict(variant="hybrid", dropout=0.1),
    }

    def domain(name, step, seed):
        g = torch.Generator().manual_seed(seed)
        def examples(n):
            ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + step * torch.arange(LENGTH)) % VOCAB
            mask = (torch.arange(LENGTH) < torch.randint(LENGTH // 2, LENGTH + 1, (n, 1), generator=g)).long()
            return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i].masked_fill(mask[i] == 0, -100)}
                    for i in range(n)]
        return name, examples(21), examples(7)

    def train(setting):
        p = setting["dropout"]
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=LENGTH, vocab_size=VOCAB,
                                           bos_token_id=0, eos_token_id=0, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p))
        hybrid_lora.inject_lora(model, r_max=8, alpha=8.0, dropout=p)
        extra = {"dylora": setting["dylora"]} if "dylora" in setting else {}
        config = variant_config(setting["variant"], r_max=8, alpha=8.0, lora_dropout=p, batch_size=4, grad_accum=2,
                                epochs=2, rank_schedule=(8, 4), lr=2e-2, log_every=1, progress=False, device="cpu",
                                checkpoint_every=0 if folder == "-" else 1, **extra)

        def pause(row):
            if mode == "pause" and row["kind"] == "step" and row["stage"] == 1 and row["global_step"] == 9:
                with open(f"{out}.paused{parallel.rank}", "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(600)

        result = run_continual(model, [domain("plus1", 1, 1), domain("plus5", 5, 2)], config, log=pause,
                               checkpoint_dir=None if folder == "-" else folder, resume=mode == "resume")
        result["adapters"] = [t.detach().flatten().tolist() for layer in hybrid_lora.lora_layers(model)
                              for t in (layer.lora_a, layer.lora_b)]
        # What every process must share: the adapters, and torch's generator (the dropout seeds).
        mine = json.dumps(result["adapters"]).encode() + torch.get_rng_state().numpy().tobytes()
        mine = hashlib.sha256(mine).hexdigest()
        everyone = [mine] * parallel.world
        if parallel.world > 1:
            dist.all_gather_object(everyone, mine)
        result["digests"] = everyone
        result["processes"] = parallel.world
        return result

    results = {name: train(SETTINGS[name]) for name in settings.split(",")}
    if parallel.is_main:
        with open(out, "w") as f:
            json.dump(results, f)
    distributed.teardown()
""")

TIMING = {"seconds", "tokens_per_second"}


def environment():
    # The Triton interpreter would take minutes here: the PyTorch path, one thread per process.
    return {**os.environ, "HYBRID_LORA_BACKEND": "torch", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                           os.environ.get("PYTHONPATH", "")])}


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def launch(argv, log):
    # From the repository root, as the README's commands run: the root is then first on sys.path.
    return subprocess.Popen(argv, env=environment(), cwd=Path(__file__).resolve().parents[1], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def finish(process, log, timeout=300):
    process.wait(timeout=timeout)
    assert process.returncode == 0, Path(log).read_text()[-4000:]


def without_timings(result):
    return {**result, "history": [{k: v for k, v in row.items() if k not in TIMING} for row in result["history"]]}


def assert_same_run(got, expected, rel=1e-5, abs_=1e-6):
    """Every figure of two runs equal to fp32 tolerance; counts, ranks, names and the rows' structure exactly."""
    got, expected = without_timings(got), without_timings(expected)
    for key in ("history", "accuracy", "loss", "initial", "rank_sweep", "retention", "bwt", "loss_change"):
        assert_records_close(got[key], expected[key], key, rel, abs_)
    for a, b in zip(got["adapters"], expected["adapters"], strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=rel, atol=abs_)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each setting run by one process and by two under torchrun, both launched at once."""
    folder = tmp_path_factory.mktemp("ddp")
    script = folder / "run.py"
    script.write_text(SCRIPT)
    started = {}
    for nproc in (1, 2):
        out = folder / f"processes-{nproc}.json"
        argv = [sys.executable, str(script)] if nproc == 1 else torchrun(str(script))
        started[nproc] = (launch([*argv, str(out), "-", "plain", "dylora,dc,dropout"], f"{out}.log"), out)
    results = {}
    for nproc, (process, out) in started.items():
        finish(process, f"{out}.log")
        for setting, result in json.loads(out.read_text()).items():
            results[setting, nproc] = result
    return folder, script, results


@pytest.mark.parametrize("setting", ["dylora", "dc"])
def test_two_processes_train_like_one_on_the_same_global_batch(runs, setting):
    _, _, results = runs
    one, two = results[setting, 1], results[setting, 2]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert len(set(two["digests"])) == 1  # both processes end with the same adapters and generator states
    assert_same_run(two, one)
    # The run did what the setting says: 12 optimizer steps, a rank cut in stage 2, the tokens of every batch.
    steps = [row for row in two["history"] if row["kind"] == "step"]
    assert [row["global_step"] for row in steps] == list(range(1, 13))
    assert [row["rank"] for row in two["history"] if row["kind"] == "epoch"] == [8, 8, 8, 4]
    assert two["loss"][1][1] < two["initial"][1]["loss"]  # the adapters moved, towards stage 2's domain


def test_with_dropout_the_processes_agree_but_the_masks_are_their_own(runs):
    """GPT-2's dropout masks are drawn per process for its own rows (torch's dropout on the shape it is given;
    LoRA's are the global batch's, tests/test_dropout_rows.py): every process draws the same seeds, so they
    stay in step, but the second half of the global batch sees other masks than one process gives it."""
    _, _, results = runs
    one, two = results["dropout", 1], results["dropout", 2]
    assert len(set(two["digests"])) == 1
    first_step = [row["train_loss"] for row in two["history"] if row["kind"] == "step"][0]
    assert first_step != pytest.approx([row["train_loss"] for row in one["history"] if row["kind"] == "step"][0],
                                       rel=1e-5)
    assert [len(row) for row in two["loss"]] == [2, 2]


def test_a_process_killed_mid_stage_resumes_under_torchrun_with_the_same_or_another_count(runs, tmp_path):
    folder, script, results = runs
    checkpoints = tmp_path / "checkpoints"
    out = tmp_path / "killed.json"
    paused = launch([*torchrun(str(script)), str(out), str(checkpoints), "pause", "dylora"], tmp_path / "killed.log")
    markers = [Path(f"{out}.paused{rank}") for rank in (0, 1)]
    deadline = time.monotonic() + 240
    while not all(marker.exists() and marker.read_text() for marker in markers):
        assert paused.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "the paused run never reached stage 2"
        time.sleep(0.05)
    os.kill(int(markers[1].read_text()), signal.SIGKILL)  # one worker dies; torchrun ends the other
    paused.wait(timeout=120)
    assert paused.returncode != 0

    from hybrid_lora.train.checkpoint import load_checkpoint

    _, meta = load_checkpoint(checkpoints)
    progress = meta["progress"]
    # Global terms: 6 micro-batches (3 steps) per epoch whatever the process count; step 8 is stage 2's second.
    assert (progress["stage"], progress["epoch"], progress["batch"], progress["global_step"]) == (1, 0, 4, 8)
    other = tmp_path / "checkpoints-one-process"
    shutil.copytree(checkpoints, other)

    same = launch([*torchrun(str(script)), str(tmp_path / "same.json"), str(checkpoints), "resume", "dylora"],
                  tmp_path / "same.log")
    single = launch([sys.executable, str(script), str(tmp_path / "single.json"), str(other), "resume", "dylora"],
                    tmp_path / "single.log")
    finish(same, tmp_path / "same.log")
    finish(single, tmp_path / "single.log")
    for name in ("same", "single"):
        resumed = json.loads((tmp_path / f"{name}.json").read_text())["dylora"]
        assert_same_run(resumed, results["dylora", 2])
        assert_same_run(resumed, results["dylora", 1])


def dropout_free_embedded_model(folder):
    """The embedded GPT-2 with its own dropout (embeddings, attention, residual) set to 0."""
    from hybrid_lora.io.models import EMBEDDED_MODEL_DIR

    shutil.copytree(EMBEDDED_MODEL_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_train_under_torchrun_writes_one_set_of_outputs_with_the_metrics_of_one_process(tmp_path):
    model = dropout_free_embedded_model(tmp_path / "model")
    flags = ["train", "--device", "cpu", "--train-examples", "96", "--eval-examples", "32", "--epochs", "2",
             "--lora-dropout", "0", "--model", str(model), "--no-plots", "--threads", "1"]
    two = launch(torchrun("-m", "hybrid_lora", *flags, "--out", str(tmp_path / "two")), tmp_path / "two.log")
    one = launch([sys.executable, "-m", "hybrid_lora", *flags, "--out", str(tmp_path / "one")], tmp_path / "one.log")
    finish(two, tmp_path / "two.log")
    finish(one, tmp_path / "one.log")
    files = {name: sorted(str(p.relative_to(tmp_path / name)) for p in (tmp_path / name).rglob("*"))
             for name in ("one", "two")}
    assert files["two"] == files["one"]  # one set of outputs, no checkpoint or temporary file left
    assert "seed-42/metrics.json" in files["two"] and "seed-42/adapters/stage2-embedded-b.safetensors" in files["two"]
    one_metrics, two_metrics = (json.loads((tmp_path / name / "seed-42" / "metrics.json").read_text())
                                for name in ("one", "two"))
    for key in ("accuracy", "loss", "initial", "retention", "bwt", "forgetting", "loss_change", "rank_sweep"):
        assert_records_close(two_metrics[key], one_metrics[key], key)
    epochs = [[row[k] for k in ("train_loss", "eval_loss", "eval_accuracy", "tokens", "rank", "steps")]
              for metrics in (one_metrics, two_metrics) for row in metrics["history"] if row["kind"] == "epoch"]
    assert_records_close(epochs[4:], epochs[:4], "epoch rows")
    printed = (tmp_path / "two.log").read_text()
    assert printed.count("stage 2 (embedded-b) epoch 2") == 1  # rank 0 speaks for the group
    config = json.loads((tmp_path / "two" / "seed-42" / "config.json").read_text())
    assert config["processes"] == 2 and config["train_config"]["batch_size"] == 8


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    parallel = distributed.DataParallel(3, 0)
    with pytest.raises(distributed.DistributedError, match=r"--batch-size 8: the global batch is split over 3 "
                                                           r"processes; expected a multiple of 3"):
        parallel.check_batch_size(8, "--batch-size")
    distributed.DataParallel(2, 1).check_batch_size(8)


def test_shards_cover_each_global_micro_batch_once_in_order():
    dataset = [{"input_ids": torch.tensor([i, i]), "attention_mask": torch.ones(2, dtype=torch.long),
                "labels": torch.tensor([i, i])} for i in range(11)]
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    shards = [list(distributed.DataParallel(3, rank).epoch_loader(dataset, order, 1, 6, False)) for rank in range(3)]
    # Global micro-batches from the second on: order[6:11] (5 rows): 1, 2, 2 rows per process.
    rows = [batch["input_ids"][:, 0].tolist() for rank in range(3) for batch in shards[rank]]
    assert sum(rows, []) == order[6:].tolist()
    assert [len(r) for r in rows] == [1, 2, 2]
    # A global micro-batch smaller than the group: the process left out runs a stand-in row with no labels.
    short = [list(distributed.DataParallel(3, rank).epoch_loader(dataset, order, 0, 6, False)) for rank in range(3)]
    last = [batches[-1] for batches in short]
    assert [len(b["input_ids"]) for b in last] == [1, 2, 2]
    alone = list(distributed.DataParallel(4, 0).epoch_loader(dataset[:9], torch.arange(9), 2, 4, False))
    assert alone[0]["input_ids"][:, 0].tolist() == [8] and (alone[0]["labels"] == -100).all()
    assert (list(distributed.DataParallel(4, 3).epoch_loader(dataset[:9], torch.arange(9), 2, 4, False))[0]
            ["labels"] != -100).all()


class FakeProcess:
    def __init__(self, log, job, device, steps):
        self.log, self.job, self.device, self.left = log, job, device, steps
        self.terminated = False

    def poll(self):
        self.left -= 1
        if self.left > 0:
            return None
        self.log.append(("end", self.job.name, self.device))
        return 1 if "bad" in self.job.name else 0

    def terminate(self):
        self.terminated = True


def test_runs_are_spread_over_the_devices_one_at_a_time_each(tmp_path):
    log, durations = [], {"a": 3, "b": 1, "bad": 1, "d": 2, "e": 1}

    def start(job, device):
        assert not any(d == device for _, d in _running(log)), f"GPU {device} given twice"
        log.append(("start", job.name, device))
        return FakeProcess(log, job, device, durations[job.name])

    jobs = [Job(name, ["train"], tmp_path / f"{name}.log") for name in durations]
    codes = run_on_devices(jobs, ["0", "3"], start=start, poll_seconds=0)
    assert codes == {"a": 0, "b": 0, "bad": 1, "d": 0, "e": 0}  # a failure stops nothing else
    starts = [(name, device) for kind, name, device in log if kind == "start"]
    assert [name for name, _ in starts] == ["a", "b", "bad", "d", "e"]  # in order
    assert starts[:2] == [("a", "0"), ("b", "3")]  # both GPUs busy at once
    assert max(len(_running(log[:i])) for i in range(len(log) + 1)) == 2


def _running(log):
    running = set()
    for kind, name, device in log:
        (running.add if kind == "start" else running.discard)((name, device))
    return running


def test_an_interrupted_pool_terminates_its_runs(tmp_path):
    started = []

    def start(job, device):
        started.append(FakeProcess([], job, device, 10**9))
        return started[-1]

    def interrupt(seconds):
        raise KeyboardInterrupt

    jobs = [Job(name, ["train"], tmp_path / "x.log") for name in "abc"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "sleep", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_on_devices(jobs, ["0", "1"], start=start, poll_seconds=1)
    assert [p.terminated for p in started] == [True, True]


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({}, count=3) == ["0", "1", "2"]


def test_compare_on_gpus_runs_each_variant_and_seed_as_a_train_command(tmp_path, monkeypatch, capsys):
    """Two stand-in GPU ids on a CPU machine; the runs are made in this process to keep the test quick."""
    from hybrid_lora import cli
    from hybrid_lora.experiments import device_pool

    class Done:
        def __init__(self, code):
            self.code = code

        def poll(self):
            return self.code

    given = []

    def start_here(job, device):
        given.append((job.argv[:7], device))
        return Done(cli.main(job.argv))

    pool = device_pool.run_on_devices
    monkeypatch.setattr(device_pool, "run_on_devices", lambda jobs, devices, echo: pool(jobs, devices, start_here,
                                                                                           0, echo))
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "compare"
    assert cli.main(["compare", "--variants", "lora_only", "hybrid", "--seeds", "7", "--gpus", "4", "6",
                     "--train-examples", "16", "--eval-examples", "8", "--epochs", "2", "--r-max", "8", "--no-plots",
                     "--device", "cpu", "--max-length", "32", "--out", str(out)]) == 0
    assert given == [(["train", "--variant", variant, "--seeds", "7", "--out", str(out / variant)], device)
                     for variant, device in (("lora_only", "4"), ("hybrid", "6"))]
    for variant in ("lora_only", "hybrid"):
        metrics = json.loads((out / variant / "seed-7" / "metrics.json").read_text())
        assert metrics["variant"] == variant and metrics["config"]["r_max"] == 8 and metrics["config"]["epochs"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == {"lora_only": ["lora_only/seed-7"], "hybrid": ["hybrid/seed-7"]}
    assert "hybrid, seed 7: started on GPU 6" in capsys.readouterr().out


def test_a_run_process_sees_only_its_gpu_and_logs_to_its_file(tmp_path, monkeypatch):
    seen = {}

    def popen(argv, env, stdout, stderr):
        seen.update(argv=argv, visible=env["CUDA_VISIBLE_DEVICES"], log=stdout.name)
        return "process"

    monkeypatch.setattr(subprocess, "Popen", popen)
    job = Job("hybrid, seed 1", ["train", "--seeds", "1"], tmp_path / "logs" / "hybrid-seed-1.log")
    assert start_job(job, "3") == "process"
    assert seen == {"argv": [sys.executable, "-m", "hybrid_lora", "train", "--seeds", "1"], "visible": "3",
                    "log": str(job.log)}
