"""The hybrid-lora command line on the embedded default, at a tiny budget, offline, on the PyTorch path."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from hybrid_lora.cli import main
from hybrid_lora.experiments import plots
from hybrid_lora.experiments.summary import mean_std
from hybrid_lora.train.config import TrainConfig
from hybrid_lora.versions import source_revision


def _default(name):
    return TrainConfig.__dataclass_fields__[name].default

TINY = ["--train-examples", "16", "--eval-examples", "8", "--epochs", "2", "--r-max", "8", "--batch-size", "8",
        "--eval-batch-size", "8", "--log-every", "1", "--backend", "torch", "--device", "cpu"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny hybrid run of both stages on the embedded default (shared by the tests that read its outputs)."""
    out = tmp_path_factory.mktemp("train")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HYBRID_LORA_BACKEND", "torch")
    try:
        assert main(["train", *TINY, "--out", str(out)]) == 0
    finally:
        mp.undo()
    return out / "seed-42"


def test_train_writes_config_metrics_adapters_and_plots(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert config["variant"] == "hybrid" and config["seed"] == 42
    assert config["versions"]["commit"] == source_revision()
    assert config["data"]["domains"] == ["embedded-a", "embedded-b"]
    assert config["data_sizes"] == {"embedded-a": {"train": 16, "eval": 8}, "embedded-b": {"train": 16, "eval": 8}}
    train_config = config["train_config"]
    # The tiny flags were applied, the defaults kept for the rest: the embedded base's own lr.
    assert train_config["r_max"] == 8 and train_config["epochs"] == 2
    assert train_config["alpha"] == 32.0 and train_config["lora_dropout"] == 0.05 and train_config["lr"] == 1e-3
    assert train_config["lambda_order"] == 1e-4 and train_config["lambda_dc"] == _default("lambda_dc")
    assert train_config["dylora"] == _default("dylora") and train_config["rank_schedule"] == [8, 4]
    assert train_config["scale_rule"] == _default("scale_rule")
    # Portable: the model by its name and the command without the program's path on this machine.
    assert config["model"] == train_config["model_name"] == metrics["config"]["model_name"] == "embedded"
    assert config["command"][0] == "hybrid-lora" and config["preset"] == "default"

    assert metrics["domains"] == ["embedded-a", "embedded-b"]
    assert len(metrics["accuracy"]) == 2 and all(len(row) == 2 for row in metrics["accuracy"])
    assert len(metrics["retention"]) == 1 and metrics["bwt"] is not None
    acc = metrics["accuracy"]
    assert metrics["forgetting"] == [pytest.approx(acc[0][0] - acc[1][0])]
    epochs = [row for row in metrics["history"] if row["kind"] == "epoch"]
    assert [(row["stage"], row["epoch"], row["rank"]) for row in epochs] == [(0, 0, 8), (0, 1, 8), (1, 0, 8), (1, 1, 4)]
    assert all(0.0 <= row["eval_accuracy"] <= 1.0 and row["eval_loss"] > 0 for row in epochs)
    assert any(row["kind"] == "step" for row in metrics["history"])
    # Four layers of 128 -> 384: r * 4 * (128 + 384) trainable parameters at rank r.
    assert metrics["params_per_rank"]["4"] == 4 * 4 * (128 + 384)
    assert metrics["params_per_rank"]["8"] == 8 * 4 * (128 + 384)
    sweeps = metrics["rank_sweep"]
    assert sorted(int(r) for r in sweeps[0]["by_rank"]) == [1, 2, 4, 8]
    assert sorted(int(r) for r in sweeps[1]["by_rank"]) == [1, 2, 4]  # stage 2 ends at rank 4
    assert metrics["wall_seconds"] > 0 and metrics["tokens_per_second"] > 0 and metrics["train_tokens"] > 0
    assert metrics["adapters"] == ["adapters/stage1-embedded-a.safetensors", "adapters/stage2-embedded-b.safetensors"]
    for name in metrics["adapters"]:
        assert (trained_run / name).is_file()
    if plots.have_matplotlib():
        assert sorted(metrics["plots"]) == ["rank-sweep.png", "stage1-embedded-a-history.png",
                                            "stage2-embedded-b-history.png"]
        for name in metrics["plots"]:
            assert (trained_run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(trained_run.rglob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    # Written through a private temporary file, yet given the mode a plain open() gives.
    assert (trained_run / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_eval_sweeps_a_saved_adapter_and_matches_the_run(trained_run, tmp_path, capsys):
    adapter = trained_run / "adapters" / "stage1-embedded-a.safetensors"
    out = tmp_path / "eval.json"
    assert main(["eval", str(adapter), "--sweep", "2", "8", "--domains", "embedded-a", "--eval-examples", "8",
                 "--backend", "torch", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    metrics = json.loads((trained_run / "metrics.json").read_text())
    by_rank = results["by_domain"]["embedded-a"]
    assert set(by_rank) == {"2", "8"}
    # The stage-1 adapter at full rank is what the run measured on domain A right after stage 1.
    assert by_rank["8"]["accuracy"] == pytest.approx(metrics["accuracy"][0][0], abs=1e-12)
    assert by_rank["8"]["loss"] == pytest.approx(metrics["loss"][0][0], rel=1e-9)
    assert by_rank["2"]["loss"] == pytest.approx(metrics["rank_sweep"][0]["by_rank"]["2"]["loss"], rel=1e-6)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(adapter), "--rank", "9", "--eval-examples", "8"])
    assert exit_info.value.code == 2
    assert "--rank: rank 9 is outside [1, 8] (r_max)" in capsys.readouterr().err


def test_resume_keeps_a_finished_run(trained_run, capsys):
    metrics = trained_run / "metrics.json"
    before = metrics.stat().st_mtime_ns
    assert main(["train", *TINY, "--out", str(trained_run.parent), "--resume", "--no-plots"]) == 0
    assert "finished earlier, kept" in capsys.readouterr().out
    assert metrics.stat().st_mtime_ns == before
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--lr", "2e-3", "--out", str(trained_run.parent), "--resume", "--no-plots"])
    assert exit_info.value.code == 2
    assert "was trained with other settings (lr)" in capsys.readouterr().err
    assert metrics.stat().st_mtime_ns == before


def test_resume_keeps_a_run_trained_before_a_setting_existed(trained_run, tmp_path, capsys):
    """A setting added since (unset: None) is absent from an older run's config.json; that run is kept."""
    out = tmp_path / "older"
    shutil.copytree(trained_run, out / trained_run.name)
    config = json.loads((out / trained_run.name / "config.json").read_text())
    assert config["train_config"].pop("load_in_4bit") is None
    (out / trained_run.name / "config.json").write_text(json.dumps(config))
    assert main(["train", *TINY, "--out", str(out), "--resume", "--no-plots"]) == 0
    assert "finished earlier, kept" in capsys.readouterr().out


def test_compare_writes_a_mean_and_std_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)  # the path without matplotlib
    out = tmp_path / "compare"
    assert main(["compare", "--variants", "lora_only", "hybrid", "--seeds", "1", "2", *TINY, "--epochs", "1",
                 "--sweep-ranks", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(plots.NO_MATPLOTLIB) >= 1
    assert not list(out.rglob("*.png"))
    summary = json.loads((out / "summary.json").read_text())
    runs = {v: [json.loads((out / v / f"seed-{s}" / "metrics.json").read_text()) for s in (1, 2)]
            for v in ("lora_only", "hybrid")}
    for variant, (one, two) in runs.items():
        cell = summary["table"][variant]["forgetting"]
        expected = mean_std([one["summary"]["forgetting"], two["summary"]["forgetting"]])
        assert cell["mean"] == pytest.approx(expected["mean"]) and cell["std"] == pytest.approx(expected["std"])
    assert runs["lora_only"][0]["config"]["lambda_dc"] == 0.0 and runs["hybrid"][0]["config"]["lambda_dc"] == 0.3
    table = (out / "summary.md").read_text()
    assert "| lora_only | 2 |" in table and "| hybrid | 2 |" in table and " ± " in table


def test_preset_original_runs_the_original_settings_and_a_given_flag_wins(tmp_path):
    out = tmp_path / "original"
    assert main(["train", *TINY, "--epochs", "1", "--preset", "original", "--lambda-dc", "0.5", "--sweep-ranks",
                 "--no-plots", "--out", str(out)]) == 0
    config = json.loads((out / "seed-42" / "config.json").read_text())
    train_config = config["train_config"]
    assert config["preset"] == "original"
    assert (train_config["dylora"], train_config["scale_rule"], train_config["lr"]) == ("frozen", "alpha/r", 5e-5)
    assert train_config["lambda_order"] == 1e-4 and train_config["lambda_dc"] == 0.5
    metrics = json.loads((out / "seed-42" / "metrics.json").read_text())
    assert metrics["history"][-1]["domain_correlation"] is not None  # the three-term loss ran in Stage 2


@pytest.mark.parametrize("argv, message", [
    (["--rank-schedule", "8", "16"], "rank 16 is outside [1, 8] (r_max)"),
    (["--domains", "embedded-a", "imbd"], "unknown dataset 'imbd'"),
    (["--domains", "/no/such/file.jsonl"], "dataset file '/no/such/file.jsonl' does not exist"),
    (["--model", "./no-such-checkpoint"], "model folder './no-such-checkpoint' does not exist"),
    (["--variant", "hybird"], "invalid choice: 'hybird'"),
    (["--sweep-ranks", "3", "99"], "rank 99 is outside [1, 8]"),
    (["--epochs", "0"], "'0': expected an integer >= 1"),
    (["--seeds", "7", "7"], "--seeds [7, 7]: a seed is repeated"),
])
def test_bad_flags_exit_2_naming_the_value(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--out", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing is written before the flags are checked


def test_python_dash_m_is_the_same_command_and_exits_2():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "hybrid_lora", "train", "--domains", "imbd"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "unknown dataset 'imbd'" in done.stderr
    assert done.stderr.startswith("usage: hybrid-lora train")


def test_mean_std_is_the_sample_standard_deviation():
    stats = mean_std([1.0, 2.0, 3.0, 4.0, None])
    assert stats["mean"] == 2.5 and stats["values"] == [1.0, 2.0, 3.0, 4.0]
    assert stats["std"] == pytest.approx((5.0 / 3.0) ** 0.5)
    assert mean_std([0.7])["std"] is None


def test_forgetting_and_the_run_summary_of_known_matrices():
    from hybrid_lora.experiments.run import forgetting, run_summary

    accuracy = [[0.80, 0.50], [0.60, 0.90]]
    loss = [[1.0, 2.0], [1.5, 0.7]]
    assert forgetting(accuracy) == [pytest.approx(0.20)]
    summary = run_summary({"domains": ["a", "b"], "accuracy": accuracy, "loss": loss, "retention": [0.75],
                           "bwt": -0.2, "forgetting": forgetting(accuracy), "loss_change": [0.5],
                           "wall_seconds": 3.0})
    assert summary["acc_a_own"] == 0.80 and summary["acc_a_final"] == 0.60 and summary["acc_b_final"] == 0.90
    assert summary["loss_a_final"] == 1.5 and summary["loss_b_final"] == 0.7
    assert summary["forgetting"] == pytest.approx(0.20) and summary["retention"] == 0.75


def test_resume_continues_an_interrupted_run_to_the_same_metrics(trained_run, tmp_path, monkeypatch, capsys):
    from hybrid_lora.experiments import run as experiment

    class Interrupted(Exception):
        pass

    def interrupt_in_stage_2(row):
        if row["stage"] == 1:
            raise Interrupted
        return "row"

    out = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(experiment, "format_row", interrupt_in_stage_2)
        with pytest.raises(Interrupted):
            main(["train", *TINY, "--out", str(out), "--no-plots"])
    run_dir = out / "seed-42"
    assert (run_dir / "checkpoint.safetensors").is_file() and not (run_dir / "metrics.json").exists()
    capsys.readouterr()
    assert main(["train", *TINY, "--out", str(out), "--no-plots", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "stage 2 (embedded-b) epoch 2" in printed and "stage 1 (embedded-a)" not in printed  # continued
    resumed = json.loads((run_dir / "metrics.json").read_text())
    whole = json.loads((trained_run / "metrics.json").read_text())
    assert resumed["accuracy"] == whole["accuracy"] and resumed["loss"] == whole["loss"]
    assert resumed["adapters"] == whole["adapters"]
    assert not (run_dir / "checkpoint.safetensors").exists()


def test_user_errors_are_one_line_and_internal_errors_keep_their_traceback(tmp_path, monkeypatch, capsys):
    from hybrid_lora.cli import train as train_verb

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--domains", str(empty), "embedded-b", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"hybrid-lora train: error: dataset file {str(empty)!r} holds no text " \
                                           "(0 bytes); expected one example per line"

    def broken(*args, **kwargs):
        raise RuntimeError("a fault of the program")

    monkeypatch.setattr(train_verb, "prepare_domains", broken)
    with pytest.raises(RuntimeError, match="a fault of the program"):  # not turned into a user error
        main(["train", *TINY, "--out", str(tmp_path / "run")])
