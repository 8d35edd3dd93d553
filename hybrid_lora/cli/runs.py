"""Where each run of ``train`` and ``compare`` writes, and the summary of a comparison."""


from hybrid_lora.io.atomic import write_json, write_text


def run_folder(out_dir, spec, by_variant):
    return out_dir / spec.variant / f"seed-{spec.seed}" if by_variant else out_dir / f"seed-{spec.seed}"


def write_summary(results, out_dir, args):
    from hybrid_lora.experiments.plots import plot_comparison
    from hybrid_lora.experiments.summary import aggregate, headline_columns, markdown_table

    domains = next(iter(results.values()))[0]["domains"]
    table = aggregate({variant: [m["summary"] for m in runs] for variant, runs in results.items()})
    columns = headline_columns(domains)
    text = markdown_table(table, columns)
    write_json(out_dir / "summary.json", {"columns": columns, "table": table, "domains": domains,
                                          "runs": {v: [f"{v}/seed-{m['seed']}" for m in runs]
                                                   for v, runs in results.items()}})
    write_text(out_dir / "summary.md", text)
    print(text)
    if not args.no_plots and len(domains) > 1:
        plot_columns = {k: columns[k] for k in (f"acc_{domains[0]}_own", f"acc_{domains[0]}_final",
                                                "forgetting", f"acc_{domains[-1]}_final")}
        plot_comparison(table, plot_columns, out_dir / "comparison.png")
    return table
