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

import sys

from hybrid_lora.cli.compare import run_study
from hybrid_lora.cli.evaluate import run_eval
from hybrid_lora.cli.export import run_export
from hybrid_lora.cli.generate import run_generate
from hybrid_lora.cli.parser import build_parser
from hybrid_lora.cli.train import run_train
from hybrid_lora.errors import UserError
from hybrid_lora.train import distributed


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
                return run_train(parser, args, [args.variant], by_variant=False)
            if args.study is not None:
                return run_study(parser, args)
            return run_train(parser, args, args.variants, by_variant=True)
        finally:
            distributed.teardown()
    if args.command == "eval":
        return run_eval(parser, args)
    if args.command == "generate":
        return run_generate(parser, args)
    return run_export(parser, args)


if __name__ == "__main__":
    sys.exit(main())
