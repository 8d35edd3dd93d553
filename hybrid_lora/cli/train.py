"""``hybrid-lora train`` and ``compare``: one run per (variant, seed), each in its own folder, and their summary."""

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

from hybrid_lora.cli.compare import compare_on_gpus
from hybrid_lora.cli.options import (check_backend, check_domains, check_model, check_quantization, chosen_backend,
                                     parse_device, quantization_overrides)
from hybrid_lora.cli.runs import run_folder, write_summary
from hybrid_lora.experiments.run import (DataSpec, RunSpec, is_finished, prepare_domains, run, say,
                                         train_config)
from hybrid_lora.io.atomic import read_json, write_json
from hybrid_lora.io.folder_lock import hold_folder
from hybrid_lora.train import distributed


def _overrides(args):
    """TrainConfig fields the user set, or that every run shares; the method flags only when given."""
    overrides = {
        "lora_dropout": args.lora_dropout,
        "target_modules": tuple(args.target_modules), "batch_size": args.batch_size, "epochs": args.epochs,
        "weight_decay": args.weight_decay, "grad_accum": args.grad_accum, "dc_mode": args.dc_mode,
        "on_nonfinite": args.on_nonfinite,
        "checkpoint_every": args.checkpoint_every,
        "reset_optimizer_on_rank_change": args.reset_optimizer_on_rank_change,
        "eval_batch_size": args.eval_batch_size, "log_every": args.log_every, "dtype": args.dtype,
        "compile": args.compile, "gradient_checkpointing": args.gradient_checkpointing,
        "device": "" if args.device == "auto" else args.device,
    }
    for flag in ("r_max", "alpha", "scale_rule", "lr", "lambda_order", "lambda_dc", "lambda_l2", "lambda_ewc",
                 "replay_fraction", "dylora", "rank_schedule"):
        value = getattr(args, flag)
        if value is not None:
            overrides[flag] = tuple(value) if flag == "rank_schedule" else value
    if args.sweep_ranks is not None:
        overrides["sweep_ranks"] = tuple(args.sweep_ranks)
    overrides.update(quantization_overrides(args))  # --load-in-4bit
    return overrides


def _specs(parser, args, variants):
    """One RunSpec per (variant, seed), each checked by building its TrainConfig (bad values exit 2)."""
    data = DataSpec(domains=tuple(args.domains), train_examples=args.train_examples,
                    eval_examples=args.eval_examples, max_length=args.max_length, max_steps=args.max_steps)
    overrides = _overrides(args)
    specs = []
    for variant in variants:
        for seed in args.seeds:
            spec = RunSpec(variant=variant, seed=seed, model=args.model, data=data, overrides=overrides,
                           preset=args.preset)
            try:
                train_config(spec)
            except ValueError as err:
                parser.error(str(err))
            specs.append(spec)
    return specs




def _settings(spec):
    """What a kept run must share with the command that resumes it (the device may differ)."""
    config = dataclasses.asdict(train_config(spec))
    config.pop("device")
    return json.loads(json.dumps({"train_config": config, "data": dataclasses.asdict(spec.data)}))


def _resume_conflict(specs, out_dir, by_variant):
    """The message refusing --resume if a kept run was trained with other settings, else None."""
    for spec in specs:
        run_dir = run_folder(out_dir, spec, by_variant)
        if not is_finished(run_dir):
            continue
        stored = read_json(run_dir / "config.json")
        stored["train_config"].pop("device", None)
        kept, wanted = {"train_config": stored["train_config"], "data": stored["data"]}, _settings(spec)
        # A setting added after the run was trained is absent from its config.json: unset (None) is the same.
        changed = sorted(k for part in ("train_config", "data") for k in set(kept[part]) | set(wanted[part])
                         if kept[part].get(k) != wanted[part].get(k))
        if changed:
            return (f"--resume: {run_dir} was trained with other settings ({', '.join(changed)}); "
                    "drop --resume to retrain it, or choose another --out")
    return None


def _prepare(specs, out_dir, by_variant, args):
    """(tokenizer, tokenized domains) shared by the runs that will train, or (None, None) if none will.

    Read before anything is written, so that bad data leaves the output folder as it was.
    """
    from hybrid_lora.io.models import load_tokenizer

    parallel = distributed.current()
    pending = [spec for spec in specs
               if not (args.resume and parallel.from_main(lambda: is_finished(run_folder(out_dir, spec, by_variant))))]
    if not pending:
        return None, None
    tokenizer = load_tokenizer(pending[0].model)
    return tokenizer, prepare_domains(pending[0].data, tokenizer, args.batch_size)


def _hold_run_folders(stack, specs, out_dir, by_variant):
    """Lock the folder of every run of the command for as long as `stack` lasts (rank 0 alone, for a group).

    One run per folder: a run folder in use by another command stops this one
    before it writes anything (``folder_lock``); every process gets the error.
    """
    def hold():
        for spec in specs:
            stack.enter_context(hold_folder(run_folder(out_dir, spec, by_variant)))

    distributed.current().from_main(hold)


def _run_all(specs, out_dir, by_variant, args, tokenizer, domains):
    """Run (or, with --resume, reuse) every spec; returns {variant: [metrics]}. Data is tokenized once."""
    results = {}
    parallel = distributed.current()
    for spec in specs:
        run_dir = run_folder(out_dir, spec, by_variant)
        if args.resume and parallel.from_main(lambda: is_finished(run_dir)):
            say(f"== {spec.variant}, seed {spec.seed}: finished earlier, kept ({run_dir})")
            if parallel.is_main:
                results.setdefault(spec.variant, []).append(read_json(run_dir / "metrics.json"))
            continue
        metrics = run(spec, run_dir, domains=domains, tokenizer=tokenizer, plot=not args.no_plots,
                      resume=args.resume)
        s = metrics["summary"]
        if "forgetting" in s:
            retention = "undefined" if s["retention"] is None else f"{s['retention']:.4f}"  # own accuracy 0
            say(f"== {spec.variant}, seed {spec.seed}: retention {retention}, "
                f"forgetting {s['forgetting']:.4f}, {s['wall_seconds']:.0f}s")
        results.setdefault(spec.variant, []).append(metrics)
    return results




def run_train(parser, args, variants, by_variant):
    if args.seeds is None:
        args.seeds = [42, 43, 44] if by_variant else [42]
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds}: a seed is repeated")
    device = parse_device(parser, args.device)
    check_model(parser, args.model)
    check_domains(parser, args.domains)
    check_backend(parser, args.backend, device)
    check_quantization(parser, args)
    specs = _specs(parser, args, variants)
    if getattr(args, "gpus", None) is not None:
        return compare_on_gpus(parser, args, specs)
    try:
        distributed.setup(args.device)
        distributed.current().check_batch_size(args.batch_size, "--batch-size")
    except ValueError as err:
        parser.error(str(err))
    if not distributed.current().is_main:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # rank 0 speaks for the group
            return _train_and_summarise(parser, args, specs, by_variant, device)
    return _train_and_summarise(parser, args, specs, by_variant, device)


def _train_and_summarise(parser, args, specs, by_variant, device):
    parallel = distributed.current()
    out_dir = Path(args.out or (Path("runs") / ("compare" if by_variant else args.variant)))
    if args.resume:
        conflict = parallel.from_main(lambda: _resume_conflict(specs, out_dir, by_variant))
        if conflict:
            parser.error(conflict)
    tokenizer, domains = _prepare(specs, out_dir, by_variant, args)
    with contextlib.ExitStack() as held, chosen_backend(args.backend, device):
        _hold_run_folders(held, specs, out_dir, by_variant)
        if parallel.is_main:
            write_json(out_dir / "command.json", {"argv": sys.argv[1:],
                                                  "args": {k: v for k, v in vars(args).items() if k != "parser"}})
        results = _run_all(specs, out_dir, by_variant, args, tokenizer, domains)
    if parallel.is_main and (by_variant or len(args.seeds) > 1):
        write_summary(results, out_dir, args)
    print(f"outputs in {out_dir}")
    return 0
