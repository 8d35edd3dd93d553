"""Where each run of ``train`` and ``compare`` writes, and the summary of a comparison."""


from hybrid_lora.io.atomic import write_json, write_text


def run_folder(out_dir, spec, by_variant):
    return out_dir / spec.variant / f"seed-{spec.seed}" if by_variant else out_dir / f"seed-{spec.seed}"


def write_summary(results, out_dir, args):
    from hybrid_lora.experiments.plots import plot_comparison, plot_rank_curves
    from hybrid_lora.experiments.summary import (aggregate, curve_columns, curve_summary, headline_columns,
                                                 markdown_table)

    domains = next(iter(results.values()))[0]["domains"]
    # The curve again from the sweep: a run finished before the curve existed has none in its summary.
    table = aggregate({variant: [{**m["summary"], **curve_summary(m)} for m in runs]
                       for variant, runs in results.items()})
    columns = headline_columns(domains)
    curves = {k: v for k, v in curve_columns(domains).items() if any(k in row for row in table.values())}
    text = markdown_table(table, columns)
    if curves:
        text += "\nThe rank-quality curve (gain kept = (base - at rank r) / (base - at the stage's final rank); " \
                "AURAC: its area over log2 rank, 1 = every rank as good as the final one):\n\n" \
                + markdown_table(table, curves)
    write_json(out_dir / "summary.json", {"columns": columns, "curve_columns": curves, "table": table,
                                          "domains": domains,
                                          "runs": {v: [f"{v}/seed-{m['seed']}" for m in runs]
                                                   for v, runs in results.items()}})
    write_text(out_dir / "summary.md", text)
    print(text)
    if not args.no_plots and len(domains) > 1:
        plot_columns = {k: columns[k] for k in (f"acc_{domains[0]}_own", f"acc_{domains[0]}_final",
                                                "forgetting", f"acc_{domains[-1]}_final")}
        plot_comparison(table, plot_columns, out_dir / "comparison.png")
    if not args.no_plots and curves:
        plot_rank_curves(table, domains, out_dir / "rank-curve.png")
    return table
