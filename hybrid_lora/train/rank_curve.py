"""How much of a stage's gain each lower rank keeps: the rank-quality curve and its area (AURAC).

After stage t, the rank sweep evaluates domain t at ranks r_0 < r_1 < ... < r_k
(1, 2, 4, ... and the stage's final rank r_k, the "full" rank). With m(r) a
metric of domain t at rank r and m_base the base model's before any training:

    gain_kept(r) = (m_base - m(r)) / (m_base - m(r_k))

the share of the full rank's gain that rank r keeps: 1 at r_k, 0 for a rank no
better than the base, negative for one worse than the base, above 1 for one
better than the full rank. The formula is the same for loss (lower is better)
and accuracy (higher is better): the signs cancel. Where the full rank gained
nothing (m(r_k) == m_base) no share is defined and the gain kept is None;
where it gained little, or lost, the shares are large and say little: read
the losses themselves there.

AURAC, the area under the rank-quality curve (after MatryoshkaLoRA, arXiv
2605.07850, 2026, which scores nested LoRA prefixes by the area under the
rank-accuracy curve), is here the trapezoid area of gain_kept over x = log2(r),
normalised by the span log2(r_k) - log2(r_0):

    AURAC = sum_i (x_{i+1} - x_i) * (g_i + g_{i+1}) / 2  /  (x_k - x_0)

so 1 means every swept rank is as good as the full one, 0 that the ranks keep
no gain on average over the octaves, and each octave of ranks weighs the same
(the ranks 1, 2, 4, ..., 64 are evenly spaced on x). One swept rank gives its
own gain kept; any None gain gives None.
"""

import math

CURVE_METRICS = ("loss", "accuracy")


def gain_kept(base, value, full):
    """(base - value) / (base - full): the share of the full rank's gain that `value` keeps; None if
    full == base (no gain to keep)."""
    for name, number in (("base", base), ("value", value), ("full", full)):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(f"gain_kept: {name}={number!r}; expected a finite number")
    if full == base:
        return None
    return (base - value) / (base - full)


def aurac(ranks, gains):
    """The trapezoid area of `gains` over log2(`ranks`), normalised by the log2 span (see the module docstring).

    ranks: strictly increasing integers >= 1; gains: one per rank (None gives None).
    """
    ranks, gains = list(ranks), list(gains)
    if not ranks or len(ranks) != len(gains):
        raise ValueError(f"aurac: {len(ranks)} ranks and {len(gains)} gains; expected as many, at least one")
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks) or \
            any(b <= a for a, b in zip(ranks, ranks[1:])):
        raise ValueError(f"aurac: ranks {ranks}; expected strictly increasing integers >= 1")
    if any(g is None for g in gains):
        return None
    if len(ranks) == 1:
        return gains[0]
    x = [math.log2(r) for r in ranks]
    area = sum((x[i + 1] - x[i]) * (gains[i] + gains[i + 1]) / 2 for i in range(len(x) - 1))
    return area / (x[-1] - x[0])


def stage_curve(base, by_rank, full=None, full_rank=None):
    """The curve of one stage. base, full and each of by_rank's values ({rank: {"loss", "accuracy", ...}},
    rank keys int or str) are evaluations of the stage's domain: the base model's, the stage's own at its
    final rank `full_rank`, and the sweep's. full None: the highest swept rank is the full one. The curve's
    ranks are the swept ones below full_rank, and full_rank."""
    at = {int(r): values for r, values in by_rank.items()}
    if full is None:
        if not at:
            raise ValueError("stage_curve: an empty rank sweep and no full-rank evaluation; expected either")
        full_rank = max(at)
        full = at[full_rank]
    elif isinstance(full_rank, bool) or not isinstance(full_rank, int) or full_rank < 1:
        raise ValueError(f"stage_curve: full_rank={full_rank!r}; expected the stage's final rank, an integer >= 1")
    ranks = sorted(r for r in at if r < full_rank) + [full_rank]
    at[full_rank] = full
    curve = {"ranks": ranks, "full_rank": full_rank}
    for metric in CURVE_METRICS:
        curve[metric] = [at[r][metric] for r in ranks]
        gains = [gain_kept(base[metric], value, full[metric]) for value in curve[metric]]
        curve[f"{metric}_gain_kept"] = gains
        curve[f"{metric}_aurac"] = aurac(ranks, gains)
        curve[f"{metric}_worst_gain_kept"] = None if None in gains else min(gains)
        curve[f"{metric}_base"] = base[metric]
    return curve


def rank_curves(metrics):
    """One curve per stage of a run's metrics ("initial", "loss", "accuracy" and "rank_sweep", as
    ``run_continual`` returns them): [{"stage", "domain", "ranks", "full_rank", "loss" (at each rank),
    "loss_gain_kept", "loss_aurac", ...}]. The full rank is the stage's final one ("rank" of its sweep
    row) with the stage's own evaluation; a run older than that field has its highest swept rank taken.
    A stage without a sweep has no curve."""
    curves = []
    for sweep in metrics.get("rank_sweep", []):
        if not sweep["by_rank"]:
            continue
        t = sweep["stage"]  # stage t trains domain t
        full = None
        if "rank" in sweep:
            full = {"loss": metrics["loss"][t][t], "accuracy": metrics["accuracy"][t][t]}
        curve = stage_curve(metrics["initial"][t], sweep["by_rank"], full, sweep.get("rank"))
        curves.append({"stage": t, "domain": sweep["domain"], **curve})
    return curves
