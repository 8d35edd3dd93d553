"""The flags the verbs share, and the checks of their values: one line naming the value on a bad one."""

import argparse
import contextlib
import os
import sys

from hybrid_lora.errors import UserError
from hybrid_lora.experiments.data import resolve_domain
from hybrid_lora.experiments.run import DEFAULT_DOMAINS
from hybrid_lora.nn.layer import check_rank as layer_check_rank
from hybrid_lora.nn.scaling import SCALE_RULES
from hybrid_lora.train.config import VARIANTS, TrainConfig
from hybrid_lora.train.dynamic_rank import DYLORA_MODES
from hybrid_lora.train.presets import PRESETS

_DEFAULTS = TrainConfig.__dataclass_fields__
BACKENDS = ("auto", "triton", "torch")


def default(name):
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


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def add_runtime(parser):
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 avoids slowdowns on a busy CPU")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="LoRA layer path: triton kernels, plain torch, or auto (triton where it can run)")


def add_data(parser, train=True):
    parser.add_argument("--domains", nargs="+", default=list(DEFAULT_DOMAINS), metavar="DATASET",
                        help="domains in training order: imdb, yelp_polarity, embedded-a, embedded-b, "
                             "embedded-c, or a .txt/.jsonl/.csv file (default: %(default)s)")
    if train:
        parser.add_argument("--train-examples", type=positive_int, default=3000,
                            help="training examples per domain (default: %(default)s, the original's)")
    parser.add_argument("--eval-examples", type=positive_int, default=1000,
                        help="evaluation examples per domain (default: %(default)s, the original's)")
    parser.add_argument("--max-length", type=positive_int, default=128, help="tokens per example (default: %(default)s)")


def add_training(parser, variant_flag):
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
    hp.add_argument("--r-max", type=positive_int, default=None,
                    help=f"LoRA rank at the start (default: {default('r_max')})")
    hp.add_argument("--alpha", type=float, default=None, help=f"LoRA alpha (default: {default('alpha')})")
    hp.add_argument("--scale-rule", choices=SCALE_RULES, default=None,
                    help=f"LoRA scale at rank r: alpha/r, rslora (alpha/sqrt(r)) or fixed (alpha/r_max at every "
                         f"rank); default: {default('scale_rule')}")
    hp.add_argument("--lora-dropout", type=float, default=default("lora_dropout"), help="(%(default)s)")
    hp.add_argument("--target-modules", nargs="+", default=list(default("target_modules")),
                    help="nn.Linear/Conv1D modules to adapt, as peft reads them: names or name suffixes "
                         "(q_proj v_proj), or one regular expression over whole module names, or all-linear "
                         "(%(default)s)")
    hp.add_argument("--batch-size", type=positive_int, default=default("batch_size"), help="(%(default)s)")
    hp.add_argument("--epochs", type=positive_int, default=default("epochs"), help="per domain (%(default)s)")
    hp.add_argument("--grad-accum", type=positive_int, default=default("grad_accum"),
                    help="micro-batches per optimizer step (%(default)s)")
    hp.add_argument("--lr", type=float, default=None,
                    help="AdamW learning rate (default: the base's own: 1e-3 for embedded, 5e-5 otherwise)")
    hp.add_argument("--weight-decay", type=float, default=default("weight_decay"), help="(%(default)s)")
    hp.add_argument("--on-nonfinite", choices=("stop", "skip"), default=default("on_nonfinite"),
                    help="a NaN or infinite loss or gradient stops the run, or only its step is skipped "
                         "(%(default)s)")
    hp.add_argument("--lambda-order", type=float, default=None,
                    help=f"ordering penalty weight (default: the variant's; {default('lambda_order')} when on)")
    hp.add_argument("--lambda-dc", type=float, default=None,
                    help=f"domain-correlation weight (default: the variant's; {default('lambda_dc')} when on)")
    hp.add_argument("--lambda-l2", type=float, default=None,
                    help="weight of ||delta_W - delta_W of the previous stage||^2 (default: the variant's; 1.0 for l2, "
                         "else 0)")
    hp.add_argument("--lambda-ewc", type=float, default=None,
                    help="weight of EWC on the adapters (default: the variant's; 1e4 for ewc, else 0)")
    hp.add_argument("--replay-fraction", type=float, default=None,
                    help="also train each stage on this fraction of every earlier domain's examples: a reference "
                         "that stores old data (default: the variant's; 0.02 for replay, else 0)")
    hp.add_argument("--dc-mode", choices=("delta", "weights"), default=default("dc_mode"),
                    help="L_DC over the update matrices or the rank-aligned factors (%(default)s)")
    hp.add_argument("--dylora", choices=DYLORA_MODES, default=None,
                    help="rank per step: off, frozen (official DyLoRA: one component learns), full (all up to a "
                         "rank drawn uniformly from 1..r), nested (all up to a rank drawn from r, r/2, r/4), "
                         "log-uniform (all up to a rank drawn from 1..r, each octave equally often), multi-rank "
                         "(the mean loss at ranks 1, 2, 4, ..., r every step), doubling (all up to a rank drawn "
                         "from 1, 2, 4, ..., r, r at one step in three); "
                         f"default: the variant's; {default('dylora')} when on")
    hp.add_argument("--rank-schedule", nargs="*", type=int, default=None, metavar="RANK",
                    help="rank per epoch of each later stage (default: the variant's; r_max halved each epoch "
                         "when on, 64 32 16; give no value to keep r_max)")
    hp.add_argument("--reset-optimizer-on-rank-change", action="store_true",
                    help="drop AdamW's moments at a rank cut instead of keeping those of the kept components")
    hp.add_argument("--eval-batch-size", type=positive_int, default=default("eval_batch_size"), help="(%(default)s)")
    hp.add_argument("--sweep-ranks", nargs="*", type=int, default=None, metavar="RANK",
                    help="after each stage, evaluate at these ranks (default: powers of two up to the stage's "
                         "final rank, and that rank; no value: no sweep)")
    hp.add_argument("--log-every", type=non_negative_int, default=default("log_every"),
                    help="steps between train-loss rows; 0: epochs only (%(default)s)")
    hp.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=default("dtype"),
                    help="autocast dtype of the frozen model; auto: bfloat16 on CUDA, else float32 (%(default)s)")
    hp.add_argument("--compile", action="store_true",
                    help="run the model's forward and backward under torch.compile: one graph for every sampled rank")
    hp.add_argument("--gradient-checkpointing", action="store_true",
                    help="keep only each transformer block's input for the backward and recompute the rest: less "
                         "activation memory, one more forward per step (LoRA dropout draws the same masks again)")
    hp.add_argument("--checkpoint-every", type=non_negative_int, default=default("checkpoint_every"),
                    help="optimizer steps between checkpoints; 0: at the end of each epoch and stage (%(default)s)")
    budget = parser.add_argument_group("budget")
    budget.add_argument("--max-steps", type=non_negative_int, default=0,
                        help="if > 0, at most this many steps per epoch (keeps the first max_steps * batch_size "
                             "training examples)")


def add_quantization(parser):
    """QLoRA: the base's linear layers loaded in 4 bits with bitsandbytes (``hybrid_lora.io.quantization``)."""
    group = parser.add_argument_group("4-bit base (QLoRA; needs the extra qlora)")
    group.add_argument("--load-in-4bit", action="store_true",
                       help="load the base model's linear layers in 4 bits (bitsandbytes); the adapters stay fp32 "
                            "and are the same files as over a 16-bit base")
    group.add_argument("--bnb-4bit-quant-type", choices=("nf4", "fp4"), default="nf4",
                       help="with --load-in-4bit: the 4-bit codebook (%(default)s)")
    group.add_argument("--bnb-4bit-double-quant", action="store_true",
                       help="with --load-in-4bit: quantize the block scales to 8 bits too (about 0.4 bit less per "
                            "weight)")


def check_quantization(parser, args):
    """The 4-bit flags given together, and bitsandbytes importable, as usage errors naming the flag."""
    if not args.load_in_4bit:
        if args.bnb_4bit_quant_type != "nf4" or args.bnb_4bit_double_quant:
            parser.error("--bnb-4bit-quant-type and --bnb-4bit-double-quant need --load-in-4bit")
        return
    from hybrid_lora.io.quantization import require_bitsandbytes

    try:
        require_bitsandbytes()
    except UserError as err:
        parser.error(str(err))


def quantization_overrides(args):
    """The TrainConfig fields of the 4-bit flags."""
    if not args.load_in_4bit:
        return {}
    return {"load_in_4bit": args.bnb_4bit_quant_type, "bnb_4bit_double_quant": args.bnb_4bit_double_quant}


@contextlib.contextmanager
def chosen_backend(name, device):
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


def check_backend(parser, name, device):
    if name != "triton":
        return
    from hybrid_lora.ops.backend import triton_installed

    if not triton_installed():
        parser.error("--backend triton: triton is not installed")
    if device.type == "cpu" and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        parser.error("--backend triton on the CPU needs TRITON_INTERPRET=1 before triton is imported; "
                     "set it in the environment")


def parse_device(parser, text):
    from hybrid_lora.io.models import pick_device

    try:
        return pick_device(text)
    except ValueError as err:
        parser.error(f"--device: {err}")


def check_domains(parser, names):
    for name in names:
        try:
            resolve_domain(name)
        except UserError as err:
            parser.error(f"--domains: {err}")


def check_model(parser, name):
    from hybrid_lora.io.models import resolve_model

    try:
        return resolve_model(name)
    except UserError as err:
        parser.error(f"--model: {err}")


def check_rank(parser, flag, rank, r_max):
    """The layers' rank check, as a usage error naming the flag."""
    try:
        layer_check_rank(rank, r_max, flag)
    except ValueError as err:
        parser.error(str(err))
