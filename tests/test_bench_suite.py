"""The whole benchmark harness at toy sizes on the CPU, one timed round: `bench/gpu_check --device cpu --tiny`,
the dry run of what it does on a GPU, runs every step, and its files say what they hold."""

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for `bench`

from bench import report, suite  # noqa: E402
from bench.e2e import PIPELINES  # noqa: E402
from bench.providers import MODES, PROVIDERS, LayerShape, flops  # noqa: E402
from bench.rank_sweep import NO_GPU_NOTE  # noqa: E402
from bench.record import parse_dtype, read_csv  # noqa: E402

CONFIG = suite.tiny_config()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run([str(ROOT / "bench" / "gpu_check"), "--device", "cpu", "--tiny", "--out-dir", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, \
        f"bench/gpu_check --device cpu --tiny failed:\n{run.stdout[-4000:]}\n{run.stderr[-3000:]}"
    (csv_path,) = [p for p in out.glob("*.csv") if p.stem.endswith(suite.utc_now()[:10])]
    result = {"out": out, "csv": csv_path, "md": csv_path.with_suffix(".md"),
              "steps": csv_path.with_name(f"{csv_path.stem}-steps.csv")}
    rows = read_csv(result["csv"])
    return result, {bench: [row for row in rows if row["bench"] == bench] for bench in suite.STEPS}


def _qlora_importable():
    return all(importlib.util.find_spec(name) is not None for name in ("bitsandbytes", "peft"))


def test_gpu_check_records_every_step_and_writes_no_absolute_path(tiny_run):
    result, _ = tiny_run
    steps = {row["step"]: row["status"] for row in read_csv(result["out"] / "gpu_check.csv")}
    qlora = "ok" if _qlora_importable() else "skipped: bitsandbytes or peft is not installed (pip install -e '.[qlora]')"
    assert steps == {"precompile": "skipped: needs CUDA", "tests": "skipped: needs CUDA", "suite": "ok",
                     "host_overhead": "ok", "compile_counts": "ok", "qlora": qlora, "report": "ok", "serving": "ok"}
    assert [row["provider"] for row in read_csv(result["out"] / "host-overhead.csv")] == [
        "plain", "peft", "ours", "peft+accelerate"] * 2  # LoRA dropout 0 and 0.1
    suite_steps = {row["step"]: row["status"] for row in read_csv(result["steps"])}
    # compile_counts runs as a step of gpu_check's own, under its own time limit
    assert suite_steps == {"layer": "ok", "rank_sweep": "ok", "memory": "ok", "e2e": "ok", "checkpointing": "ok",
                           "compile_counts": "skipped", "report": "skipped"}
    local = [str(ROOT), str(result["out"]), sys.prefix, os.path.expanduser("~") + "/"]
    for path in result["out"].rglob("*"):
        if path.is_file() and path.suffix != ".png":
            text = path.read_text()
            assert not [p for p in local if p in text], f"{path.name} holds a path of this machine"


def test_compile_counts_step_writes_its_row_at_its_target(tiny_run):
    result, rows = tiny_run
    assert rows["compile_counts"] == []  # not in the suite's file: gpu_check runs it on its own
    (row,) = read_csv(result["out"] / "compile-counts.csv")
    assert row["steps"] == "4" and row["widths"] == "2" and row["compile_mode"] == "aot_eager"
    # Exactly one graph per adapter width: more is a recompile the design forbids, fewer a graph replayed
    # for a width it was not compiled for. No CUDA graph off CUDA.
    assert row["graphs"] == row["target_graphs"] == "2"
    assert row["recordings"] == row["target_recordings"] == "0" and row["device"]


def test_layer_rows_cover_every_provider_and_mode_and_agree_with_themselves(tiny_run):
    _, rows = tiny_run
    layer = rows["layer"]
    assert {(row["provider"], row["mode"]) for row in layer} == {(p, m) for p in PROVIDERS for m in MODES}
    # GPT-2's shape in Conv1D's weight layout, and the Llama-like shapes in nn.Linear's.
    assert {(int(row["K"]), int(row["N"]), row["weight_layout"]) for row in layer} == {
        (CONFIG.K, CONFIG.N, "in_out"), *((K, N, "out_in") for K, N in CONFIG.linear_shapes)}
    base = {(row["K"], row["N"], row["mode"]): float(row["median_ms"]) for row in layer if row["provider"] == "base"}
    for row in layer:
        assert row["status"] == "ok", row
        median, p20, p80 = float(row["median_ms"]), float(row["p20_ms"]), float(row["p80_ms"])
        assert 0 < p20 <= median <= p80
        # the file holds the ratio to 6 decimal places
        assert float(row["ratio_to_base"]) == pytest.approx(median / base[row["K"], row["N"], row["mode"]],
                                                            rel=1e-4, abs=5e-7)
        shape = LayerShape(int(row["M"]), int(row["K"]), int(row["N"]), max(1, int(row["r"])),
                           parse_dtype(row["dtype"]))
        assert float(row["tflops"]) == pytest.approx(flops(row["provider"], shape, row["mode"]) / median / 1e9,
                                                     rel=1e-4)
        assert float(row["gbps"]) > 0
        assert "CPU" in row["timer"] and row["device"].startswith("CPU")
        assert row["commit"] and row["date"]


def test_rank_sweep_predicts_variants_and_leaves_compile_counting_to_a_gpu(tiny_run):
    _, rows = tiny_run
    sweep = {int(row["r"]): row for row in rows["rank_sweep"]}
    assert sorted(sweep) == sorted(CONFIG.sweep_ranks)
    for row in sweep.values():
        assert row["note"] == NO_GPU_NOTE and math.isnan(float(row["compiled_variants"]))
        assert float(row["median_ms"]) > 0
    # The rank is read on the device: every rank of the sweep (one adapter width) shares the variants of r = 1.
    assert int(sweep[1]["predicted_variants"]) == int(sweep[2]["predicted_variants"]) > 0
    assert int(sweep[17]["predicted_variants"]) == int(sweep[2]["predicted_variants"])


def test_memory_rows_hold_the_fused_bound_with_dropout_on(tiny_run):
    _, rows = tiny_run
    by = {row["provider"]: row for row in rows["memory"]}
    assert set(by) == set(PROVIDERS)
    assert float(by["fused"]["dropout"]) > 0
    assert 0 < int(by["fused"]["saved_bytes"]) <= int(by["fused"]["x_plus_s_bytes"])
    assert int(by["peft"]["saved_bytes"]) > int(by["fused"]["saved_bytes"])


def test_checkpointing_rows_give_both_steps_of_the_e2e_model_the_same_gradients(tiny_run):
    _, rows = tiny_run
    got = [(int(row["seq_len"]), row["checkpointing"], float(row["max_grad_diff"])) for row in rows["checkpointing"]]
    assert got == [(seq, on, 0.0) for seq in CONFIG.training.seq_lens for on in ("False", "True")]


def test_e2e_rows_time_every_pipeline_and_project_a_stage(tiny_run):
    _, rows = tiny_run
    e2e = {row["pipeline"]: row for row in rows["e2e"]}
    assert set(e2e) == set(PIPELINES)
    for row in e2e.values():
        assert row["status"] == "ok", row
        step_s = float(row["step_ms"]) / 1e3
        assert float(row["tokens_per_s"]) == pytest.approx(int(row["batch"]) * int(row["seq_len"]) / step_s,
                                                           rel=1e-3)
        assert float(row["projected_stage_s"]) == pytest.approx(CONFIG.training.stage_steps * step_s, rel=1e-3)
    assert float(e2e["original"]["speedup_vs_original"]) == 1.0


def test_report_says_cpu_timings_and_draws_the_plots(tiny_run):
    result, _ = tiny_run
    text = Path(result["md"]).read_text()
    assert "**CPU timings**" in text
    for heading in ("## Targets", "## Layer microbenchmarks", "## Rank sweep", "## Saved activations",
                    "## End-to-end training", "## Activation checkpointing"):
        assert heading in text
    assert "n/a: CPU timing" in text  # speed targets are not judged on a CPU
    pytest.importorskip("matplotlib")
    for name in ("layer", "rank-sweep", "e2e"):
        png = Path(result["md"]).with_name(f"{Path(result['md']).stem}-{name}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_readme_section_says_plainly_when_no_gpu_result_exists(tmp_path, tiny_run):
    result, _ = tiny_run
    (tmp_path / Path(result["csv"]).name).write_bytes(Path(result["csv"]).read_bytes())  # a CPU result only
    assert report.readme_section(tmp_path).startswith("No GPU result has been committed yet")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nold\n{report.END}\ntail\n")
    report.update_readme(readme, tmp_path)
    assert "No GPU result" in readme.read_text() and "old" not in readme.read_text()
    assert readme.read_text().endswith(f"{report.END}\ntail\n")


def test_gpu_check_dry_run_lists_its_steps():
    out = subprocess.run([str(ROOT / "bench" / "gpu_check"), "--dry-run"], capture_output=True, text=True,
                         check=True).stdout
    steps = out.splitlines()
    assert len(steps) == 8
    assert "bench.suite --precompile-only" in steps[0]  # the compile cache first: the tests autotune
    assert "tests/test_bench_gpu.py" in steps[1]
    assert "-m bench.suite" in steps[2] and "--skip precompile compile_counts report" in steps[2]
    assert "-m bench.host_overhead" in steps[3] and "host-overhead.csv" in steps[3]
    assert "-m bench.compile_counts" in steps[4] and "compile-counts.csv" in steps[4]
    assert "-m bench.report" in steps[5]
    assert "-m bench.serving" in steps[6]
    assert "-m bench.qlora" in steps[7] and "qlora.csv" in steps[7]


def test_gpu_check_splits_into_calls_that_share_one_folder(tmp_path):
    """--only runs the steps named and keeps an earlier call's rows of the others; the dry run lists those."""
    gpu_check = str(ROOT / "bench" / "gpu_check")
    listed = subprocess.run([gpu_check, "--dry-run", "--only", "qlora", "serving"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    assert [line.split(":")[0] for line in listed] == ["7. serving", "8. qlora"]
    (tmp_path / "gpu_check.csv").write_text("step,status,exit_code,seconds,limit_s,log\n"
                                            "suite,ok,0,90,110,logs/suite.log\nreport,failed,1,3,10,logs/report.log\n")
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run([gpu_check, "--device", "cpu", "--tiny", "--out-dir", str(tmp_path), "--only", "report"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1  # no suite results in the folder to report
    rows = read_csv(tmp_path / "gpu_check.csv")
    assert [(row["step"], row["status"]) for row in rows] == [("suite", "ok"),
                                                               ("report", "skipped: the suite wrote no results")]
    for argv, message in ((["--only", "layer"], "--only layer: expected steps of precompile tests suite"),
                          (["--only", "qlora", "--skip", "serving"], "expected one of the two")):
        refused = subprocess.run([gpu_check, "--dry-run", *argv], capture_output=True, text=True)
        assert refused.returncode == 2 and message in refused.stderr


def test_a_failing_step_is_recorded_and_the_others_still_write_their_rows(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("memory step broken on purpose")

    monkeypatch.setattr(suite.memory, "run", broken)
    skip = ("layer", "rank_sweep", "checkpointing", "compile_counts", "report")
    result = suite.run(suite.tiny_config(), torch.device("cpu"), tmp_path, skip=skip, log=lambda *args: None)
    assert result["failed"] == ["memory"]
    steps = {row["step"]: row["status"] for row in read_csv(result["steps"])}
    assert steps["memory"] == "error: RuntimeError: memory step broken on purpose"
    assert steps["e2e"] == "ok" and steps["layer"] == "skipped"
    assert {row["bench"] for row in read_csv(result["csv"])} == {"e2e"}  # the step after the failure ran


def test_gpu_check_records_a_step_out_of_time_and_exits_nonzero(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "SUITE_LIMIT": "1"}
    run = subprocess.run([str(ROOT / "bench" / "gpu_check"), "--device", "cpu", "--tiny", "--out-dir", str(tmp_path),
                          "--skip", "host_overhead", "compile_counts", "serving", "qlora"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 1
    with open(tmp_path / "gpu_check.csv", newline="") as f:
        steps = {row["step"]: row for row in csv.DictReader(f)}
    assert steps["suite"]["status"] == "out of time" and steps["suite"]["limit_s"] == "1"
    assert steps["report"]["status"].startswith("skipped")
    assert steps["compile_counts"]["status"] == "skipped: --skip compile_counts"
    assert (tmp_path / "logs" / "suite.log").exists()
    assert "FAILED: suite report" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_full_sizes_without_cuda():
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable}
    result = subprocess.run([str(ROOT / "bench" / "gpu_check")], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "--device cpu --tiny" in result.stderr
