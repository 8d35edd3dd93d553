"""The parser of ``hybrid-lora``: its verbs and their flags."""

import argparse

from hybrid_lora.cli.generate import add_parser as add_generate
from hybrid_lora.cli.options import add_data, add_quantization, add_runtime, add_training, default, positive_int
from hybrid_lora.experiments.study import PLANS
from hybrid_lora.train.config import VARIANTS


def build_parser():
    parser = argparse.ArgumentParser(prog="hybrid-lora", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train both stages (or every domain given) for each seed")
    add_training(train, variant_flag=True)
    add_data(train)
    add_runtime(train)
    add_quantization(train)

    compare = commands.add_parser("compare", help="several variants over several seeds; mean ± std table")
    compare.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=["lora_only", "dc_only", "hybrid"],
                         help="(default: %(default)s)")
    compare.add_argument("--gpus", nargs="*", default=None, metavar="ID",
                         help="run the (variant, seed) runs side by side, one process per GPU id given (no id: "
                              "every visible GPU), each a train command with its log in OUT/logs")
    compare.add_argument("--study", choices=tuple(PLANS), default=None,
                         help="run the continual study instead of --variants: the method, baselines, their lambda "
                              "sweeps and ablations over embedded A, B, C in two orders and 3 seeds (full), or "
                              "its main arms on one order and seed (quick), or the --dylora rank samplers on "
                              "quick's order over 3 seeds (samplers); see hybrid_lora/experiments/study.py")
    compare.add_argument("--jobs", type=positive_int, default=1,
                         help="with --study: runs at once on this machine, each its own process (default: "
                              "%(default)s; on a CPU each gets --threads or its share of the cores)")
    add_training(compare, variant_flag=False)
    add_data(compare)
    add_runtime(compare)
    add_quantization(compare)

    evaluate = commands.add_parser("eval", help="evaluate a saved adapter at a rank, or over a sweep of ranks")
    evaluate.add_argument("adapter", help="an adapter file written by train (adapters/*.safetensors)")
    which = evaluate.add_mutually_exclusive_group()
    which.add_argument("--rank", type=int, default=None, help="rank to evaluate at (default: the adapter's)")
    which.add_argument("--sweep", nargs="*", type=int, default=None, metavar="RANK",
                       help="evaluate at each of these ranks (no value: powers of two up to r_max)")
    evaluate.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    evaluate.add_argument("--batch-size", type=positive_int, default=default("eval_batch_size"))
    evaluate.add_argument("--out", default=None, help="also write the results to this JSON file")
    add_data(evaluate, train=False)
    add_runtime(evaluate)
    add_quantization(evaluate)

    export = commands.add_parser("export", help="write an adapter at a rank in peft's format and/or merged weights")
    export.add_argument("adapter", help="an adapter file written by train (adapters/*.safetensors)")
    export.add_argument("--rank", type=int, default=None, help="rank to export (default: the adapter's)")
    export.add_argument("--peft", default=None, metavar="DIR",
                        help="folder for adapter_config.json + adapter_model.safetensors (peft.PeftModel)")
    export.add_argument("--merged", default=None, metavar="DIR",
                        help="folder for a checkpoint of the base model with W + delta_W")
    export.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    export.add_argument("--device", default="cpu", help="device to merge on (default: %(default)s)")
    generate = add_generate(commands)
    for sub in (train, compare, evaluate, export, generate):
        sub.add_argument("--debug", action="store_true", help="show the traceback of an error")
        sub.set_defaults(parser=sub)
    return parser
