"""Tables across runs: mean ± standard deviation over seeds of each variant's headline numbers.

The standard deviation is the sample one (n - 1 in the denominator), None for a single seed.
Each run's rank-quality curve (``train.rank_curve``) adds, per stage's domain: the AURAC of loss and of
accuracy, the worst swept rank's gain kept, and each swept rank's loss and gain kept.
"""

import math

from hybrid_lora.train.rank_curve import rank_curves


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "values": []}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "std": std, "values": values}


def headline_columns(domains):
    """{column key of run_summary: its title} for a domain sequence; earlier domains first, then the last."""
    first, last = domains[0], domains[-1]
    columns = {f"acc_{first}_own": f"acc {first} after its stage"}
    if len(domains) > 1:
        columns[f"acc_{first}_final"] = f"acc {first} at the end"
        columns["retention"] = f"retention of {first}" if len(domains) == 2 else None
        columns["forgetting"] = "forgetting (acc lost)"
        columns["loss_change"] = "loss change of earlier domains"
        columns[f"acc_{last}_final"] = f"acc {last} at the end"
        columns[f"loss_{last}_final"] = f"loss {last} at the end"
    return {k: v for k, v in columns.items() if v is not None}


def curve_summary(metrics):
    """The rank-curve numbers of one finished run, keyed by the domain of the stage that trained it:
    aurac_<d>, acc_aurac_<d>, worst_gain_<d> (loss), and loss_<d>_r<r>, gain_<d>_r<r>, acc_gain_<d>_r<r>."""
    curves = metrics.get("rank_curve") or rank_curves(metrics)  # runs older than the curve have the sweep
    row = {}
    for curve in curves:
        d = curve["domain"]
        row[f"aurac_{d}"] = curve["loss_aurac"]
        row[f"acc_aurac_{d}"] = curve["accuracy_aurac"]
        row[f"worst_gain_{d}"] = curve["loss_worst_gain_kept"]
        for r, loss, loss_gain, acc_gain in zip(curve["ranks"], curve["loss"], curve["loss_gain_kept"],
                                                curve["accuracy_gain_kept"]):
            row[f"loss_{d}_r{r}"] = loss
            row[f"gain_{d}_r{r}"] = loss_gain
            row[f"acc_gain_{d}_r{r}"] = acc_gain
    return row


def curve_columns(domains):
    """{column key of curve_summary: its title}: each domain's loss AURAC, worst rank, and accuracy AURAC."""
    columns = {}
    for d in domains:
        columns[f"aurac_{d}"] = f"AURAC (loss) {d}"
        columns[f"worst_gain_{d}"] = f"worst rank's gain kept {d}"
        columns[f"acc_aurac_{d}"] = f"AURAC (acc) {d}"
    return columns


def aggregate(runs):
    """runs: {variant: [run_summary rows, one per seed]} -> {variant: {column: mean_std}}."""
    table = {}
    for variant, rows in runs.items():
        keys = sorted({key for row in rows for key in row})
        table[variant] = {key: mean_std([row.get(key) for row in rows]) for key in keys}
    return table


def cell(stats, digits=4):
    """`mean ± std` of a mean_std, the mean alone for one value, n/a for none."""
    if stats["mean"] is None:
        return "n/a"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(table, columns):
    """A Markdown table: one row per variant, one column per entry of `columns` ({key: title})."""
    seeds = {variant: max(len(stats["values"]) for stats in row.values()) for variant, row in table.items()}
    header = "| variant | seeds | " + " | ".join(columns.values()) + " |"
    rule = "|---|---|" + "---|" * len(columns)
    lines = [header, rule]
    for variant, row in table.items():
        cells = [cell(row[key]) if key in row else "n/a" for key in columns]
        lines.append(f"| {variant} | {seeds[variant]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
