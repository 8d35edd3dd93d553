"""The continual study: its scores, its run list, and ``compare --study`` end to end at a tiny size."""

import json

import pytest

from hybrid_lora.cli import main
from hybrid_lora.experiments import device_pool, study
from hybrid_lora.io.atomic import read_json
from hybrid_lora.train.dynamic_rank import DYLORA_MODES


def test_scores_of_an_accuracy_matrix():
    R = [[0.70, 0.60, 0.50],
         [0.66, 0.75, 0.52],
         [0.62, 0.69, 0.80]]
    scores = study.run_scores(R)
    assert scores["average_accuracy"] == pytest.approx((0.62 + 0.69 + 0.80) / 3)
    assert scores["bwt"] == pytest.approx(((0.62 - 0.70) + (0.69 - 0.75)) / 2)
    # Forgetting takes the best accuracy a domain had before the last stage, not the one after its own.
    R[1][0] = 0.72
    assert study.run_scores(R)["forgetting"] == pytest.approx(((0.72 - 0.62) + (0.75 - 0.69)) / 2)
    assert study.run_scores(R)["new_accuracy"] == pytest.approx((0.75 + 0.80) / 2)


def test_one_adapter_per_domain_forgets_nothing_by_construction():
    own = {"embedded-c": 0.8, "embedded-b": 0.7, "embedded-a": 0.6}
    R = study.bound_matrix(own, study.ORDERS["c-b-a"])
    assert R == [[0.8, None, None], [0.8, 0.7, None], [0.8, 0.7, 0.6]]
    scores = study.run_scores(R)
    assert scores["forgetting"] == 0 and scores["bwt"] == 0
    assert scores["average_accuracy"] == pytest.approx(0.7)


def test_the_full_plan_runs_every_arm_on_its_orders_and_the_bound_once_per_domain(tmp_path):
    plan = study.PLANS["full"]
    todo = study.runs(plan, tmp_path, runtime=("--device", "cpu"))
    assert len({run.name for run in todo}) == len(todo)
    bound = [run for run in todo if run.arm == study.PER_DOMAIN]
    assert len(bound) == 3 * len(plan.seeds)  # shared by both orders
    for arm in plan.arms:
        if arm.role == "bound":
            continue
        orders = {run.order for run in todo if run.arm == arm.name}
        assert orders == (set(plan.orders) if arm.every_order else {plan.orders[0]}), arm.name
    roles = {arm.role for arm in plan.arms}
    assert roles == {"method", "baseline", "reference", "bound", "sweep", "ablation"}
    hybrid = next(run for run in todo if run.arm == "hybrid" and run.order == "c-b-a")
    argv = list(hybrid.argv)
    assert argv[argv.index("--domains") + 1:argv.index("--domains") + 4] == list(study.ORDERS["c-b-a"])
    assert "--resume" in argv and argv[-2:] == ["--device", "cpu"]


def test_the_samplers_plan_runs_every_dylora_mode_at_the_quick_studys_size(tmp_path):
    plan, quick = study.PLANS["samplers"], study.PLANS["quick"]
    assert (plan.orders, plan.train_examples, plan.eval_examples) == (quick.orders, quick.train_examples,
                                                                      quick.eval_examples)
    todo = study.runs(plan, tmp_path)
    assert len(todo) == len(plan.arms) * 3
    modes = {}
    for run in todo:
        argv = list(run.argv)
        modes[run.arm] = argv[argv.index("--dylora") + 1] if "--dylora" in argv else None
    assert modes == {"hybrid-nested": "nested", "hybrid-full": "full", "hybrid-log-uniform": "log-uniform",
                     "hybrid-multi-rank": "multi-rank", "hybrid-doubling": "doubling", "lora_only": None}
    assert set(modes.values()) - {None} == set(DYLORA_MODES) - {"off", "frozen"}


class _InProcess:
    """A stand-in for a run's process: the train command runs in this process when first polled."""

    def __init__(self, job):
        self.job, self.code = job, None

    def poll(self):
        if self.code is None:
            try:
                self.code = main(self.job.argv)
            except SystemExit as stop:
                self.code = stop.code
        return self.code

    def terminate(self):
        pass


def test_compare_study_trains_every_run_and_summarises_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HYBRID_LORA_BACKEND", "torch")
    arms = (study.Arm("hybrid", "hybrid", "method"), study.Arm(study.PER_DOMAIN, "lora_only", "bound"),
            study.Arm("hybrid-no-dc", "dy_only", "ablation", (), False))
    monkeypatch.setitem(study.PLANS, "quick", study.Plan("quick", arms, ("a-b-c", "c-b-a"), (7,), 16, 8))
    monkeypatch.setattr(device_pool, "start_here", lambda job, slot: _InProcess(job))
    out = tmp_path / "study"
    assert main(["compare", "--study", "quick", "--out", str(out), "--device", "cpu", "--no-plots"]) == 0
    summary = read_json(out / "study.json")
    table = summary["table"]
    assert set(table) == {"hybrid", study.PER_DOMAIN, "hybrid-no-dc"}
    assert set(table["hybrid-no-dc"]) == {"a-b-c"}  # an ablation runs on the first order only
    for order in ("a-b-c", "c-b-a"):
        metrics = read_json(out / "hybrid" / order / "seed-7" / "metrics.json")
        assert metrics["domains"] == list(study.ORDERS[order])
        expected = study.run_scores(metrics["accuracy"])
        for key, value in expected.items():
            assert table["hybrid"][order][key]["mean"] == pytest.approx(value)
        bound = table[study.PER_DOMAIN][order]
        assert bound["forgetting"]["mean"] == 0
        for i, domain in enumerate(study.ORDERS[order]):
            own = read_json(out / study.PER_DOMAIN / domain / "seed-7" / "metrics.json")["accuracy"][0][0]
            assert bound["accuracy"][-1][i] == pytest.approx(own)
    text = (out / "study.md").read_text()
    assert "#### Order embedded-c -> embedded-b -> embedded-a" in text and "R of hybrid, order" in text
    assert json.loads((out / "command.json").read_text())["plan"] == "quick"
    # A second call keeps every finished run and trains nothing.
    written = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    capsys.readouterr()
    assert main(["compare", "--study", "quick", "--out", str(out), "--device", "cpu", "--no-plots"]) == 0
    assert capsys.readouterr().out.count("finished earlier, kept") == len(written) == 6
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == written
    assert read_json(out / "study.json")["table"] == table


def test_study_refuses_flags_it_sets_itself(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["compare", "--study", "quick", "--variants", "hybrid", "--lr", "0.01"])
    assert stop.value.code == 2
    assert "--study sets its own runs; drop --variants, --lr" in capsys.readouterr().err
