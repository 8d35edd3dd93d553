"""``hybrid-lora compare --gpus`` (one ``train`` process per run, one GPU each) and ``compare --study``."""

import argparse
import os
import sys
from pathlib import Path

from hybrid_lora.cli.options import parse_device
from hybrid_lora.cli.runs import run_folder, write_summary
from hybrid_lora.experiments.run import say
from hybrid_lora.experiments.study import PLANS
from hybrid_lora.io.atomic import read_json, write_json
from hybrid_lora.train import distributed


def _child_argv(parser, args, spec, out_dir):
    """The train command of one compare run: its variant, seed and folder, and every other flag compare got."""
    argv = ["train", "--variant", spec.variant, "--seeds", str(spec.seed), "--out", str(out_dir / spec.variant)]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "variants", "seeds", "out", "gpus"):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _gpu_ids(parser, args):
    """The GPU ids --gpus gave, or every visible one; exits 2 if there is none."""
    from hybrid_lora.experiments.device_pool import visible_gpus

    ids = args.gpus or visible_gpus()
    if not ids:
        parser.error("--gpus: no GPU is visible (CUDA_VISIBLE_DEVICES or torch.cuda.device_count()); "
                     "give the ids to use")
    return ids


def compare_on_gpus(parser, args, specs):
    from hybrid_lora.experiments.device_pool import Job, run_on_devices

    if distributed.launched_by_torchrun():
        parser.error("--gpus starts one process per run itself; run compare without torchrun")
    devices = _gpu_ids(parser, args)
    out_dir = Path(args.out or Path("runs") / "compare")
    jobs = [Job(f"{spec.variant}, seed {spec.seed}", _child_argv(parser, args, spec, out_dir),
                out_dir / "logs" / f"{spec.variant}-seed-{spec.seed}.log") for spec in specs]
    codes = run_on_devices(jobs, devices, echo=say)
    failed = [job for job in jobs if codes[job.name] != 0]
    for job in failed:
        say(f"== {job.name} failed: see {job.log}")
    if failed:
        return 1
    results = {}
    for spec in specs:
        results.setdefault(spec.variant, []).append(read_json(run_folder(out_dir, spec, True) / "metrics.json"))
    write_summary(results, out_dir, args)
    print(f"outputs in {out_dir}")
    return 0


# What --study leaves to the user: where, on what, how many at once. The study sets everything else.
_STUDY_FLAGS = ("study", "jobs", "gpus", "out", "device", "threads", "backend", "no_plots", "model", "debug",
                "help", "parser", "command")


def run_study(parser, args):
    from hybrid_lora.experiments.device_pool import Job, run_on_devices, start_here, start_job
    from hybrid_lora.experiments.study import runs, write_summary

    fixed = [action.option_strings[-1] for action in parser._actions
             if action.option_strings and action.dest not in _STUDY_FLAGS
             and getattr(args, action.dest) != action.default]
    if fixed:
        parser.error(f"--study sets its own runs; drop {', '.join(fixed)}")
    if distributed.launched_by_torchrun():
        parser.error("--study starts one process per run itself; run it without torchrun")
    plan = PLANS[args.study]
    out_dir = Path(args.out or Path("runs") / f"study-{plan.name}")
    runtime = ["--model", args.model]
    if args.backend != "auto":
        runtime += ["--backend", args.backend]
    if args.gpus is not None:
        slots = _gpu_ids(parser, args)
        start, describe = start_job, "GPU {}".format
    else:
        device = parse_device(parser, args.device)
        runtime += ["--device", str(device)]
        if device.type == "cpu":
            runtime += ["--threads", str(args.threads or max(1, (os.cpu_count() or 1) // args.jobs))]
        slots = [str(i + 1) for i in range(args.jobs)]
        start, describe = start_here, f"{device} slot {{}}".format
    write_json(out_dir / "command.json", {"argv": sys.argv[1:], "plan": plan.name})
    todo = runs(plan, out_dir, runtime)
    jobs = [Job(run.name, list(run.argv), out_dir / "logs" / f"{run.arm}-{run.order}-seed-{run.seed}.log")
            for run in todo]
    say(f"== study {plan.name}: {len(jobs)} runs in {out_dir}, {len(slots)} at a time")
    codes = run_on_devices(jobs, slots, start=start, echo=say, describe=describe)
    failed = [job for job in jobs if codes[job.name] != 0]
    for job in failed:
        say(f"== {job.name} failed: see {job.log}")
    write_summary(plan, out_dir, plot=not args.no_plots, echo=say)
    print((out_dir / "study.md").read_text(encoding="utf-8"))
    print(f"outputs in {out_dir}")
    return 1 if failed else 0
