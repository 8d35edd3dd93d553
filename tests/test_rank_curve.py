"""The rank-quality curve: gain kept per rank and its AURAC, against values worked out by hand."""

import math

import pytest

from hybrid_lora.experiments import study
from hybrid_lora.experiments.summary import aggregate, curve_columns, curve_summary, markdown_table
from hybrid_lora.train.rank_curve import aurac, gain_kept, rank_curves, stage_curve


def test_gain_kept_is_the_share_of_the_full_ranks_gain_for_loss_and_for_accuracy():
    assert gain_kept(1.0, 0.8, 0.6) == pytest.approx(0.5)  # loss: 0.2 of the 0.4 gained
    assert gain_kept(1.0, 0.6, 0.6) == 1.0
    assert gain_kept(1.0, 1.1, 0.6) == pytest.approx(-0.25)  # worse than the base: a negative gain
    assert gain_kept(1.0, 0.5, 0.6) == pytest.approx(1.25)  # better than the full rank
    assert gain_kept(0.5, 0.6, 0.7) == pytest.approx(0.5)  # accuracy: up 0.1 of the 0.2 gained
    assert gain_kept(0.5, 0.4, 0.7) == pytest.approx(-0.5)


def test_no_gain_at_the_full_rank_gives_none_not_a_division_by_zero():
    assert gain_kept(0.9, 0.8, 0.9) is None
    assert gain_kept(0.9, 0.9, 0.9) is None
    assert aurac([1, 2], [None, None]) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, True, "0.5"])
def test_gain_kept_names_a_value_that_is_not_a_finite_number(bad):
    with pytest.raises(ValueError, match="gain_kept: value=.*expected a finite number"):
        gain_kept(1.0, bad, 0.5)


def test_aurac_is_the_trapezoid_area_over_log2_rank_normalised_by_the_span():
    # x = 0, 1, 2; area = 1 * (-0.25 + 0.5) / 2 + 1 * (0.5 + 1) / 2 = 0.875; span 2
    assert aurac([1, 2, 4], [-0.25, 0.5, 1.0]) == pytest.approx(0.4375)
    assert aurac([1, 2, 4, 8], [1.0, 1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert aurac([1, 64], [0.0, 0.0]) == 0.0
    # a final rank that is no power of two: x = 0, 2, log2 6
    span = math.log2(6)
    assert aurac([1, 4, 6], [0.0, 0.5, 1.0]) == pytest.approx((2 * 0.25 + (span - 2) * 0.75) / span)
    assert aurac([16], [0.7]) == 0.7  # one rank: its own gain kept
    # the span, not the number of ranks, normalises: a rank 2 between 1 and 4 on a straight line changes nothing
    assert aurac([1, 4], [0.0, 1.0]) == pytest.approx(aurac([1, 2, 4], [0.0, 0.5, 1.0]))


@pytest.mark.parametrize("ranks, gains, message", [
    ([2, 1], [0.0, 1.0], "strictly increasing"),
    ([1, 1], [0.0, 1.0], "strictly increasing"),
    ([0, 1], [0.0, 1.0], "strictly increasing"),
    ([1, 2], [1.0], "2 ranks and 1 gains"),
    ([], [], "0 ranks and 0 gains"),
])
def test_aurac_rejects_ranks_it_cannot_place(ranks, gains, message):
    with pytest.raises(ValueError, match=message):
        aurac(ranks, gains)


def toy_metrics():
    """Two stages: on A rank 1 is worse than the base; on B the full rank's loss equals the base's."""
    return {
        "domains": ["a", "b"],
        "initial": [{"loss": 1.0, "accuracy": 0.5}, {"loss": 2.0, "accuracy": 0.2}],
        "rank_sweep": [
            {"stage": 0, "domain": "a", "by_rank": {"1": {"loss": 1.1, "accuracy": 0.45},
                                                     "2": {"loss": 0.8, "accuracy": 0.6},
                                                     "4": {"loss": 0.6, "accuracy": 0.7}}},
            {"stage": 1, "domain": "b", "by_rank": {"1": {"loss": 2.1, "accuracy": 0.25},
                                                     "2": {"loss": 2.0, "accuracy": 0.3}}},
        ],
    }


def test_the_curves_of_a_run_with_a_rank_worse_than_the_base_and_a_stage_that_gained_nothing():
    a, b = rank_curves(toy_metrics())
    assert (a["stage"], a["domain"], a["ranks"], a["full_rank"]) == (0, "a", [1, 2, 4], 4)
    assert a["loss_gain_kept"] == pytest.approx([-0.25, 0.5, 1.0])
    assert a["loss_aurac"] == pytest.approx(0.4375) and a["loss_worst_gain_kept"] == pytest.approx(-0.25)
    assert a["accuracy_gain_kept"] == pytest.approx([-0.25, 0.5, 1.0])  # (0.5 - 0.45) / (0.5 - 0.7)
    assert b["loss_gain_kept"] == [None, None]  # no loss gained at the full rank
    assert b["loss_aurac"] is None and b["loss_worst_gain_kept"] is None
    assert b["accuracy_gain_kept"] == pytest.approx([0.5, 1.0]) and b["accuracy_aurac"] == pytest.approx(0.75)
    assert stage_curve({"loss": 1.0, "accuracy": 0.5}, {4: {"loss": 0.6, "accuracy": 0.7}})["loss_aurac"] == 1.0
    with pytest.raises(ValueError, match="empty rank sweep and no full-rank evaluation"):
        stage_curve({"loss": 1.0, "accuracy": 0.5}, {})


def test_the_summary_and_the_study_carry_the_curve_and_average_it_over_seeds():
    row = curve_summary(toy_metrics())
    assert row["aurac_a"] == pytest.approx(0.4375) and row["worst_gain_a"] == pytest.approx(-0.25)
    assert row["gain_a_r1"] == pytest.approx(-0.25) and row["loss_a_r1"] == 1.1 and row["aurac_b"] is None
    other = toy_metrics()
    other["rank_sweep"][0]["by_rank"]["1"]["loss"] = 0.9  # gain kept 0.25: AURAC (0.375 + 0.75) / 2
    table = aggregate({"hybrid": [row, curve_summary(other)]})
    assert table["hybrid"]["aurac_a"]["mean"] == pytest.approx((0.4375 + 0.5625) / 2)
    assert table["hybrid"]["aurac_a"]["std"] == pytest.approx(math.sqrt(2) * 0.0625)
    text = markdown_table(table, curve_columns(["a", "b"]))
    assert "AURAC (loss) a" in text and "| n/a |" in text  # b's loss AURAC is undefined in both seeds
    assert study.curve_scores(toy_metrics()) == {"rank_aurac": None, "worst_rank_gain": None}
    other["rank_sweep"].pop()
    assert study.curve_scores(other) == pytest.approx({"rank_aurac": 0.5625, "worst_rank_gain": 0.25})


def test_the_full_rank_is_the_stages_final_one_with_its_own_evaluation_swept_or_not():
    metrics = {"initial": [{"loss": 1.0, "accuracy": 0.5}], "loss": [[0.6]], "accuracy": [[0.7]],
               "rank_sweep": [{"stage": 0, "domain": "a", "rank": 16,  # swept at 1 and 4 only
                               "by_rank": {"1": {"loss": 1.1, "accuracy": 0.45}, "4": {"loss": 0.8, "accuracy": 0.6}}}]}
    (curve,) = rank_curves(metrics)
    assert (curve["ranks"], curve["full_rank"], curve["loss"]) == ([1, 4, 16], 16, [1.1, 0.8, 0.6])
    assert curve["loss_gain_kept"] == pytest.approx([-0.25, 0.5, 1.0])
    assert curve["loss_aurac"] == pytest.approx((2 * 0.125 + 2 * 0.75) / 4)  # x = 0, 2, 4
    with pytest.raises(ValueError, match="full_rank=0; expected the stage's final rank"):
        stage_curve({"loss": 1.0, "accuracy": 0.5}, {}, {"loss": 0.6, "accuracy": 0.7}, 0)
