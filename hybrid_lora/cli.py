"""The ``hybrid-lora`` command line: train, eval, compare, export.

    hybrid-lora train                      # the embedded default: hybrid, seed 42, CPU or GPU
    hybrid-lora train --model gpt2 --domains imdb yelp_polarity     # the original experiment
    hybrid-lora compare --variants lora_only hybrid --seeds 42 43 44
    hybrid-lora compare --study full --jobs 2 --out results/study      # the continual study (--study quick)
    hybrid-lora eval runs/hybrid/seed-42/adapters/stage2-embedded-b.safetensors --sweep
    hybrid-lora export ADAPTER --rank 16 --peft out/peft --merged out/merged

Every training hyperparameter is a flag. The method's defaults were chosen by
measurement on the embedded corpus; --preset original puts back the original
experiment's settings. The method flags default to what --preset and then
--variant set; given explicitly they win. Without --lr, each base trains at
its own rate (1e-3 for the embedded base, the original's 5e-5 otherwise).
Bad values exit with status 2 and a message naming the value; so does every
other error in what the user gave (a file, data, a model, a checkpoint, the hub
out of reach, an output folder in use): one line, no traceback (``--debug``
shows it).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

from hybrid_lora.errors import UserError
from hybrid_lora.experiments.data import resolve_domain
from hybrid_lora.experiments.run import (DEFAULT_DOMAINS, DataSpec, RunSpec, is_finished, prepare_domains,
                                         run, say, train_config)
from hybrid_lora.experiments.study import PLANS
from hybrid_lora.io.atomic import read_json, write_json, write_text
from hybrid_lora.io.folder_lock import hold_folder
from hybrid_lora.nn.scaling import SCALE_RULES
from hybrid_lora.train import distributed
from hybrid_lora.train.config import VARIANTS, TrainConfig
from hybrid_lora.train.dynamic_rank import DYLORA_MODES
from hybrid_lora.train.presets import PRESETS

_DEFAULTS = TrainConfig.__dataclass_fields__
BACKENDS = ("auto", "triton", "torch")


def _default(name):
    return _DEFAULTS[name].default


def _int_at_least(minimum):
    """An argparse type: an integer >= `minimum`, refused with a message naming the text."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _add_runtime(parser):
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 avoids slowdowns on a busy CPU")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="LoRA layer path: triton kernels, plain torch, or auto (triton where it can run)")


def _add_data(parser, train=True):
    parser.add_argument("--domains", nargs="+", default=list(DEFAULT_DOMAINS), metavar="DATASET",
                        help="domains in training order: imdb, yelp_polarity, embedded-a, embedded-b, "
                             "embedded-c, or a .txt/.jsonl/.csv file (default: %(default)s)")
    if train:
        parser.add_argument("--train-examples", type=_positive_int, default=3000,
                            help="training examples per domain (default: %(default)s, the original's)")
    parser.add_argument("--eval-examples", type=_positive_int, default=1000,
                        help="evaluation examples per domain (default: %(default)s, the original's)")
    parser.add_argument("--max-length", type=_positive_int, default=128, help="tokens per example (default: %(default)s)")


def _add_training(parser, variant_flag):
    if variant_flag:
        parser.add_argument("--variant", choices=tuple(VARIANTS), default="hybrid",
                            help="lora_only, dy_only (DyLoRA), dc_only (domain correlation), hybrid (both); "
                                 "baselines: l2 (L2 toward the previous adapter), ewc (EWC on the adapters), "
                                 "replay (2 %% of earlier domains' examples: stores old data); "
                                 "default: %(default)s")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                        help="one run per seed (default: 42 for train, 42 43 44 for compare)")
    parser.add_argument("--model", default="embedded",
                        help="base model: embedded (the tiny shipped GPT-2), a hub id such as gpt2, or a local "
                             "checkpoint folder of any causal LM (Llama, Qwen2, ...) (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<variant> or runs/compare)")
    parser.add_argument("--resume", action="store_true",
                        help="keep runs that finished (their metrics.json exists); continue the others from their "
                             "checkpoint")
    parser.add_argument("--no-plots", action="store_true", help="draw no PNG plots")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="default",
                        help="default (the measured method) or original (the original experiment's settings: "
                             "DyLoRA frozen, scale alpha/r, lr 5e-5); default: %(default)s")
    hp = parser.add_argument_group("hyperparameters (defaults: the preset's, then the variant's)")
    hp.add_argument("--r-max", type=_positive_int, default=None,
                    help=f"LoRA rank at the start (default: {_default('r_max')})")
    hp.add_argument("--alpha", type=float, default=None, help=f"LoRA alpha (default: {_default('alpha')})")
    hp.add_argument("--scale-rule", choices=SCALE_RULES, default=None,
                    help=f"LoRA scale at rank r: alpha/r, rslora (alpha/sqrt(r)) or fixed (alpha/r_max at every "
                         f"rank); default: {_default('scale_rule')}")
    hp.add_argument("--lora-dropout", type=float, default=_default("lora_dropout"), help="(%(default)s)")
    hp.add_argument("--target-modules", nargs="+", default=list(_default("target_modules")),
                    help="nn.Linear/Conv1D modules to adapt, as peft reads them: names or name suffixes "
                         "(q_proj v_proj), or one regular expression over whole module names, or all-linear "
                         "(%(default)s)")
    hp.add_argument("--batch-size", type=_positive_int, default=_default("batch_size"), help="(%(default)s)")
    hp.add_argument("--epochs", type=_positive_int, default=_default("epochs"), help="per domain (%(default)s)")
    hp.add_argument("--grad-accum", type=_positive_int, default=_default("grad_accum"),
                    help="micro-batches per optimizer step (%(default)s)")
    hp.add_argument("--lr", type=float, default=None,
                    help="AdamW learning rate (default: the base's own: 1e-3 for embedded, 5e-5 otherwise)")
    hp.add_argument("--weight-decay", type=float, default=_default("weight_decay"), help="(%(default)s)")
    hp.add_argument("--on-nonfinite", choices=("stop", "skip"), default=_default("on_nonfinite"),
                    help="a NaN or infinite loss or gradient stops the run, or only its step is skipped "
                         "(%(default)s)")
    hp.add_argument("--lambda-order", type=float, default=None,
                    help=f"ordering penalty weight (default: the variant's; {_default('lambda_order')} when on)")
    hp.add_argument("--lambda-dc", type=float, default=None,
                    help=f"domain-correlation weight (default: the variant's; {_default('lambda_dc')} when on)")
    hp.add_argument("--lambda-l2", type=float, default=None,
                    help="weight of ||delta_W - delta_W of the previous stage||^2 (default: the variant's; 1.0 for l2, "
                         "else 0)")
    hp.add_argument("--lambda-ewc", type=float, default=None,
                    help="weight of EWC on the adapters (default: the variant's; 1e4 for ewc, else 0)")
    hp.add_argument("--replay-fraction", type=float, default=None,
                    help="also train each stage on this fraction of every earlier domain's examples: a reference "
                         "that stores old data (default: the variant's; 0.02 for replay, else 0)")
    hp.add_argument("--dc-mode", choices=("delta", "weights"), default=_default("dc_mode"),
                    help="L_DC over the update matrices or the rank-aligned factors (%(default)s)")
    hp.add_argument("--dylora", choices=DYLORA_MODES, default=None,
                    help="rank per step: off, frozen (official DyLoRA: one component learns), full (all up to a "
                         "rank drawn from 1..r), nested (all up to a rank drawn from r, r/2, r/4); "
                         f"default: the variant's; {_default('dylora')} when on")
    hp.add_argument("--rank-schedule", nargs="*", type=int, default=None, metavar="RANK",
                    help="rank per epoch of each later stage (default: the variant's; r_max halved each epoch "
                         "when on, 64 32 16; give no value to keep r_max)")
    hp.add_argument("--reset-optimizer-on-rank-change", action="store_true",
                    help="drop AdamW's moments at a rank cut instead of keeping those of the kept components")
    hp.add_argument("--eval-batch-size", type=_positive_int, default=_default("eval_batch_size"), help="(%(default)s)")
    hp.add_argument("--sweep-ranks", nargs="*", type=int, default=None, metavar="RANK",
                    help="after each stage, evaluate at these ranks (default: powers of two up to the stage's "
                         "final rank, and that rank; no value: no sweep)")
    hp.add_argument("--log-every", type=_non_negative_int, default=_default("log_every"),
                    help="steps between train-loss rows; 0: epochs only (%(default)s)")
    hp.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=_default("dtype"),
                    help="autocast dtype of the frozen model; auto: bfloat16 on CUDA, else float32 (%(default)s)")
    hp.add_argument("--compile", action="store_true",
                    help="run the model's forward and backward under torch.compile: one graph for every sampled rank")
    hp.add_argument("--gradient-checkpointing", action="store_true",
                    help="keep only each transformer block's input for the backward and recompute the rest: less "
                         "activation memory, one more forward per step (LoRA dropout draws the same masks again)")
    hp.add_argument("--checkpoint-every", type=_non_negative_int, default=_default("checkpoint_every"),
                    help="optimizer steps between checkpoints; 0: at the end of each epoch and stage (%(default)s)")
    budget = parser.add_argument_group("budget")
    budget.add_argument("--max-steps", type=_non_negative_int, default=0,
                        help="if > 0, at most this many steps per epoch (keeps the first max_steps * batch_size "
                             "training examples)")


def build_parser():
    parser = argparse.ArgumentParser(prog="hybrid-lora", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train both stages (or every domain given) for each seed")
    _add_training(train, variant_flag=True)
    _add_data(train)
    _add_runtime(train)

    compare = commands.add_parser("compare", help="several variants over several seeds; mean ± std table")
    compare.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=["lora_only", "dc_only", "hybrid"],
                         help="(default: %(default)s)")
    compare.add_argument("--gpus", nargs="*", default=None, metavar="ID",
                         help="run the (variant, seed) runs side by side, one process per GPU id given (no id: "
                              "every visible GPU), each a train command with its log in OUT/logs")
    compare.add_argument("--study", choices=tuple(PLANS), default=None,
                         help="run the continual study instead of --variants: the method, baselines, their lambda "
                              "sweeps and ablations over embedded A, B, C in two orders and 3 seeds (full), or "
                              "its main arms on one order and seed (quick); see hybrid_lora/experiments/study.py")
    compare.add_argument("--jobs", type=_positive_int, default=1,
                         help="with --study: runs at once on this machine, each its own process (default: "
                              "%(default)s; on a CPU each gets --threads or its share of the cores)")
    _add_training(compare, variant_flag=False)
    _add_data(compare)
    _add_runtime(compare)

    evaluate = commands.add_parser("eval", help="evaluate a saved adapter at a rank, or over a sweep of ranks")
    evaluate.add_argument("adapter", help="an adapter file written by train (adapters/*.safetensors)")
    which = evaluate.add_mutually_exclusive_group()
    which.add_argument("--rank", type=int, default=None, help="rank to evaluate at (default: the adapter's)")
    which.add_argument("--sweep", nargs="*", type=int, default=None, metavar="RANK",
                       help="evaluate at each of these ranks (no value: powers of two up to r_max)")
    evaluate.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=_default("eval_batch_size"))
    evaluate.add_argument("--out", default=None, help="also write the results to this JSON file")
    _add_data(evaluate, train=False)
    _add_runtime(evaluate)

    export = commands.add_parser("export", help="write an adapter at a rank in peft's format and/or merged weights")
    export.add_argument("adapter", help="an adapter file written by train (adapters/*.safetensors)")
    export.add_argument("--rank", type=int, default=None, help="rank to export (default: the adapter's)")
    export.add_argument("--peft", default=None, metavar="DIR",
                        help="folder for adapter_config.json + adapter_model.safetensors (peft.PeftModel)")
    export.add_argument("--merged", default=None, metavar="DIR",
                        help="folder for a checkpoint of the base model with W + delta_W")
    export.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    export.add_argument("--device", default="cpu", help="device to merge on (default: %(default)s)")
    for sub in (train, compare, evaluate, export):
        sub.add_argument("--debug", action="store_true", help="show the traceback of an error")
        sub.set_defaults(parser=sub)
    return parser


@contextlib.contextmanager
def _backend(name, device):
    """Set HYBRID_LORA_BACKEND (and the Triton interpreter for Triton on a CPU) for the command, then restore."""
    from hybrid_lora.ops import backend

    saved = {key: os.environ.get(key) for key in ("HYBRID_LORA_BACKEND", "TRITON_INTERPRET")}
    try:
        if name != "auto":
            os.environ["HYBRID_LORA_BACKEND"] = name
        if name == "triton" and device.type == "cpu":
            # The interpreter is read when triton is imported, which has not happened yet in this process.
            os.environ["TRITON_INTERPRET"] = "1"
        backend.refresh()
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        backend.refresh()


def _check_backend(parser, name, device):
    if name != "triton":
        return
    from hybrid_lora.ops.backend import triton_installed

    if not triton_installed():
        parser.error("--backend triton: triton is not installed")
    if device.type == "cpu" and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        parser.error("--backend triton on the CPU needs TRITON_INTERPRET=1 before triton is imported; "
                     "set it in the environment")


def _device(parser, text):
    from hybrid_lora.io.models import pick_device

    try:
        return pick_device(text)
    except ValueError as err:
        parser.error(f"--device: {err}")


def _check_domains(parser, names):
    for name in names:
        try:
            resolve_domain(name)
        except UserError as err:
            parser.error(f"--domains: {err}")


def _check_model(parser, name):
    from hybrid_lora.io.models import resolve_model

    try:
        return resolve_model(name)
    except UserError as err:
        parser.error(f"--model: {err}")


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


def _run_dir(out_dir, spec, by_variant):
    return out_dir / spec.variant / f"seed-{spec.seed}" if by_variant else out_dir / f"seed-{spec.seed}"


def _settings(spec):
    """What a kept run must share with the command that resumes it (the device may differ)."""
    config = dataclasses.asdict(train_config(spec))
    config.pop("device")
    return json.loads(json.dumps({"train_config": config, "data": dataclasses.asdict(spec.data)}))


def _resume_conflict(specs, out_dir, by_variant):
    """The message refusing --resume if a kept run was trained with other settings, else None."""
    for spec in specs:
        run_dir = _run_dir(out_dir, spec, by_variant)
        if not is_finished(run_dir):
            continue
        stored = read_json(run_dir / "config.json")
        stored["train_config"].pop("device", None)
        kept = {"train_config": stored["train_config"], "data": stored["data"]}
        if kept != _settings(spec):
            changed = sorted(k for part in ("train_config", "data")
                             for k in set(kept[part]) | set(_settings(spec)[part])
                             if kept[part].get(k) != _settings(spec)[part].get(k))
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
               if not (args.resume and parallel.from_main(lambda: is_finished(_run_dir(out_dir, spec, by_variant))))]
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
            stack.enter_context(hold_folder(_run_dir(out_dir, spec, by_variant)))

    distributed.current().from_main(hold)


def _run_all(specs, out_dir, by_variant, args, tokenizer, domains):
    """Run (or, with --resume, reuse) every spec; returns {variant: [metrics]}. Data is tokenized once."""
    results = {}
    parallel = distributed.current()
    for spec in specs:
        run_dir = _run_dir(out_dir, spec, by_variant)
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


def _write_summary(results, out_dir, args):
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


def _train(parser, args, variants, by_variant):
    if args.seeds is None:
        args.seeds = [42, 43, 44] if by_variant else [42]
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds}: a seed is repeated")
    device = _device(parser, args.device)
    _check_model(parser, args.model)
    _check_domains(parser, args.domains)
    _check_backend(parser, args.backend, device)
    specs = _specs(parser, args, variants)
    if getattr(args, "gpus", None) is not None:
        return _compare_on_gpus(parser, args, specs)
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
    with contextlib.ExitStack() as held, _backend(args.backend, device):
        _hold_run_folders(held, specs, out_dir, by_variant)
        if parallel.is_main:
            write_json(out_dir / "command.json", {"argv": sys.argv[1:],
                                                  "args": {k: v for k, v in vars(args).items() if k != "parser"}})
        results = _run_all(specs, out_dir, by_variant, args, tokenizer, domains)
    if parallel.is_main and (by_variant or len(args.seeds) > 1):
        _write_summary(results, out_dir, args)
    print(f"outputs in {out_dir}")
    return 0


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


def _compare_on_gpus(parser, args, specs):
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
        results.setdefault(spec.variant, []).append(read_json(_run_dir(out_dir, spec, True) / "metrics.json"))
    _write_summary(results, out_dir, args)
    print(f"outputs in {out_dir}")
    return 0


# What --study leaves to the user: where, on what, how many at once. The study sets everything else.
_STUDY_FLAGS = ("study", "jobs", "gpus", "out", "device", "threads", "backend", "no_plots", "model", "debug",
                "help", "parser", "command")


def _study(parser, args):
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
        device = _device(parser, args.device)
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


def _load_adapter_model(parser, args):
    from hybrid_lora.io.adapter_files import attach_adapter, read_adapter
    from hybrid_lora.io.models import load_model_and_tokenizer

    _, metadata = read_adapter(args.adapter)
    model_name = args.model or metadata["base_model"]
    _check_model(parser, model_name)
    model, tokenizer = load_model_and_tokenizer(model_name, device="cpu")
    attach_adapter(model, args.adapter, dropout=0.0)
    return model, tokenizer, metadata, model_name


def _check_rank(parser, flag, rank, r_max):
    if not 1 <= rank <= r_max:
        parser.error(f"{flag} {rank}: outside [1, {r_max}] (the adapter's r_max)")


def _eval(parser, args):
    from torch.utils.data import DataLoader

    from hybrid_lora.experiments.data import load_domain
    from hybrid_lora.nn.layer import set_rank
    from hybrid_lora.train.metrics import evaluate

    device = _device(parser, args.device)
    _check_domains(parser, args.domains)
    _check_backend(parser, args.backend, device)
    model, tokenizer, metadata, _ = _load_adapter_model(parser, args)
    r_max = metadata["r_max"]
    if args.sweep is not None:
        ranks = args.sweep or sorted({1 << k for k in range(r_max.bit_length())} | {r_max})
        flag = "--sweep"
    else:
        ranks = [args.rank if args.rank is not None else metadata["rank"]]
        flag = "--rank"
    for rank in ranks:
        _check_rank(parser, flag, rank, r_max)
    model.to(device)
    results = {"adapter": str(args.adapter), "r_max": r_max, "by_domain": {}}
    with _backend(args.backend, device):
        for name in args.domains:
            domain_name, _, examples = load_domain(name, tokenizer, 0, args.eval_examples, args.max_length)
            loader = DataLoader(examples, batch_size=args.batch_size, shuffle=False)
            by_rank = {}
            for rank in ranks:
                set_rank(model, rank)
                by_rank[rank] = evaluate(model, loader, device)
                print(f"{domain_name:>16}  rank {rank:3d}  loss {by_rank[rank]['loss']:.4f}  "
                      f"accuracy {by_rank[rank]['accuracy']:.4f}")
            results["by_domain"][domain_name] = by_rank
    if args.out:
        write_json(args.out, results)
    return 0


def _export(parser, args):
    from hybrid_lora.io.export import check_mergeable, export_merged, export_peft

    if not args.peft and not args.merged:
        parser.error("export: give --peft DIR, --merged DIR or both")
    model, tokenizer, metadata, model_name = _load_adapter_model(parser, args)
    rank = args.rank if args.rank is not None else metadata["rank"]
    _check_rank(parser, "--rank", rank, metadata["r_max"])
    model.to(_device(parser, args.device))
    if args.merged:
        try:
            check_mergeable(model)  # before anything is written
        except ValueError as err:
            parser.error(f"--merged: {err}")
    if args.peft:
        export_peft(model, args.peft, rank, base_model_name_or_path=_check_model(parser, model_name))
        print(f"peft adapter at rank {rank}: {args.peft}")
    if args.merged:
        export_merged(model, tokenizer, args.merged, rank)
        print(f"merged checkpoint at rank {rank}: {args.merged}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    parser = args.parser  # the subcommand's parser: its errors show its own usage line
    try:
        return _command(parser, args)
    except UserError as err:
        if args.debug:
            raise
        # One line, as argparse gives for a bad flag: what was wrong and what was expected.
        print(f"{parser.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


def _command(parser, args):
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args.command in ("train", "compare"):
        try:
            if args.command == "train":
                return _train(parser, args, [args.variant], by_variant=False)
            if args.study is not None:
                return _study(parser, args)
            return _train(parser, args, args.variants, by_variant=True)
        finally:
            distributed.teardown()
    if args.command == "eval":
        return _eval(parser, args)
    return _export(parser, args)


if __name__ == "__main__":
    sys.exit(main())
