"""The docs' tables of the rank samplers (``--dylora``) on the embedded default: the rank-quality curve of
each, what each gives, which of the default's targets it meets, and the most an adapter trained at rank k
alone keeps (the rank ceiling).

Imported by results_table.py, which writes them between their markers.
"""

from pathlib import Path

from hybrid_lora.experiments.summary import cell, mean_std
from hybrid_lora.train.config import TrainConfig
from hybrid_lora.train.rank_curve import rank_curves
from result_files import cpu_seconds, load

# The samplers compared for the default: today's runs of the default command (results/default/compare) and
# one folder per --dylora mode under results/rank-sweep; lora_only is the reference for learning and forgetting.
TABLE_RANKS = (1, 2, 4, 8, 16, 64)


def _sampler_runs(results):
    """[(mode, folder, [metrics of each seed])]: nested from results/default/compare, the others from
    results/rank-sweep/<mode>."""
    root = Path(results)
    found = [("nested", root / "default" / "compare" / "hybrid")]
    found += [(p.name, p) for p in sorted((root / "rank-sweep").glob("*")) if p.is_dir() and p.name != "nested"]
    out = []
    for mode, folder in found:
        runs = [load(p) for p in sorted(folder.glob("seed-*/metrics.json"))]
        if runs:
            out.append((mode, folder, runs))
    return out


def _mean(values):
    return mean_std(values)["mean"]


def _at_rank(curves, stage, r, key):
    """curve[key] at rank r after `stage`, for each run's curves (``rank_curves``) that swept r."""
    return [cs[stage][key][cs[stage]["ranks"].index(r)] for cs in curves if r in cs[stage]["ranks"]]


def _rank_cells(curves, stage):
    """Mean over seeds of the loss and gain kept at TABLE_RANKS after `stage`, as 'loss (gain)' cells."""
    cells = []
    for r in TABLE_RANKS:
        losses, gains = _at_rank(curves, stage, r, "loss"), _at_rank(curves, stage, r, "loss_gain_kept")
        cells.append(f"{_mean(losses):.3f} ({_mean(gains):+.2f})" if losses else "-")
    return cells


def ranks_section(results, base):
    """The rank-quality curve of each sampler, and the default's targets sampler by sampler."""
    samplers = _sampler_runs(results)
    lora_only = [load(p) for p in sorted((Path(results) / "default" / "compare" / "lora_only").glob(
        "seed-*/metrics.json"))]
    if not samplers or not lora_only:
        return "No rank sweep committed."
    default = TrainConfig.dylora
    initial = samplers[0][2][0]["initial"]

    def title(mode):
        return f"`{mode}` (default)" if mode == default else f"`{mode}`"

    curves_of = {mode: [rank_curves(m) for m in runs] for mode, _, runs in [*samplers, ("lora_only", None, lora_only)]}

    lines = ["Eval loss at each rank, mean over seeds, with its gain kept in brackets "
             "((base - at rank r) / (base - at the stage's final rank)); the base model scores "
             f"{initial[0]['loss']:.3f} on A and {initial[1]['loss']:.3f} on B:", "",
             "| sampler | seeds | after | " + " | ".join(f"rank {r}" for r in TABLE_RANKS) + " |",
             "|---|---|---|" + "---|" * len(TABLE_RANKS)]
    for mode, folder, runs in [*samplers, ("lora_only", None, lora_only)]:
        for stage, where in ((0, "Stage 1, on A"), (1, "Stage 2, on B")):
            lines.append(f"| {title(mode)} | {len(runs)} | {where} | "
                         + " | ".join(_rank_cells(curves_of[mode], stage)) + " |")
    lines += ["", "What each sampler gives, mean ± std over seeds (gain on B: accuracy after Stage 2 minus the "
              "base's, "
              "as a share of lora_only's; forgetting: accuracy on A lost in Stage 2; worst rank: the lowest gain "
              "kept of any swept rank after either stage, in loss; CPU time: user + system from `/usr/bin/time -v` "
              "(`cpu-time*.txt`; for nested and lora_only, their seed-42 run in `results/default`); wall time "
              "on a 2-core machine shared with other jobs, so an upper bound):", "",
              "| sampler | seeds | top-rank loss A (Stage 1) | top-rank loss B (Stage 2) | gain on B vs lora_only | "
              "forgetting A | worst rank's gain kept | AURAC A | AURAC B | CPU min per run | wall min per run |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]

    def gain_b(m):
        return m["accuracy"][1][1] - m["initial"][1]["accuracy"]

    def forgetting(m):
        return m["accuracy"][0][0] - m["accuracy"][1][0]

    def pm(values, digits=4):
        return cell(mean_std(values), digits)

    reference_gain = _mean([gain_b(m) for m in lora_only])
    stats = {}
    for mode, folder, runs in [*samplers, ("lora_only", None, lora_only)]:
        # The comparison of today's default timed no run; its seed-42 run alone was (results/default/<variant>).
        timed = folder if folder and folder.parent.name != "compare" else Path(results) / "default" / (
            "hybrid" if mode == "nested" else mode)
        cpu = [cpu_seconds(p) for p in sorted(timed.glob("cpu-time*.txt"))]
        curves = curves_of[mode]
        row = stats[mode] = {
            "top_a": [m["loss"][0][0] for m in runs], "top_b": [m["loss"][1][1] for m in runs],
            "gain_b": [gain_b(m) / reference_gain for m in runs], "forgetting": [forgetting(m) for m in runs],
            "worst": [min(c["loss_worst_gain_kept"] for c in cs) for cs in curves],
            "above_base": [max(max(c["loss"]) - c["loss_base"] for c in cs) for cs in curves],
            "r1": [min(c["loss_gain_kept"][0] for c in cs) for cs in curves],
            "r4": [min(c["loss_gain_kept"][c["ranks"].index(4)] for c in cs) for cs in curves],
            "aurac_a": [cs[0]["loss_aurac"] for cs in curves], "aurac_b": [cs[1]["loss_aurac"] for cs in curves],
        }
        cells = [pm(row["top_a"]), pm(row["top_b"]), pm(row["gain_b"], 2), pm(row["forgetting"]),
                 pm(row["worst"], 2), pm(row["aurac_a"], 2), pm(row["aurac_b"], 2),
                 f"{_mean(cpu) / 60:.1f}" if cpu else "-", f"{_mean([m['wall_seconds'] for m in runs]) / 60:.1f}"]
        lines.append(f"| {title(mode)} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "The targets, mean over seeds after both stages (each the worse of the two stages; spread: max - min "
              "of today's default's top-rank loss over its seeds):", "",
              "| sampler | no rank worse than the base (highest loss of any rank minus the base's <= 0) | "
              "rank 4 keeps >= 90 % | "
              "rank 1 keeps >= 50 % | top-rank loss no more than today's spread above today's (A, B) | "
              "learns >= 80 % of lora_only's gain on B | forgets no more than lora_only |",
              "|---|---|---|---|---|---|---|"]
    today, reference = stats["nested"], stats["lora_only"]

    def check(text, ok):
        return f"{text}: {'yes' if ok else 'no'}"

    for mode, _, _ in samplers:
        row = {key: _mean(values) for key, values in stats[mode].items()}
        spread = {k: max(today[k]) - min(today[k]) for k in ("top_a", "top_b")}
        moved = {k: row[k] - _mean(today[k]) for k in ("top_a", "top_b")}
        top = ", ".join(f"{moved[k]:+.4f} (spread {spread[k]:.4f})" for k in ("top_a", "top_b"))
        forgets = f"{row['forgetting']:.4f} vs {_mean(reference['forgetting']):.4f}"
        cells = [check(f"{row['above_base']:+.4f}", row["above_base"] <= 0),
                 check(f"{row['r4']:.2f}", row["r4"] >= 0.9),
                 check(f"{row['r1']:+.2f}", row["r1"] >= 0.5),
                 check(top, all(moved[k] <= spread[k] for k in moved)),  # lower is better: one-sided
                 check(f"{row['gain_b']:.2f}", row["gain_b"] >= 0.8),
                 check(forgets, row["forgetting"] <= _mean(reference["forgetting"]))]
        lines.append(f"| {title(mode)} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ceiling_lines(results, samplers, curves_of))


def ceiling_lines(results, samplers, curves_of):
    """What an adapter trained at rank k alone reaches (results/rank-ceiling/r-<k>), against each sampler's rank-k
    prefix: the most a nested adapter's rank k could keep of the full-rank gain. curves_of: {mode: each run's
    ``rank_curves``}."""
    ceilings = sorted((int(p.parent.parent.name.split("-")[1]), load(p))
                      for p in Path(results).glob("rank-ceiling/r-*/seed-*/metrics.json"))
    if not ceilings:
        return []
    lines = ["", "The most rank k can keep: an adapter trained at rank k alone (`--r-max k --rank-schedule --dylora "
             "off`, seed 42, `results/rank-ceiling/r-k`), its loss and, in brackets, its gain over the base as a "
             "share of the default's at its final rank (mean over the default's seeds), next to each sampler's "
             "rank-k prefix (mean over its seeds):", "",
             "| rank k | after | trained alone | " + " | ".join(f"`{mode}` prefix" for mode, _, _ in samplers) + " |",
             "|---|---|---|" + "---|" * len(samplers)]
    default = next(runs for mode, _, runs in samplers if mode == TrainConfig.dylora)
    for k, alone in ceilings:
        for stage, where in ((0, "Stage 1, on A"), (1, "Stage 2, on B")):
            base = alone["initial"][stage]["loss"]
            full = _mean([m["loss"][stage][stage] for m in default])
            loss = alone["loss"][stage][stage]
            prefixes = []
            for mode, _, _ in samplers:
                at_k = _at_rank(curves_of[mode], stage, k, "loss")
                prefixes.append(f"{_mean(at_k):.3f}" if at_k else "-")
            lines.append(f"| {k} | {where} | {loss:.3f} ({(base - loss) / (base - full):+.2f}) | "
                         + " | ".join(prefixes) + " |")
    return lines
