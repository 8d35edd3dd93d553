"""PNG plots of a run and of a comparison, drawn from their metrics dicts (matplotlib is optional).

- ``stage<k>-<domain>-history.png``: train loss (per logging interval and per
  epoch), eval loss and eval accuracy per epoch (epoch 0: before the stage), with
  the active rank of each epoch marked, and each earlier domain at the start and
  end of the stage (where forgetting shows);
- ``rank-sweep.png``: eval accuracy and loss of each stage's domain when the
  trained adapter is evaluated at lower ranks, with no retraining;
- ``comparison.png``: variants side by side, mean over seeds with a one-standard-deviation bar;
- ``rank-curve.png``: each variant's rank-quality curve on one axis per domain (the share of the stage's
  gain in eval loss each rank keeps, ``train.rank_curve``), mean ± std over seeds.

Without matplotlib nothing is drawn and one line says so. Figures are built
with matplotlib's object API (no pyplot, no global backend switch).
"""

import importlib.util
from pathlib import Path

from hybrid_lora.io.atomic import atomic_write

NO_MATPLOTLIB = "matplotlib is not installed: no plots are drawn (pip install 'hybrid-lora[plots]')"


def have_matplotlib():
    return importlib.util.find_spec("matplotlib") is not None


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return Path(path).name


def _stage_history(fig, rows, stage, domain, metrics):
    epochs = [r for r in rows if r["kind"] == "epoch"]
    steps = [r for r in rows if r["kind"] == "step"]
    ax_loss, ax_acc = fig.subplots(1, 2)
    per_epoch = {r["epoch"]: r["steps"] for r in epochs}
    if steps:
        xs = [r["epoch"] + r["step"] / per_epoch.get(r["epoch"], r["step"]) for r in steps]
        ax_loss.plot(xs, [r["train_loss"] for r in steps], color="tab:blue", alpha=0.35, lw=1,
                     label="train loss (interval)")
    ends = [r["epoch"] + 1 for r in epochs]
    # Epoch 0: the domain before this stage (the base model, or the model after the previous stage).
    before = metrics["initial"][stage] if stage == 0 else {"loss": metrics["loss"][stage - 1][stage],
                                                          "accuracy": metrics["accuracy"][stage - 1][stage]}
    ax_loss.plot(ends, [r["train_loss"] for r in epochs], "o-", color="tab:blue", label="train loss (epoch)")
    ax_loss.plot([0] + ends, [before["loss"]] + [r["eval_loss"] for r in epochs], "s-", color="tab:red",
                 label=f"eval loss, {domain}")
    ax_acc.plot([0] + ends, [before["accuracy"]] + [r["eval_accuracy"] for r in epochs], "s-", color="tab:green",
                label=f"eval accuracy, {domain}")
    last = ends[-1] if ends else 1
    for earlier in range(stage):
        # Earlier domains are evaluated at the ends of stages only: a line from the start to the end of this one.
        name = metrics["domains"][earlier]
        ax_loss.plot([0, last], [metrics["loss"][stage - 1][earlier], metrics["loss"][stage][earlier]], "^--",
                     color="tab:purple", label=f"eval loss, {name}")
        ax_acc.plot([0, last], [metrics["accuracy"][stage - 1][earlier], metrics["accuracy"][stage][earlier]], "^--",
                    color="tab:purple", label=f"eval accuracy, {name}")
    for ax in (ax_loss, ax_acc):
        previous = None
        for r in epochs:
            # One band per epoch, labelled with the rank it trained at; a dashed line where the rank was cut.
            if previous is not None and r["rank"] != previous:
                ax.axvline(r["epoch"], color="grey", ls="--", lw=1)
            ax.text(r["epoch"] + 0.5, 1.0, f"r={r['rank']}", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="dimgrey")
            previous = r["rank"]
        ax.set_xlim(0, max(ends) if ends else 1)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_loss.set_ylabel("loss (CE per token)")
    ax_acc.set_ylabel("next-token accuracy")
    fig.suptitle(f"stage {stage + 1}: {domain}", y=1.04)


def _rank_sweep(fig, sweeps):
    ax_acc, ax_loss = fig.subplots(1, 2)
    for sweep in sweeps:
        by_rank = {int(r): result for r, result in sweep["by_rank"].items()}  # JSON turns int keys into strings
        ranks = sorted(by_rank)
        if not ranks:
            continue
        label = f"after stage {sweep['stage'] + 1} ({sweep['domain']})"
        ax_acc.plot(ranks, [by_rank[r]["accuracy"] for r in ranks], "o-", label=label)
        ax_loss.plot(ranks, [by_rank[r]["loss"] for r in ranks], "o-", label=label)
    for ax, name in ((ax_acc, "eval accuracy"), (ax_loss, "eval loss")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank at evaluation")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("one trained adapter evaluated at lower ranks", y=1.02)


def plot_run(metrics, out_dir, echo=print):
    """Draw a run's plots into `out_dir`; returns the file names (empty without matplotlib)."""
    if not have_matplotlib():
        if echo is not None:
            echo(NO_MATPLOTLIB)
        return []
    out_dir = Path(out_dir)
    names = []
    history = metrics["history"]
    for stage, domain in enumerate(metrics["domains"]):
        rows = [r for r in history if r["stage"] == stage]
        if not rows:
            continue
        fig = _figure(10, 3.6)
        _stage_history(fig, rows, stage, domain, metrics)
        names.append(_save(fig, out_dir / f"stage{stage + 1}-{domain}-history.png"))
    if any(s["by_rank"] for s in metrics.get("rank_sweep", [])):
        fig = _figure(10, 3.6)
        _rank_sweep(fig, metrics["rank_sweep"])
        names.append(_save(fig, out_dir / "rank-sweep.png"))
    return names


def plot_comparison(table, columns, path, echo=print):
    """Bars of mean ± std per variant for each column. table: {variant: {column: {"mean", "std"}}}."""
    if not have_matplotlib():
        if echo is not None:
            echo(NO_MATPLOTLIB)
        return None
    variants = list(table)
    fig = _figure(2.2 + 2.6 * len(columns), 3.8)
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    colours = ["tab:grey", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for ax, (column, title) in zip(axes, columns.items()):
        means = [table[v][column]["mean"] for v in variants]
        stds = [table[v][column]["std"] or 0.0 for v in variants]
        ax.bar(range(len(variants)), means, yerr=stds, capsize=4,
               color=[colours[i % len(colours)] for i in range(len(variants))])
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        low = min(m - s for m, s in zip(means, stds))
        high = max(m + s for m, s in zip(means, stds))
        if low > 0:
            # Accuracies sit close together far from zero: start the axis near them so differences show.
            pad = 0.15 * (high - low) + 1e-6
            ax.set_ylim(max(0.0, low - pad), high + pad)
    seeds = {len(table[v][next(iter(columns))]["values"]) for v in variants}
    fig.suptitle(f"variants: mean ± std over {'/'.join(map(str, sorted(seeds)))} seeds", y=1.02)
    return _save(fig, path)


def plot_rank_curves(table, domains, path, echo=print):
    """Gain kept (loss) against rank, one panel per domain, one line per variant: table is ``aggregate``'s,
    whose rows hold gain_<domain>_r<rank> columns (``summary.curve_summary``)."""
    if not have_matplotlib():
        if echo is not None:
            echo(NO_MATPLOTLIB)
        return None
    fig = _figure(1.0 + 4.2 * len(domains), 3.6)
    axes = fig.subplots(1, len(domains), squeeze=False)[0]
    for ax, domain in zip(axes, domains):
        prefix = f"gain_{domain}_r"
        for variant, row in table.items():
            ranks = sorted(int(key[len(prefix):]) for key in row if key.startswith(prefix))
            points = [(r, row[f"{prefix}{r}"]) for r in ranks if row[f"{prefix}{r}"]["mean"] is not None]
            if points:
                ax.errorbar([r for r, _ in points], [p["mean"] for _, p in points],
                            yerr=[p["std"] or 0.0 for _, p in points], fmt="o-", capsize=3, label=variant)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank at evaluation")
        ax.set_ylabel("gain kept (eval loss)")
        ax.set_title(f"after the stage on {domain}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("share of the full rank's gain each rank keeps: 1 = full rank, 0 = base (dashed)", y=1.02)
    return _save(fig, path)


def plot_tradeoff(points, path, echo=print, xlabel="forgetting of the earlier domain (accuracy lost)",
                  ylabel="accuracy on the new domain at the end"):
    """Forgetting (x) against accuracy on the new domain (y), one marker per method.

    points: [{"label", "forgetting": (mean, std or None), "new": (mean, std or None)}, optionally "role" and
    "family"]; a std draws an error bar (over seeds); points of one role share a marker, and a grey line joins
    the points of one family (a sweep) in order of forgetting. The good corner is top-left.
    """
    if not have_matplotlib():
        if echo is not None:
            echo(NO_MATPLOTLIB)
        return None
    from matplotlib import colormaps

    colours = colormaps["tab20"]  # more methods than the default cycle's ten colours
    markers = {"method": "*", "baseline": "o", "reference": "s", "bound": "D", "sweep": "v", "ablation": "^",
               "sampler": "P"}
    fig = _figure(7.2, 5.0)
    ax = fig.subplots()
    families = {}
    for point in points:
        if point.get("family"):
            families.setdefault(point["family"], []).append((point["forgetting"][0], point["new"][0]))
    for family, xy in families.items():
        if len(xy) > 1:
            xs, ys = zip(*sorted(xy))
            ax.plot(xs, ys, color="0.6", linewidth=0.8, zorder=0)
            ax.annotate(family, sorted(xy)[-1], fontsize=7, color="0.4",
                        xytext=(4, -10), textcoords="offset points")
    for i, point in enumerate(points):
        (fx, fs), (ny, ns) = point["forgetting"], point["new"]
        ax.errorbar([fx], [ny], xerr=[fs] if fs else None, yerr=[ns] if ns else None,
                    fmt=markers.get(point.get("role"), "o"), markersize=8 if point.get("role") == "method" else 6,
                    capsize=3, label=point["label"], color=colours(i % 20))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("learning the new domain vs forgetting the old ones (top-left is better)", fontsize=9)
    return _save(fig, path)
